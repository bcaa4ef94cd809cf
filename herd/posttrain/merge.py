"""Model averaging (Llama 3 §4.1.5: runs with different data or hyperparameters are averaged at every RM, SFT and
DPO stage): ``herd merge DIR... --out DIR [--weights w1,w2,...]``.

The result is ``theta = sum_i w_i theta_i`` over every tensor, with the weights normalised to sum to 1
(``w_i / sum_j w_j``: ``--weights 2,1`` means two thirds and one third; no weights means uniform). Weights must be
non-negative with a positive sum. The models must be compatible: the same configuration (``ModelArgs``), hence the
same tensor names and shapes, and the same tokenizer; anything else is refused with a one-line error naming the
tensor or field. Each model is loaded in turn (HF or Meta layout) and added into an fp32 accumulator, so memory is
one fp32 copy plus one model; the average is stored in the inputs' dtype (fp32 when they differ). The first model's
tokenizer and generation config are copied to the output.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch

from herd.checkpoint import load_model, read_args, save_model
from herd.errors import UserError
from herd.io import read_json
from herd.model.args import ModelArgs
from herd.model.transformer import Transformer
from herd.tokenizer import Tokenizer
from herd.tokenizer.tokenizer import HF_FILE, RANKS_FILE


def normalise_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    """``weights`` scaled to sum to 1 (uniform when None); they must be ``n`` finite non-negative numbers."""
    if weights is None:
        return [1.0 / n] * n
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise UserError(f"--weights: {len(weights)} weight(s) for {n} model(s)")
    if any(not (w >= 0) or w == float("inf") for w in weights):
        raise UserError(f"--weights: weights must be finite and non-negative, got {weights}")
    total = sum(weights)
    if total <= 0:
        raise UserError("--weights: the weights sum to 0")
    return [w / total for w in weights]


def parse_weights(text: str | None) -> list[float] | None:
    """``"1,2,1"`` -> ``[1.0, 2.0, 1.0]``; one-line error on anything that is not a number."""
    if text is None:
        return None
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise UserError(f"--weights: expected comma-separated numbers, got {text!r}") from None


def _tensor_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = Transformer(args)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def check_compatible(dirs: Sequence[Path]) -> ModelArgs:
    """The common ``ModelArgs`` of ``dirs``; a ``UserError`` naming the first tensor (or config field) that differs."""
    first = read_args(dirs[0])
    shapes = _tensor_shapes(first)
    for other_dir in dirs[1:]:
        other = read_args(other_dir)
        if other == first:
            continue
        other_shapes = _tensor_shapes(other)
        for name in list(shapes) + [n for n in other_shapes if n not in shapes]:  # state-dict order
            if name not in other_shapes or name not in shapes:
                where = other_dir if name not in other_shapes else dirs[0]
                raise UserError(f"cannot average {dirs[0]} and {other_dir}: tensor '{name}' is missing from {where}")
            if shapes[name] != other_shapes[name]:
                raise UserError(f"cannot average {dirs[0]} and {other_dir}: tensor '{name}' has shape "
                                f"{shapes[name]} vs {other_shapes[name]}")
        for field in dataclasses.fields(ModelArgs):
            a, b = getattr(first, field.name), getattr(other, field.name)
            if a != b:
                raise UserError(f"cannot average {dirs[0]} and {other_dir}: config field '{field.name}' is "
                                f"{a!r} vs {b!r}")
    return first


def _tokenizer(path: Path) -> Tokenizer | None:
    if not any((path / name).exists() for name in (RANKS_FILE, HF_FILE)):
        return None
    return Tokenizer(path)


def check_tokenizers(dirs: Sequence[Path]) -> Tokenizer | None:
    """The first directory's tokenizer; refuse models whose tokenizers differ (their token ids mean different
    things). A directory without a tokenizer is not compared."""
    found = [(d, _tokenizer(d)) for d in dirs]
    have = [(d, t) for d, t in found if t is not None]
    for d, tok in have[1:]:
        if tok.fingerprint() != have[0][1].fingerprint():
            raise UserError(f"cannot average {have[0][0]} and {d}: their tokenizers differ")
    return found[0][1]


@torch.no_grad()
def average_models(dirs: Sequence[str | Path], weights: Sequence[float] | None = None) -> Transformer:
    """The weighted average of the model directories ``dirs`` (see the module docstring)."""
    dirs = [Path(d) for d in dirs]
    if len(dirs) < 2:
        raise UserError(f"model averaging needs at least two model directories, got {len(dirs)}")
    w = normalise_weights(weights, len(dirs))
    check_compatible(dirs)
    average: Transformer | None = None
    dtypes = set()
    for d, wi in zip(dirs, w):
        model = load_model(d)
        dtypes.add(next(model.parameters()).dtype)
        if average is None:
            average = model.float()
            for p in average.parameters():
                p.mul_(wi)
            continue
        params = dict(model.named_parameters())
        for name, p in average.named_parameters():
            p.add_(params[name].float(), alpha=wi)
        del model, params
    if len(dtypes) == 1:
        average.to(dtypes.pop())
    return average


def merge_models(dirs: Sequence[str | Path], out: str | Path, weights: Sequence[float] | None = None,
                 overwrite: bool = False) -> Path:
    """Average ``dirs`` and write the result as an HF-layout model directory ``out`` (atomically) with the first
    model's tokenizer and generation config."""
    dirs = [Path(d) for d in dirs]
    tokenizer = check_tokenizers(dirs)
    model = average_models(dirs, weights)
    gen_file = dirs[0] / "generation_config.json"
    gen = read_json(gen_file, UserError) if gen_file.exists() else None
    return save_model(model, out, tokenizer=tokenizer, generation_config=gen, overwrite=overwrite)
