"""One loader for both checkpoint layouts, and the matching writer.

Loading builds the model on the meta device (no memory), then streams tensors one at a time from memory-mapped files
straight into the target dtype and device, so it never holds two full copies of the weights. Every tensor is checked
against the shapes the config implies; any problem raises ``CheckpointError`` naming the file and the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from herd.checkpoint import hf, meta
from herd.checkpoint.errors import CheckpointError
from herd.errors import UserError
from herd.io import atomic_directory, atomic_write_json, read_json
from herd.model.args import ModelArgs
from herd.model.transformer import Transformer, rope_inv_freq

GENERATION_CONFIG = "generation_config.json"


def detect_format(path: str | Path) -> str:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such directory")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (expected a model directory)")
    if (path / hf.CONFIG).exists():
        return "hf"
    if (path / meta.PARAMS).exists():
        return "meta"
    raise CheckpointError(f"{path}: neither {hf.CONFIG} (Hugging Face) nor {meta.PARAMS} (Meta) found")


def read_args(path: str | Path) -> ModelArgs:
    """The ``ModelArgs`` of a model directory, without touching its weights."""
    path = Path(path)
    return (hf if detect_format(path) == "hf" else meta).read_args(path)


def load_model(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
               ) -> Transformer:
    """Load a Hugging Face or Meta model directory (format detected) into a ``Transformer``.

    ``dtype=None`` keeps the checkpoint's own dtype (from the tensor headers, not the config's dtype field).
    """
    path = Path(path)
    fmt = detect_format(path)
    reader = hf if fmt == "hf" else meta
    config_file = path / (hf.CONFIG if fmt == "hf" else meta.PARAMS)
    args = reader.read_args(path)
    with torch.device("meta"):
        model = Transformer(args)
    expected = {name: tuple(p.shape) for name, p in model.named_parameters(remove_duplicate=False)}
    optional = {"output.weight"} if args.tie_embeddings else set()  # the tied head is re-tied below

    loaded: dict[str, torch.Tensor] = {}
    for name, tensor, file in reader.iter_tensors(path, args):
        if name not in expected:
            raise CheckpointError(f"{file}: unexpected tensor '{name}' (not part of a {args.n_layers}-layer model "
                                  f"described by {config_file.name})")
        if name in optional:
            continue
        if tuple(tensor.shape) != expected[name]:
            raise CheckpointError(f"{file}: tensor '{name}' has shape {tuple(tensor.shape)}, but {config_file} "
                                  f"implies {expected[name]}")
        if name in loaded:
            raise CheckpointError(f"{file}: tensor '{name}' appears twice")
        if not tensor.is_floating_point():
            raise CheckpointError(f"{file}: tensor '{name}' has non-float dtype {tensor.dtype}")
        loaded[name] = tensor.to(device=device, dtype=dtype or tensor.dtype)
    missing = sorted(set(expected) - optional - set(loaded))
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(f"{path}: missing tensor(s) {', '.join(repr(m) for m in missing[:3])}{more}")

    model.load_state_dict(loaded, strict=False, assign=True)
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.inv_freq = rope_inv_freq(args, device=device)
    return model


def save_model(model: Transformer, path: str | Path, format: str = "hf", *, tokenizer: Any = None,
               dtype: torch.dtype | None = None, shards: int = 1, max_shard_bytes: int = 5 * 10**9,
               generation_config: dict[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Write ``model`` as a model directory in ``format`` ("hf" or "meta"), atomically.

    HF output is ``config.json``, ``model.safetensors`` (sharded with an index above ``max_shard_bytes``) and
    ``generation_config.json``; Meta output is ``params.json`` and ``shards`` ``consolidated.NN.pth`` files. With a
    ``tokenizer``, its files (``tokenizer.model`` and ``tokenizer.json`` + config) are saved beside the weights.
    """
    if format not in ("hf", "meta"):
        raise UserError(f"format must be 'hf' or 'meta', got {format!r}")
    path = Path(path)
    args = model.args
    state = {k: (v if dtype is None else v.to(dtype)).detach().cpu() for k, v in model.state_dict().items()}
    with atomic_directory(path, overwrite=overwrite) as tmp:
        if format == "hf":
            hf.write(state, args, tmp, max_shard_bytes=max_shard_bytes)
            weight_dtype = next(iter(state.values())).dtype
            bos = tokenizer.bos_id if tokenizer is not None else None
            eos = tokenizer.eos_id if tokenizer is not None else None
            atomic_write_json(tmp / hf.CONFIG, hf.config_from_args(args, weight_dtype, bos, eos))
            gen = generation_config if generation_config is not None else default_generation_config(tokenizer)
            if gen:
                atomic_write_json(tmp / GENERATION_CONFIG, gen)
        else:
            meta.write(state, args, tmp, shards=shards)
        if tokenizer is not None:
            tokenizer.save(tmp)
    return path


def default_generation_config(tokenizer: Any) -> dict[str, Any]:
    """Meta's sampling defaults (T=0.6, top-p 0.9) and stop ids from the tokenizer (end_of_text, eot, eom)."""
    if tokenizer is None:
        return {}
    return {"bos_token_id": tokenizer.bos_id, "eos_token_id": list(tokenizer.stop_tokens), "do_sample": True,
            "temperature": 0.6, "top_p": 0.9}



LLAMA3_VOCAB, LLAMA3_RANKS = 128256, 128000  # every Meta Llama 3.x text model: 128,000 BPE ranks + 256 specials
# Special tokens with the same id in Llama 3.0 and 3.1+ (the reserved ones were renamed between them).
_STABLE_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


def check_tokenizer(path: str | Path, tokenizer: Any, args: ModelArgs | None = None) -> None:
    """Raise ``CheckpointError`` when ``tokenizer`` cannot be the tokenizer of the model directory ``path``.

    A rank file cut at a line boundary still parses, but every special-token id moves down with it, and the model then
    reads and writes garbage. So the tokenizer is checked against what the directory declares: the embedding must
    have a row for every id; the BOS id and the EOS ids in ``config.json`` / ``generation_config.json`` and the ids of
    ``tokenizer_config.json``'s ``added_tokens_decoder`` and ``tokenizer.json``'s ``added_tokens`` must be the
    tokenizer's; and a model with Llama 3's exact vocabulary (128,256) needs Llama 3's 128,000 ranks.
    """
    path = Path(path)
    args = args or read_args(path)
    source = next((str(path / name) for name in ("tokenizer.model", "tokenizer.json", "original/tokenizer.model")
                   if (path / name).exists()), "the tokenizer")
    config = path / (hf.CONFIG if (path / hf.CONFIG).exists() else meta.PARAMS)
    n_ranks, n_words = len(tokenizer.ranks), tokenizer.n_words
    hint = f"{source} has {n_ranks:,} BPE ranks (truncated, or not this model's tokenizer?)"
    if n_words > args.vocab_size:
        raise CheckpointError(f"{config}: vocab_size {args.vocab_size:,} is smaller than the tokenizer's {n_words:,} "
                              f"ids; {hint}")
    if args.vocab_size == LLAMA3_VOCAB and LLAMA3_RANKS - len(tokenizer.special_tokens) < n_ranks < LLAMA3_RANKS:
        raise CheckpointError(f"{config}: vocab_size {LLAMA3_VOCAB:,} is Llama 3's, which has {LLAMA3_RANKS:,} ranks, "
                              f"but {hint}")
    stops = set(tokenizer.stop_tokens)
    for file in (path / hf.CONFIG, path / GENERATION_CONFIG):
        cfg = read_json(file, CheckpointError) if file.exists() else {}
        if not isinstance(cfg, dict):
            continue
        bos, eos = cfg.get("bos_token_id"), cfg.get("eos_token_id")
        if isinstance(bos, int) and bos != tokenizer.bos_id:
            raise CheckpointError(f"{file}: bos_token_id is {bos}, but the tokenizer's <|begin_of_text|> is id "
                                  f"{tokenizer.bos_id}; {hint}")
        for i in eos if isinstance(eos, list) else [eos]:
            if isinstance(i, int) and i not in stops:
                raise CheckpointError(f"{file}: eos_token_id {i} is not one of the tokenizer's stop tokens "
                                      f"{sorted(stops)}; {hint}")
    declared: list[tuple[Path, str, int]] = []
    tok_config = path / "tokenizer_config.json"
    if tok_config.exists():
        entries = read_json(tok_config, CheckpointError)
        entries = entries.get("added_tokens_decoder") if isinstance(entries, dict) else None
        for i, entry in (entries or {}).items():
            if isinstance(entry, dict) and str(i).isdigit():
                declared.append((tok_config, str(entry.get("content")), int(i)))
    tok_json = path / "tokenizer.json"
    if not declared and source.endswith("tokenizer.model") and tok_json.exists():
        added = read_json(tok_json, CheckpointError)
        for entry in (added.get("added_tokens") or []) if isinstance(added, dict) else []:
            if isinstance(entry, dict) and isinstance(entry.get("id"), int):
                declared.append((tok_json, str(entry.get("content")), entry["id"]))
    for file, name, i in declared:
        if name in _STABLE_SPECIALS and tokenizer.special_tokens.get(name, i) != i:
            raise CheckpointError(f"{file}: declares {name} as id {i}, but the tokenizer gives it id "
                                  f"{tokenizer.special_tokens[name]}; {hint}")


def read_generation_config(path: str | Path, tokenizer: Any = None) -> dict[str, Any]:
    """A model directory's ``generation_config.json`` (or the defaults for ``tokenizer``), with ``eos_token_id``
    always a list: the ids that end generation."""
    file = Path(path) / GENERATION_CONFIG
    gen = read_json(file, CheckpointError) if file.exists() else default_generation_config(tokenizer)
    eos = gen.get("eos_token_id", list(tokenizer.stop_tokens) if tokenizer is not None else [])
    gen["eos_token_id"] = eos if isinstance(eos, list) else [eos]
    return gen
