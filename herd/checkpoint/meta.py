"""Meta layout: ``params.json`` + ``consolidated.00.pth`` ... ``consolidated.{N-1}.pth`` (one per model-parallel rank).

Each shard holds a slice of every column-parallel weight along dim 0 (``wq wk wv w1 w3``, and in Llama 3 also the
embedding and output head, split on the vocabulary) and of every row-parallel weight along dim 1 (``wo w2``); norms are
replicated. Merging concatenates in rank order; splitting chunks the same way.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import pickle
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from herd.checkpoint.errors import CheckpointError
from herd.io import atomic_write_json, read_json
from herd.model.args import ModelArgs

PARAMS = "params.json"
HERD_PARAMS = "herd_params.json"  # what Meta's params.json cannot say (context length, tied embeddings, ...)
_SHARD_RE = re.compile(r"consolidated\.(\d+)\.pth")
_IGNORED = {"rope.freqs"}
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True) if sys.platform.startswith("linux") else None
_PAGE = mmap.PAGESIZE  # carried by Llama 1/2 checkpoints; recomputed, never loaded


def split_dim(name: str) -> int | None:
    """Model-parallel split dimension of a Meta tensor (None = replicated)."""
    if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
        return 1
    if name.endswith("norm.weight"):
        return None
    return 0


def read_args(path: Path) -> ModelArgs:
    """``params.json``, plus herd's ``herd_params.json`` beside it when present (see ``ModelArgs.herd_extras``)."""
    params_path = path / PARAMS
    params = read_json(params_path, CheckpointError)
    if (path / HERD_PARAMS).exists() and isinstance(params, dict):
        extras = read_json(path / HERD_PARAMS, CheckpointError)
        if not isinstance(extras, dict):
            raise CheckpointError(f"{path / HERD_PARAMS}: expected a JSON object, got a {type(extras).__name__}")
        params = {**params, **extras}
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
    open(file, "rb").close()  # an unreadable file is the OS's error (permission denied), not "corrupt"
    try:
        return torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, ValueError, OSError) as e:
        raise CheckpointError(f"{file}: cannot read checkpoint shard, corrupt or truncated ({e})") from None


def _release_pages(t: Tensor) -> None:
    """Drop a memory-mapped source tensor's pages from our resident set once it has been copied.

    The shards are mapped privately and never written, so MADV_DONTNEED only forgets pages the kernel can re-read
    from the file. Without it, merging N shards would keep every shard's pages resident next to the merged copy.
    """
    if _libc is None or t.numel() == 0:
        return
    start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    start = (start + _PAGE - 1) // _PAGE * _PAGE  # only whole pages inside the tensor
    end = end // _PAGE * _PAGE
    if end > start:
        _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), 4)  # 4 = MADV_DONTNEED


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
        if name == "output.weight" and args.tie_embeddings:
            continue  # tied checkpoints still store the head; it is re-tied to the embedding, never merged
        dim = split_dim(name)
        pieces = [s[name] for s in shards]
        if dim is None or len(pieces) == 1:
            yield name, pieces[0], str(files[0])
            continue
        shapes = [tuple(p.shape) for p in pieces]
        if any(len(sh) != len(shapes[0]) or sh[:dim] + sh[dim + 1:] != shapes[0][:dim] + shapes[0][dim + 1:]
               for sh in shapes):
            raise CheckpointError(f"{path}: shards of '{name}' cannot be joined on dim {dim}: {shapes}")
        # Copy shard by shard, dropping each source's pages as soon as it is copied: the peak stays at the merged
        # tensor plus one piece, not plus all of them.
        merged = torch.empty(shapes[0][:dim] + (sum(sh[dim] for sh in shapes),) + shapes[0][dim + 1:],
                             dtype=pieces[0].dtype)
        offset = 0
        for piece in pieces:
            merged.narrow(dim, offset, piece.size(dim)).copy_(piece)
            offset += piece.size(dim)
            _release_pages(piece)
        yield name, merged, str(files[0])


def write(state: dict[str, Tensor], args: ModelArgs, out: Path, shards: int = 1) -> None:
    """Write ``params.json`` and ``shards`` consolidated files.

    With several shards each piece is cloned, because torch.save of a view would store the whole underlying tensor.
    """
    for what, n in (("n_heads", args.n_heads), ("n_kv_heads", args.n_kv_heads), ("vocab_size", args.vocab_size),
                    ("ffn hidden size", args.hidden_dim), ("dim", args.dim)):
        if n % shards:
            raise CheckpointError(f"cannot split into {shards} shards: {what}={n} is not divisible by {shards}")
    atomic_write_json(out / PARAMS, args.to_params())
    if args.herd_extras():
        atomic_write_json(out / HERD_PARAMS, args.herd_extras())
    for rank in range(shards):
        piece: dict[str, Tensor] = {}
        for name, t in state.items():
            dim = split_dim(name)
            part = t if dim is None else t.chunk(shards, dim=dim)[rank]
            piece[name] = part.clone() if shards > 1 else part
        torch.save(piece, out / f"consolidated.{rank:02d}.pth")
        del piece
