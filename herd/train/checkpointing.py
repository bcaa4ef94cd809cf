"""Training checkpoints with torch.distributed.checkpoint (DCP): model, optimizer, loader position, RNG, step.

Each checkpoint is written to ``checkpoints/.step-N.tmp`` and renamed to ``checkpoints/step-N`` once complete and
fsynced, so a kill at any moment leaves the previous checkpoint intact and loadable; incomplete temporaries are
ignored (and cleaned up) on the next start. The last ``keep`` checkpoints are kept.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from herd.io import fsync_dir, fsync_tree

_STEP_RE = re.compile(r"step-(\d+)")
TRAINER_STATE = "trainer_state.pt"


class CheckpointCorrupt(ValueError):
    pass


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


def save_checkpoint(root: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    trainer_state: dict[str, Any], keep: int, world: Any = None) -> Path:
    """Every rank writes its shards with DCP into the temporary directory; rank 0 then writes the trainer state,
    fsyncs and renames. ``world`` (train.parallelize.World) is None for a single process."""
    main = world is None or world.is_main
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".step-{step}.tmp"
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
    if world is not None:
        world.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # single-process DCP warns that no process group exists
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    if os.environ.get("HERD_FAULT") == f"kill-in-save:{step}":  # fault injection for tests: die mid-save
        os.kill(os.getpid(), signal.SIGKILL)
    if main:
        torch.save({**trainer_state, "rng": rng_state(), "step": step}, tmp / TRAINER_STATE)
        fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
        for _, old in list_checkpoints(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    if world is not None:
        world.barrier()
    return final


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Restore model (and optimizer) in place; return the trainer state (step, loader, RNG, ...)."""
    if not (path / ".metadata").exists() or not (path / TRAINER_STATE).exists():
        raise CheckpointCorrupt(f"{path}: incomplete checkpoint (missing .metadata or {TRAINER_STATE})")
    try:
        if optimizer is not None:
            model_sd, optim_sd = get_state_dict(model, optimizer)
            state = {"model": model_sd, "optim": optim_sd}
        else:
            state = {"model": get_state_dict(model, [])[0]}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.load(state, checkpoint_id=str(path))
        if optimizer is not None:
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        else:
            set_state_dict(model, [], model_state_dict=state["model"], optim_state_dict={})
        trainer_state = torch.load(path / TRAINER_STATE, weights_only=False)
    except CheckpointCorrupt:
        raise
    except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
        raise CheckpointCorrupt(f"{path}: cannot load checkpoint ({type(e).__name__}: {e})") from None
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
    state = torch.load(path / TRAINER_STATE, weights_only=False)
    model = Transformer(ModelArgs(**state["model_args"]))
    load_checkpoint(path, model, None)
    shards = Path(state["config"]["data"]["path"])
    tokenizer = Tokenizer(shards) if (shards / "tokenizer.model").exists() else None
    return model, tokenizer
