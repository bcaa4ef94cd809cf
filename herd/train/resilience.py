"""Keeping a run honest when something goes wrong inside a step: bad losses and hung steps.

- ``LossGuard``: a non-finite loss or gradient norm, or (optionally) a loss spike far above the recent average,
  marks the step bad. ``train.on_bad_step = "skip"`` drops that step's update (the batch is consumed and not
  retried; the model and optimizer are untouched) and stops after ``train.max_bad_steps`` bad steps in a row;
  ``"rollback"`` restores the last checkpoint and replays from there without the offending batch (PaLM's remedy for
  spikes; at most ``max_bad_steps`` rollbacks); ``"stop"`` ends the run with an error. Either way the model never
  takes an update computed from NaN/Inf.
- ``replica_mismatch``: silent data corruption (a bad GPU computing wrong numbers without an error) makes
  data-parallel replicas, which must hold bit-identical parameters, drift apart. Every
  ``parallel.sdc_check_interval`` steps each replica checksums its parameter shards and the replicas compare; a
  mismatch names the parameter and the ranks, then rolls back (``on_bad_step = "rollback"``) or stops.
- ``StepWatchdog``: a step that runs longer than ``train.step_timeout_s`` dumps every thread's stack to stderr
  and exits with status 1 (``faulthandler``), so a launcher (torchrun ``--max-restarts``, SLURM requeue) can
  restart the job from its last checkpoint instead of waiting on it forever.

Fault injection for tests (each fires once per process): ``HERD_FAULT=nan-at:N`` poisons step N's loss,
``HERD_FAULT=hang-at:N`` hangs step N, ``HERD_FAULT=kill-rankR-at:N`` kills rank R at step N (first attempt
only), ``HERD_FAULT=corrupt-rankR-at:N`` flips a bit of one of rank R's parameters after step N (first attempt only).
The checkpointer (``checkpointing.py``) reads two more: ``kill-in-save:N`` (SIGKILL while step N's checkpoint is
written) and ``disk-full-in-save:N`` (step N's save fails with ENOSPC after DCP wrote its files).
"""

from __future__ import annotations

import faulthandler
import math
import os
import signal
import sys
import time

import torch
import torch.distributed as dist

from herd.config import ConfigError

_fired: set[str] = set()


def injected_fault(kind: str, step: int) -> bool:
    """True, once per process, when ``HERD_FAULT`` asks for fault ``kind`` at (1-based) ``step`` (once: a step
    replayed after a rollback is not poisoned again, as a bad batch that was skipped would not be)."""
    spec = f"{kind}:{step}"
    if os.environ.get("HERD_FAULT") != spec or spec in _fired:
        return False
    _fired.add(spec)
    return True


def maybe_hang(step: int) -> None:
    if injected_fault("hang-at", step):
        time.sleep(10**6)


def maybe_kill(step: int, rank: int) -> None:
    """``HERD_FAULT=kill-rankR-at:N``: rank R dies (SIGKILL) at step N, in the first attempt only (torchrun counts
    restarts in TORCHELASTIC_RESTART_COUNT), as a lost machine would."""
    if injected_fault(f"kill-rank{rank}-at", step) and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        os.kill(os.getpid(), signal.SIGKILL)


def maybe_corrupt(step: int, rank: int, params: list) -> None:
    """``HERD_FAULT=corrupt-rankR-at:N``: flip the sign bit of one element of rank R's first parameter shard after
    step N, as silent data corruption would (first attempt only)."""
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0" and injected_fault(f"corrupt-rank{rank}-at", step):
        with torch.no_grad():
            local = params[0].to_local() if hasattr(params[0], "to_local") else params[0]
            local.view(-1)[0].neg_()


class BadStepError(RuntimeError):
    pass


class SilentCorruptionError(BadStepError):
    """Replicas disagree: the run stops (non-zero exit) so a launcher can restart it from the last checkpoint."""


_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@torch.no_grad()
def replica_mismatch(model: torch.nn.Module, world) -> str | None:
    """Compare an exact checksum of every parameter shard across the data-parallel replicas (``dp_replicate``);
    None when they agree, else which parameter differs on which ranks. The checksum is the integer sum of the
    parameter's bits: any single flipped bit changes it, and it costs one read of the weights and one small
    all-gather."""
    names, sums = [], []
    for name, p in model.named_parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        bits = local.detach().contiguous().view(-1).view(_INT_VIEW[local.element_size()])
        names.append(name)
        sums.append(bits.sum(dtype=torch.int64))
    mine = torch.stack(sums)
    group = world.group("dp_replicate")
    ranks = dist.get_process_group_ranks(group)
    gathered = [torch.empty_like(mine) for _ in ranks]
    dist.all_gather(gathered, mine, group=group)
    table = torch.stack(gathered)  # [replicas, parameters]
    differs = (table != table[0]).any(dim=0)
    if not differs.any():
        return None
    i = int(differs.nonzero()[0])
    values = table[:, i].tolist()
    # A strict majority says which replica went wrong; with two replicas, report the second against the first.
    common = max(set(values), key=values.count)
    ref = common if values.count(common) > len(values) / 2 else values[0]
    odd = [r for r, v in zip(ranks, values) if v != ref]
    return (f"silent data corruption: parameter {names[i]!r} differs across data-parallel replicas "
            f"(ranks {ranks}); rank(s) {odd} disagree with rank {ranks[values.index(ref)]}")


class LossGuard:
    def __init__(self, policy: str = "skip", spike_factor: float = 0.0, max_bad_steps: int = 5,
                 warmup: int = 20, ema: float = 0.9):
        if policy not in ("skip", "rollback", "stop"):
            raise ConfigError(f"train.on_bad_step must be skip, rollback or stop, got {policy!r}")
        self.policy, self.spike_factor, self.max_bad_steps = policy, spike_factor, max_bad_steps
        self.warmup, self.ema = warmup, ema
        self.mean: float | None = None  # EMA of accepted losses
        self.accepted = 0
        self.bad_in_a_row = 0

    def check(self, step: int, loss: float, grad_norm: float) -> str | None:
        """The reason ``step`` is bad (after raising ``BadStepError`` when the policy says stop), or None."""
        reason = None
        if not math.isfinite(loss):
            reason = f"non-finite loss ({loss})"
        elif not math.isfinite(grad_norm):
            reason = f"non-finite gradient norm ({grad_norm})"
        elif (self.spike_factor > 0 and self.mean is not None and self.accepted >= self.warmup
              and loss > self.spike_factor * self.mean):
            reason = f"loss spike ({loss:.4f} > {self.spike_factor} x recent mean {self.mean:.4f})"
        if reason is None:
            self.bad_in_a_row = 0
            self.accepted += 1
            self.mean = loss if self.mean is None else self.ema * self.mean + (1 - self.ema) * loss
            return None
        self.bad_in_a_row += 1
        if self.policy == "stop":
            raise BadStepError(f"step {step}: {reason}; stopping (train.on_bad_step = 'stop')")
        if self.bad_in_a_row > self.max_bad_steps:
            raise BadStepError(f"step {step}: {reason}; {self.bad_in_a_row} bad steps in a row "
                               f"(train.max_bad_steps = {self.max_bad_steps}): stopping")
        if self.policy == "skip":
            print(f"step {step}: {reason}; update skipped", file=sys.stderr, flush=True)
        return reason


class StepWatchdog:
    """``with watchdog: <one step>``: dumps all stacks and exits(1) if the step outlives ``timeout_s`` (0: off)."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s

    def __enter__(self) -> StepWatchdog:
        if self.timeout_s > 0:
            faulthandler.dump_traceback_later(self.timeout_s, exit=True, file=sys.stderr)
        return self

    def __exit__(self, *exc) -> None:
        if self.timeout_s > 0:
            faulthandler.cancel_dump_traceback_later()


class Goodput:
    """Where the wall time of a run went, across restarts: ``productive`` (steps whose update was kept),
    ``startup`` (process start to the first step: loading, process groups, resuming), ``checkpoint`` (saving),
    ``evaluation`` (validation passes), ``lost`` (steps done before a crash and recomputed after it, and skipped bad
    steps), with ``restarts`` counted. The totals travel in each checkpoint. Time between the last logged step and a
    crash is not seen by anyone, so it is not counted."""

    KINDS = ("productive", "startup", "checkpoint", "evaluation", "lost")

    def __init__(self, prior: dict | None = None):
        self.totals = {k: 0.0 for k in self.KINDS} | {"restarts": 0}
        if prior:
            self.totals.update(prior)

    def add(self, kind: str, seconds: float) -> None:
        self.totals[kind] += seconds

    def resumed(self, lost_seconds: float) -> None:
        self.totals["restarts"] += 1
        self.totals["lost"] += lost_seconds

    def rolled_back(self, undone_seconds: float) -> None:
        """Steps counted productive that a rollback undid are lost work."""
        self.totals["productive"] -= undone_seconds
        self.totals["lost"] += undone_seconds

    @property
    def effective(self) -> float:
        """The effective-training-time fraction: productive / all accounted wall time."""
        total = sum(self.totals[k] for k in self.KINDS)
        return self.totals["productive"] / total if total > 0 else 0.0

    def report(self) -> str:
        t = self.totals
        return (f"goodput: {100 * self.effective:.1f}% effective training time (productive {t['productive']:.1f} s, "
                f"startup {t['startup']:.1f} s, checkpointing {t['checkpoint']:.1f} s, evaluation "
                f"{t['evaluation']:.1f} s, lost {t['lost']:.1f} s, restarts {t['restarts']})")
