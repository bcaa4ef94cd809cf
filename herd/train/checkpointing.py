"""Training checkpoints with torch.distributed.checkpoint (DCP): model, optimizer, loader position, RNG, step.

Each checkpoint is written to ``checkpoints/.step-N.tmp`` and renamed to ``checkpoints/step-N`` once complete and
fsynced, so a kill at any moment leaves the previous checkpoint intact and loadable; incomplete temporaries are
ignored (and cleaned up) on the next start. The last ``keep`` checkpoints are kept. DCP stores each tensor under its
name with its global shape, so a checkpoint written at one layout (FSDP, TP, pipeline stages) loads at any other.

Integrity: the last file written before the rename is ``checksums.json``: the size and CRC-32 of every file, and for
DCP's ``.distcp`` files one CRC-32 per stored item (tensor or object, located by DCP's own ``.metadata``), so a
mismatch names the file and the tensor. ``newest_good_checkpoint`` verifies the newest checkpoint before a resume;
one that fails (truncated or missing files, flipped bytes, an empty directory) is renamed ``step-N.corrupt-REASON``
(kept for inspection, never deleted) and the next older one is tried; when none verifies the run stops with one
line. A checkpoint from before checksums existed is checked for structure only (files present, sizes, readable
metadata), with a warning. A save that runs out of disk space removes its temporary directory and stops with one
line naming the file system; the previous checkpoint is untouched.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import signal
import sys
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from herd.errors import UserError
from herd.io import fsync_dir, fsync_tree
from herd.train.resilience import injected_fault

_STEP_RE = re.compile(r"step-(\d+)")
TRAINER_STATE = "trainer_state.pt"
CHECKSUMS = "checksums.json"


class CheckpointCorrupt(UserError):
    """A checkpoint that cannot be trusted; ``kind`` tags the renamed directory (``step-N.corrupt-KIND``)."""

    def __init__(self, message: str, kind: str = "unreadable"):
        super().__init__(message)
        self.kind = kind


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (the disk is full); the previous checkpoint is intact."""


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    if not root.exists():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_RE.fullmatch(p.name)) and p.is_dir()]
    return sorted(found)


def remove_incomplete(root: Path) -> None:
    """Delete temporaries left by a save that was killed before its rename."""
    if root.exists():
        for p in root.glob(".step-*.tmp"):
            shutil.rmtree(p, ignore_errors=True)


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


# Optimizer state flattened to one entry per parameter name ("state.layers.0.attention.wq.weight.exp_avg",
# "param_groups.layers.0.attention.wq.weight.lr"), so any layout, including a pipeline stage that holds only some
# layers, saves and loads its own entries.
_FLAT = StateDictOptions(flatten_optimizer_state_dict=True)


def _tied_alias(model: torch.nn.Module) -> bool:
    """A pipeline stage holding a tied output head but not the embedding: the single-process model names that
    parameter's optimizer state after the embedding, so this stage renames it to match."""
    args = getattr(model, "args", None)
    return bool(args and args.tie_embeddings and model.tok_embeddings is None and model.output is not None)


def _rename_optim(sd: dict[str, Any], old: str, new: str) -> dict[str, Any]:
    return {k.replace(f".{old}.", f".{new}."): v for k, v in sd.items()}


def training_state_dicts(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``{"model": ..., "optim": ...}`` in the layout-independent form checkpoints use."""
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_FLAT)
    if _tied_alias(model):
        optim_sd = _rename_optim(optim_sd, "output.weight", "tok_embeddings.weight")
    return {"model": model_sd, "optim": optim_sd}


class Checkpointer:
    """Writes training checkpoints, synchronously or with ``dcp.async_save``.

    Every rank writes its shards with DCP into ``.step-N.tmp``; rank 0 then writes the trainer state and the
    checksums, fsyncs and renames it to ``step-N`` and prunes to the last ``keep``. With ``async_save`` the state is
    first copied to host memory (the only part the training step waits for), DCP writes it from a background thread
    over a separate gloo group, and a second background thread finalises the directory once the write is done
    (collected each step by ``poll``, forced by ``wait`` and by the next save). Until then the previous checkpoint is
    the latest one: a kill at any moment leaves a loadable checkpoint. A write that fails for lack of space removes
    its temporary and raises CheckpointWriteError. ``world`` (train.parallelize.World) is None for a single
    process."""

    def __init__(self, root: Path, keep: int, world: Any = None, async_save: bool = False):
        self.root, self.keep, self.world, self.async_save = Path(root), keep, world, async_save
        self.main = world is None or world.is_main
        self.rank = 0 if world is None else world.rank
        self.pending: tuple[Any, Path, Path, dict] | None = None  # (future, tmp, final, trainer state)
        self.finaliser = ThreadPoolExecutor(1) if async_save else None
        self.group = None
        if async_save and world is not None and world.distributed:
            import torch.distributed as dist

            # The background write runs collectives; on the training group they could interleave with the step's.
            self.group = dist.new_group(backend="gloo")

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             trainer_state: dict[str, Any]) -> None:
        self.wait()
        self.root.mkdir(parents=True, exist_ok=True)
        final, tmp = self.root / f"step-{step}", self.root / f".step-{step}.tmp"
        if self.main:
            shutil.rmtree(tmp, ignore_errors=True)
        self._barrier()
        sd = training_state_dicts(model, optimizer)
        # The RNG state is taken now, with the model state, not when the write finishes; every rank keeps its own
        # (ranks draw different numbers, e.g. dropout-like noise or sampling seeds). The trainer state records that
        # the checkpoint has checksums, so one whose checksums.json went missing is not taken for an old one.
        state = {**trainer_state, "step": step, "checksums": CHECKSUMS}
        try:
            tmp.mkdir(parents=True, exist_ok=True)
            torch.save(rng_state(), tmp / rng_file(self.rank))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # single-process DCP warns that no process group exists
                if self.async_save:
                    future = dcp.async_save(sd, checkpoint_id=str(tmp),
                                            process_group=self.group)
                    # Finalising (trainer state, checksums: one more read of what was written, fsync, rename) runs in
                    # the background too: the training step waits for none of it.
                    self.pending = (self.finaliser.submit(self._finish_write, future, tmp, final, state), tmp, final,
                                    state)
                    return
                dcp.save(sd, checkpoint_id=str(tmp))
            self._finalise(tmp, final, state)
        except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
            self._write_failed(e, tmp, step)
        self._barrier()

    def poll(self) -> None:
        """Collect a finished background write and its finalisation (on rank 0, DCP's future completes after every
        rank's data and the metadata are written), raising its error if it failed."""
        if self.pending is not None and self.pending[0].done():
            self._finish_pending()

    def wait(self) -> None:
        """Block until a background write is done and finalised on every rank."""
        if self.pending is not None:
            self._finish_pending()
            self._barrier()

    def _finish_pending(self) -> None:
        done, tmp, final, state = self.pending
        self.pending = None
        try:
            done.result()  # re-raises a failed write
        except (Exception, CheckpointException) as e:
            self._write_failed(e, tmp, state["step"])

    def _finish_write(self, future: Any, tmp: Path, final: Path, state: dict[str, Any]) -> None:
        future.result()
        self._finalise(tmp, final, state)

    def _finalise(self, tmp: Path, final: Path, state: dict[str, Any]) -> None:
        step = state["step"]
        if os.environ.get("HERD_FAULT") == f"kill-in-save:{step}":  # fault injection for tests: die mid-save
            os.kill(os.getpid(), signal.SIGKILL)
        if injected_fault("disk-full-in-save", step):  # fault injection for tests: the disk fills during the write
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp / TRAINER_STATE))
        if not self.main:
            return
        torch.save(state, tmp / TRAINER_STATE)
        write_checksums(tmp)  # last: a directory with checksums.json has every other file complete
        fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(self.root)
        for _, old in list_checkpoints(self.root)[:-self.keep] if self.keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)

    def _write_failed(self, error: BaseException, tmp: Path, step: int) -> None:
        """Remove the half-written directory; a full disk becomes one line (torch's zip writer reports it as
        "unexpected pos ..."), anything else is re-raised as it is."""
        full = _is_disk_full(error, tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if not full:
            raise error
        previous = [p.name for s, p in list_checkpoints(self.root) if s < step]
        intact = (f"the previous checkpoint {previous[-1]} is intact" if previous
                  else "no earlier checkpoint exists")
        raise CheckpointWriteError(f"no space left on {_mount_point(self.root)} while writing checkpoint step-{step} "
                                   f"in {self.root}; {intact}") from None

    def _barrier(self) -> None:
        if self.world is not None:
            self.world.barrier()


def rng_file(rank: int) -> str:
    return f"rng-rank{rank}.pt"


# --- integrity: checksums written with each checkpoint, verified before a resume ----------------------------------
# CRC-32 (zlib): it catches any burst error up to 32 bits and random damage with probability 1 - 2^-32, runs at about
# 1 GB/s per core and releases the GIL, so pieces of at most 64 MiB are hashed in parallel threads. It guards against
# damage (disks, copies, truncation), not against someone forging a checkpoint.
_PIECE = 64 << 20
_THREADS = min(8, os.cpu_count() or 1)

Ranges = list[tuple[int, int, str | None]]  # (offset, length, the item stored there, None between items)


def _crc32(path: Path, ranges: Ranges) -> list[int]:
    out = []
    with open(path, "rb") as f:
        for offset, length, _ in ranges:
            f.seek(offset)
            out.append(zlib.crc32(f.read(length)))
    return out


def _crc32_parallel(jobs: list[tuple[Path, Ranges]]) -> list[list[int]]:
    """The CRC-32 of every range of every file, in batches of about ``_PIECE`` bytes spread over threads."""
    tasks: list[tuple[int, Path, Ranges]] = []
    for j, (path, ranges) in enumerate(jobs):
        batch, size = [], 0
        for r in ranges:
            batch.append(r)
            size += r[1]
            if size >= _PIECE:
                tasks.append((j, path, batch))
                batch, size = [], 0
        tasks.append((j, path, batch))
    with ThreadPoolExecutor(_THREADS) as pool:
        results = list(pool.map(lambda t: _crc32(t[1], t[2]), tasks))
    out: list[list[int]] = [[] for _ in jobs]
    for (j, _, _), crcs in zip(tasks, results):
        out[j] += crcs
    return out


def _pieces(offset: int, length: int, name: str | None) -> Ranges:
    return [(o, min(_PIECE, offset + length - o), name) for o in range(offset, offset + length, _PIECE)] or [
        (offset, 0, name)]


def _ranges(path: Path, files: list[str]) -> dict[str, Ranges]:
    """Per file, the ranges that get a checksum, covering every byte: in a ``.distcp`` file, one per item DCP
    stored (from its ``.metadata``; bytes between items as unnamed ranges), elsewhere the whole file; ranges over
    ``_PIECE`` bytes are cut into pieces."""
    metadata = dcp.FileSystemReader(str(path)).read_metadata()
    items: dict[str, list[tuple[int, int, str]]] = {}
    for index, info in metadata.storage_data.items():
        sharded = index.offset is not None and any(index.offset)
        name = f"{index.fqn} (shard at {tuple(index.offset)})" if sharded else index.fqn
        items.setdefault(info.relative_path, []).append((info.offset, info.length, name))
    out = {}
    for name in files:
        size, covered, pos = (path / name).stat().st_size, [], 0
        for offset, length, item in sorted(items.get(name, [])):
            if offset > pos:
                covered += _pieces(pos, offset - pos, None)
            covered += _pieces(offset, length, item)
            pos = max(pos, offset + length)
        if size > pos or not covered:
            covered += _pieces(pos, size - pos, None)
        out[name] = covered
    return out


def write_checksums(path: Path) -> None:
    """Write ``checksums.json``: every file's size and the CRC-32 of each of its ranges (``_ranges``)."""
    files = sorted(p.name for p in path.iterdir() if p.is_file() and p.name != CHECKSUMS)
    ranges = _ranges(path, files)
    crcs = _crc32_parallel([(path / name, ranges[name]) for name in files])
    sums = {name: {"size": (path / name).stat().st_size,
                   "ranges": [[o, n, crc, item] for (o, n, item), crc in zip(ranges[name], file_crcs)]}
            for name, file_crcs in zip(files, crcs)}
    (path / CHECKSUMS).write_text(json.dumps({"format": 1, "algorithm": "crc32", "files": sums}))


def _verify_checksums(path: Path, files: dict[str, Any]) -> None:
    """Compare every file with its recorded size and checksums; raise on the first difference (files in name
    order, ranges in file order)."""
    for name, expected in sorted(files.items()):
        if not (path / name).is_file():
            raise CheckpointCorrupt(f"{path / name}: file missing", "missing-file")
        size = (path / name).stat().st_size
        if size != expected["size"]:
            raise CheckpointCorrupt(f"{path / name}: {size} bytes, {expected['size']} written (truncated or "
                                    f"overwritten)", "truncated" if size < expected["size"] else "size")
    names = sorted(files)
    ranges = [[(o, n, item) for o, n, _, item in files[name]["ranges"]] for name in names]
    actual = _crc32_parallel([(path / name, r) for name, r in zip(names, ranges)])
    for name, got in zip(names, actual):
        for (offset, length, crc, item), value in zip(files[name]["ranges"], got):
            if value != crc:
                what = f" in {item!r}" if item else ""
                raise CheckpointCorrupt(f"{path / name}: checksum mismatch{what} (bytes {offset}..{offset + length})",
                                        "checksum")


def verify_checkpoint(path: Path) -> bool:
    """Raise CheckpointCorrupt (one line: the file, and the tensor where a checksum differs) unless every file of
    the checkpoint is there with the size and checksums written with it. Returns False for a checkpoint from
    before checksums, which is checked for structure only: DCP metadata readable, the files it names present and
    long enough, the trainer state and rank 0's RNG state readable."""
    path = Path(path)
    if not path.is_dir() or not any(path.iterdir()):
        raise CheckpointCorrupt(f"{path}: empty directory", "empty")
    manifest = path / CHECKSUMS
    if manifest.exists():
        try:
            _verify_checksums(path, json.loads(manifest.read_text())["files"])
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
            if isinstance(e, CheckpointCorrupt):
                raise
            raise CheckpointCorrupt(f"{manifest}: unreadable ({type(e).__name__})", "checksums") from None
        return True
    for name in (".metadata", TRAINER_STATE, rng_file(0)):
        if not (path / name).is_file():
            raise CheckpointCorrupt(f"{path / name}: file missing", "missing-file")
    try:
        state = read_trainer_state(path)
        torch.load(path / rng_file(0), weights_only=False)
    except Exception as e:
        raise CheckpointCorrupt(f"{path}: unreadable trainer or RNG state ({_first_line(e)})", "unreadable") from None
    if state.get("checksums"):
        raise CheckpointCorrupt(f"{manifest}: file missing", "missing-file")
    try:
        metadata = dcp.FileSystemReader(str(path)).read_metadata()
    except Exception as e:
        raise CheckpointCorrupt(f"{path / '.metadata'}: unreadable ({_first_line(e)})", "metadata") from None
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(needed.items()):
        if not (path / name).is_file():
            raise CheckpointCorrupt(f"{path / name}: file missing", "missing-file")
        if (path / name).stat().st_size < end:
            raise CheckpointCorrupt(f"{path / name}: truncated ({(path / name).stat().st_size} bytes, items "
                                    f"reach {end})", "truncated")
    return False


def quarantine(path: Path, kind: str) -> Path:
    """Rename a bad checkpoint out of the ``step-N`` namespace (never delete it: someone may want to look)."""
    target = path.with_name(f"{path.name}.corrupt-{kind}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.corrupt-{kind}-{n}")
    os.replace(path, target)
    fsync_dir(path.parent)
    return target


def newest_good_checkpoint(root: Path) -> Path | None:
    """The newest checkpoint under ``root`` that verifies (None when there are none). Newer ones that fail are
    renamed ``step-N.corrupt-REASON`` with one line each on stderr; when every one fails, none is renamed and
    CheckpointCorrupt says why each failed (the run must not silently start from scratch)."""
    bad: list[tuple[Path, CheckpointCorrupt]] = []
    for _, path in reversed(list_checkpoints(root)):
        try:
            has_checksums = verify_checkpoint(path)
        except CheckpointCorrupt as e:
            bad.append((path, e))
            continue
        for old, problem in bad:
            moved = quarantine(old, problem.kind)
            print(f"skipping checkpoint {old.name}: {problem}; renamed to {moved.name}", file=sys.stderr, flush=True)
        if not has_checksums:
            _warn_unverified(path)
        return path
    if bad:
        reasons = "; ".join(f"{p.name}: {e}" for p, e in bad)
        raise CheckpointCorrupt(f"cannot load checkpoint: none in {root} verifies ({reasons}); move them away to "
                                f"start from scratch", "none")
    return None


def _warn_unverified(path: Path) -> None:
    print(f"warning: checkpoint {path} has no {CHECKSUMS} (written before checksums): checked its structure only",
          file=sys.stderr, flush=True)


# --- writing failures -------------------------------------------------------------------------------------------
def _causes(error: BaseException) -> list[BaseException]:
    """The error, what caused it, and what failed on each rank of a DCP CheckpointException."""
    seen, todo = [], [error]
    while todo:
        e = todo.pop()
        if e is None or any(e is s for s in seen):
            continue
        seen.append(e)
        todo += [e.__cause__, e.__context__]
        if isinstance(e, CheckpointException):
            todo += [pair[0] if isinstance(pair, tuple) else pair for pair in e.failures.values()]
    return seen


def _is_disk_full(error: BaseException, path: Path) -> bool:
    if any(isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) for e in _causes(error)):
        return True
    try:  # torch's zip writer loses the errno ("unexpected pos 704 vs 598"): look at the file system itself
        return shutil.disk_usage(path if path.exists() else path.parent).free < (1 << 20)
    except OSError:
        return False


def _mount_point(path: Path) -> str:
    path = Path(os.path.abspath(path))
    while not os.path.ismount(path) and path.parent != path:
        path = path.parent
    return str(path)


def _first_line(error: BaseException) -> str:
    """A one-line account of an error (DCP's CheckpointException carries each rank's whole traceback)."""
    for e in _causes(error):
        if not isinstance(e, CheckpointException):
            text = str(e).strip().splitlines()
            return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__
    return type(error).__name__


def read_trainer_state(path: Path) -> dict[str, Any]:
    return torch.load(Path(path) / TRAINER_STATE, weights_only=False)


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    rank: int | None = None, verify: bool = True) -> dict[str, Any]:
    """Restore model (and optimizer) in place; return the trainer state (step, loader, ...). With ``rank``, also
    restore that rank's RNG state (a rank the checkpoint has none for, after a change of world size, takes rank
    0's). ``verify``: check the checksums first (``verify_checkpoint``); the trainer passes False for the
    checkpoint ``newest_good_checkpoint`` has just verified."""
    path = Path(path)
    if verify and not verify_checkpoint(path):
        _warn_unverified(path)
    if not is_training_checkpoint(path):
        raise CheckpointCorrupt(f"{path}: incomplete checkpoint (missing .metadata or {TRAINER_STATE})")
    try:
        if optimizer is not None:
            state = training_state_dicts(model, optimizer)
        else:
            state = {"model": get_state_dict(model, [])[0]}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.load(state, checkpoint_id=str(path))
        if optimizer is not None:
            optim_sd = state["optim"]
            if _tied_alias(model):
                optim_sd = _rename_optim(optim_sd, "tok_embeddings.weight", "output.weight")
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=optim_sd,
                           options=_FLAT)
        else:
            set_state_dict(model, [], model_state_dict=state["model"], optim_state_dict={})
        trainer_state = read_trainer_state(path)
        if rank is not None:
            own = path / rng_file(rank)
            set_rng_state(torch.load(own if own.exists() else path / rng_file(0), weights_only=False))
    except CheckpointCorrupt:
        raise
    except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
        raise CheckpointCorrupt(f"{path}: cannot load checkpoint ({_first_line(e)})") from None
    return trainer_state


def is_training_checkpoint(path: Path) -> bool:
    return (path / ".metadata").exists() and (path / TRAINER_STATE).exists()


def load_model_from_checkpoint(path: Path):
    """The model of a training checkpoint (``checkpoints/step-N``), and its tokenizer when the shards are still
    where the run read them (else None)."""
    from herd.model.args import ModelArgs
    from herd.model.transformer import Transformer
    from herd.tokenizer import Tokenizer

    path = Path(path)
    if not is_training_checkpoint(path):
        raise CheckpointCorrupt(f"{path}: not a training checkpoint (needs .metadata and {TRAINER_STATE})")
    if not verify_checkpoint(path):
        _warn_unverified(path)
    state = read_trainer_state(path)
    model = Transformer(ModelArgs(**state["model_args"]))
    load_checkpoint(path, model, None, verify=False)
    shards = Path(state["config"]["data"]["path"])
    tokenizer = Tokenizer(shards) if (shards / "tokenizer.model").exists() else None
    return model, tokenizer
