"""Meta layout: ``params.json`` + ``consolidated.00.pth`` ... ``consolidated.{N-1}.pth`` (one per model-parallel rank).

Each shard holds a slice of every column-parallel weight along dim 0 (``wq wk wv w1 w3``, and in Llama 3 also the
embedding and output head, split on the vocabulary) and of every row-parallel weight along dim 1 (``wo w2``); norms are
replicated. Merging concatenates in rank order; splitting chunks the same way.
"""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from herd.checkpoint.errors import CheckpointError
from herd.io import atomic_write_json
from herd.model.args import ModelArgs

PARAMS = "params.json"
_SHARD_RE = re.compile(r"consolidated\.(\d+)\.pth")
_IGNORED = {"rope.freqs"}  # carried by Llama 1/2 checkpoints; recomputed, never loaded


def split_dim(name: str) -> int | None:
    """Model-parallel split dimension of a Meta tensor (None = replicated)."""
    if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
        return 1
    if name.endswith("norm.weight"):
        return None
    return 0


def read_args(path: Path) -> ModelArgs:
    params_path = path / PARAMS
    try:
        params = json.loads(params_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{params_path}: file not found") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{params_path}: not valid JSON ({e})") from None
    try:
        return ModelArgs.from_params(params, source=str(params_path))
    except (ValueError, TypeError) as e:
        raise CheckpointError(str(e)) from None


def shard_files(path: Path) -> list[Path]:
    files = sorted((p for p in path.glob("consolidated.*.pth") if _SHARD_RE.fullmatch(p.name)),
                   key=lambda p: int(_SHARD_RE.fullmatch(p.name).group(1)))
    if not files:
        raise CheckpointError(f"{path}: no consolidated.*.pth files found")
    expected = [f"consolidated.{i:02d}.pth" for i in range(len(files))]
    if [f.name for f in files] != expected:
        found = [f.name for f in files]
        raise CheckpointError(f"{path}: shards must be {expected[0]} .. {expected[-1]}, found {found}")
    return files


def _load_shard(file: Path) -> dict[str, Tensor]:
    try:
        return torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, ValueError, OSError) as e:
        raise CheckpointError(f"{file}: cannot read checkpoint shard, corrupt or truncated ({e})") from None


def iter_tensors(path: Path, args: ModelArgs) -> Iterator[tuple[str, Tensor, str]]:
    """Yield ``(name, merged tensor, file)``; shards are memory-mapped and merged one tensor at a time."""
    files = shard_files(path)
    shards = [_load_shard(f) for f in files]
    names = [k for k in shards[0] if k not in _IGNORED]
    for file, shard in zip(files[1:], shards[1:]):
        extra = set(shard) - set(shards[0])
        missing = set(names) - set(shard)
        if extra or missing:
            key = sorted(extra or missing)[0]
            raise CheckpointError(f"{file}: key '{key}' is {'unexpected' if extra else 'missing'} "
                                  f"(shards disagree with {files[0].name})")
    for name in names:
        dim = split_dim(name)
        pieces = [s[name] for s in shards]
        if dim is None or len(pieces) == 1:
            yield name, pieces[0], str(files[0])
            continue
        try:
            yield name, torch.cat(pieces, dim=dim), str(files[0])
        except RuntimeError:
            shapes = [tuple(p.shape) for p in pieces]
            raise CheckpointError(f"{path}: shards of '{name}' cannot be joined on dim {dim}: {shapes}") from None


def write(state: dict[str, Tensor], args: ModelArgs, out: Path, shards: int = 1) -> None:
    """Write ``params.json`` and ``shards`` consolidated files.

    With several shards each piece is cloned, because torch.save of a view would store the whole underlying tensor.
    """
    for what, n in (("n_heads", args.n_heads), ("n_kv_heads", args.n_kv_heads), ("vocab_size", args.vocab_size),
                    ("ffn hidden size", args.hidden_dim), ("dim", args.dim)):
        if n % shards:
            raise CheckpointError(f"cannot split into {shards} shards: {what}={n} is not divisible by {shards}")
    atomic_write_json(out / PARAMS, args.to_params())
    for rank in range(shards):
        piece: dict[str, Tensor] = {}
        for name, t in state.items():
            dim = split_dim(name)
            part = t if dim is None else t.chunk(shards, dim=dim)[rank]
            piece[name] = part.clone() if shards > 1 else part
        torch.save(piece, out / f"consolidated.{rank:02d}.pth")
        del piece
