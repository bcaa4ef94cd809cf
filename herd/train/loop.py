"""The one training loop: every stage (pretraining, SFT, reward modelling, DPO, scaling sweeps) trains through it.

``train(cfg, run_dir, make_task, tokenizer)`` builds the model (from scratch, from an HF/Meta model directory or from
a training checkpoint: ``model.init_from``), lays it out over the device mesh, resumes from the run directory's
latest checkpoint, and runs the steps of the stage's ``Task`` (``task.py``): accumulation over micro-batches, losses
normalised by what the step trained, the bad-step guard with skip / rollback / stop, cross-replica SDC checks,
validation, checkpoints, goodput, metrics, and at the end the model in HF layout. A stage brings only its data and
its loss.

The run directory holds the resolved ``config.toml``, ``metrics.jsonl``, TensorBoard events (when installed),
``checkpoints/step-N`` (DCP) and, at the end, ``model/`` with the tokenizer. Starting again in the same directory
resumes from the latest checkpoint with the same batches, RNG state and losses (bit-identical on CPU).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm import tqdm

from herd.checkpoint import load_model, read_args, save_model
from herd.config import ConfigError, PretrainConfig, to_toml
from herd.data.loader import Batch
from herd.io import atomic_write_text
from herd.model import flops
from herd.model.args import ModelArgs
from herd.model.transformer import Transformer
from herd.tokenizer import Tokenizer
from herd.train import checkpointing
from herd.train.metrics import MetricsLogger, logged_step_time_after
from herd.train.optim import build_optimizer, lr_at
from herd.train.parallelize import World, clip_grad_norm, init_world, loss_parallel, prepare_for_training
from herd.train.pipeline import Pipeline, build_pipeline, merged_view
from herd.train.resilience import (
    BadStepError,
    Goodput,
    LossGuard,
    SilentCorruptionError,
    StepWatchdog,
    injected_fault,
    maybe_corrupt,
    maybe_hang,
    maybe_kill,
    replica_mismatch,
)
from herd.train.task import Task


# --- the model: from scratch, from a model directory, or from a training checkpoint -----------------------------
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device = 'cuda' but no CUDA device is available")
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"train.device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def model_args_for(cfg: PretrainConfig, vocab_size: int) -> ModelArgs:
    """The model's shape: from ``model.init_from`` (a model directory or a training checkpoint) when set, else the
    ``model.preset`` with the ``[model]`` fields as overrides (vocabulary: the tokenizer's)."""
    fields = {k: v for k, v in dataclasses.asdict(cfg.model).items()
              if k not in ("preset", "init_from") and v is not None}
    source = cfg.model.init_from
    try:
        if not source:
            args = ModelArgs.from_name(cfg.model.preset, **({"vocab_size": vocab_size} | fields))
        else:
            args = _init_source_args(Path(source))
            for key, value in fields.items():
                if getattr(args, key) != value:
                    raise ConfigError(f"model.{key}={value!r} differs from {source}'s {getattr(args, key)!r}; "
                                      f"a model started from init_from keeps its shape (unset model.{key})")
    except (KeyError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"model: {e}") from None
    if args.vocab_size < vocab_size:
        raise ConfigError(f"model.vocab_size={args.vocab_size} is smaller than the tokenizer's {vocab_size} ids")
    if cfg.data.seq_len > args.max_seq_len:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds the model's max_seq_len={args.max_seq_len}")
    return args


def _init_source_args(path: Path) -> ModelArgs:
    if not path.exists():
        raise ConfigError(f"model.init_from: {path} does not exist")
    if checkpointing.is_training_checkpoint(path):
        return ModelArgs(**checkpointing.read_trainer_state(path)["model_args"])
    return read_args(path)


def initial_model(cfg: PretrainConfig, args: ModelArgs) -> Transformer:
    """The weights step 0 starts from (fp32 master weights): a seeded init, or ``model.init_from``'s."""
    source = cfg.model.init_from
    if not source:
        model = Transformer(args)
        model.init_weights(seed=cfg.train.seed)
        return model
    if checkpointing.is_training_checkpoint(Path(source)):
        model = Transformer(args)
        checkpointing.load_checkpoint(Path(source), model, None)
        return model
    return load_model(source, dtype=torch.float32)


def peak_flops_for(device: torch.device, dtype: torch.dtype, cfg: PretrainConfig) -> tuple[float | None, str]:
    """The MFU denominator and where it came from. An unknown GPU gets none, never a silent guess."""
    if cfg.train.peak_flops > 0:
        return cfg.train.peak_flops, "config"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = flops.lookup_peak_flops(name, "bf16" if dtype == torch.bfloat16 else "fp32")
        return peak, f"table ({name})" if peak else f"unknown device {name!r}: set train.peak_flops for MFU"
    return flops.measure_peak_flops("cpu", dtype if dtype == torch.bfloat16 else torch.float32), "measured matmul"


# --- the loop -------------------------------------------------------------------------------------------------------
def train(cfg: PretrainConfig, run_dir: str | Path, make_task: Callable[[World], Task], tokenizer: Tokenizer,
          name: str = "train") -> list[dict]:
    """Train ``make_task(world)``'s task with ``cfg``; return the per-step metrics records of this process."""
    run_dir = Path(run_dir)
    t_start = time.perf_counter()
    device = resolve_device(cfg.train.device)
    args = model_args_for(cfg, tokenizer.n_words)
    world = init_world(cfg, args, device)  # checks the layout first; a process group only under torchrun
    finished = False
    try:
        task = make_task(world)  # data sources read their data-parallel share
        run_dir.mkdir(parents=True, exist_ok=True)
        records = Trainer(cfg, run_dir, task, tokenizer, args, world, device, name).fit(t_start)
        finished = True
        return records
    finally:
        world.close(finished)


class Trainer:
    def __init__(self, cfg: PretrainConfig, run_dir: Path, task: Task, tokenizer: Tokenizer, args: ModelArgs,
                 world: World, device: torch.device, name: str):
        tc = cfg.train
        self.cfg, self.run_dir, self.task, self.tokenizer, self.args = cfg, run_dir, task, tokenizer, args
        self.world, self.device, self.name = world, device, name
        if tc.dtype not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"train.dtype must be auto, fp32 or bf16, got {tc.dtype!r}")
        if tc.decay not in ("cosine", "linear"):
            raise ConfigError(f"train.decay must be cosine or linear, got {tc.decay!r}")
        self.guard = LossGuard(tc.on_bad_step, tc.spike_factor, tc.max_bad_steps)
        self.watchdog = StepWatchdog(tc.step_timeout_s)
        self.bf16 = tc.dtype == "bf16" or (tc.dtype == "auto" and device.type == "cuda")
        self.compute_dtype = torch.bfloat16 if self.bf16 else torch.float32
        self.poison = 1.0  # NaN when fault injection poisons this step
        self.scale = 1.0  # the current step's loss normaliser (data-parallel ranks / trained units)
        self.sums: list[torch.Tensor] = []  # the raw loss sums of the step's micro-batches on this rank

        # Parameters stay fp32; bf16 comes from autocast (or FSDP's mixed-precision policy).
        # A stage may build its own model (a reward model's scalar head, LoRA adapters): ``task.build_model``.
        build = getattr(task, "build_model", None)
        model = (build(cfg, args) if build is not None else initial_model(cfg, args)).to(device)
        self.pipeline: Pipeline | None = None
        if world.pp_size > 1:
            self.pipeline = build_pipeline(model, cfg, world, device, self._pipeline_loss,
                                           prepare=lambda part: prepare_for_training(part, tc, world, bf16=self.bf16))
            model = merged_view(self.pipeline.parts)  # this rank's stages, under the model's own names
        else:
            prepare_for_training(model, tc, world, bf16=self.bf16)
        self.model = model
        self.optimizer = build_optimizer(model, tc)
        # Frozen parameters (LoRA's base weights) are neither optimised nor clipped.
        self.params = [p for p in dict.fromkeys(model.parameters()) if p.requires_grad]
        self.ckpt_root = run_dir / "checkpoints"
        self.checkpointer = checkpointing.Checkpointer(self.ckpt_root, cfg.checkpoint.keep, world,
                                                       cfg.checkpoint.async_save)
        self.skip_positions: set[int] = set()  # batch-source positions of batches a rollback skips

    # --- context managers around every forward -------------------------------------------------------------------
    def autocast(self):  # under FSDP, bf16 comes from its mixed-precision policy instead
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16 and self.world.dp_size == 1)

    def _loss_parallel(self):
        """Cross-entropy on vocabulary-sharded logits (tensor parallel): the full logits are never gathered."""
        return loss_parallel() if self.world.degrees["tp"] > 1 else nullcontext()

    # --- resume -------------------------------------------------------------------------------------------------------
    def restore(self, path: Path) -> dict:
        # newest_good_checkpoint has just verified it (on rank 0, for every rank)
        state = checkpointing.load_checkpoint(path, self.model, self.optimizer, rank=self.world.rank, verify=False)
        self.task.train_data.load_state_dict(state["loader"])
        self.skip_positions.update(state.get("skip_windows", ()))
        return state

    def newest_good_checkpoint(self) -> Path | None:
        """The newest checkpoint that verifies against its checksums; rank 0 checks and renames bad ones aside,
        then every rank takes the newest one left."""
        if self.world.is_main:
            checkpointing.newest_good_checkpoint(self.ckpt_root)
        self.world.barrier()
        return checkpointing.latest_checkpoint(self.ckpt_root)

    def fit(self, t_start: float) -> list[dict]:
        cfg, tc, world = self.cfg, self.cfg.train, self.world
        if world.is_main:
            checkpointing.remove_incomplete(self.ckpt_root)
        world.barrier()
        start_step, goodput = 0, Goodput()
        latest = self.newest_good_checkpoint()
        if latest is not None:
            state = self.restore(latest)
            start_step = state["step"]
            goodput = Goodput(state.get("goodput"))
            goodput.resumed(logged_step_time_after(self.run_dir, start_step))
            if world.is_main:
                print(f"resumed from {latest} (step {start_step})")
        if world.is_main:
            atomic_write_text(self.run_dir / "config.toml", to_toml(cfg))

        tokens_per_step = cfg.data.batch_size * cfg.data.seq_len  # the windows' size; a padding stage counts its own
        tokens_seen = state.get("tokens_seen", start_step * tokens_per_step) if latest is not None else 0
        flops_per_token = flops.train_flops_per_token(self.args, cfg.data.seq_len)
        peak, peak_source = peak_flops_for(self.device, self.compute_dtype, cfg)
        logger = self._logger(start_step)
        if world.is_main:
            layout = " x ".join(f"{d}={n}" for d, n in world.degrees.items() if n > 1) or "one process"
            print(f"model: {flops.count_params(self.args):,} parameters on {self.device} ({self.compute_dtype}); "
                  f"{tokens_per_step:,} tokens/step; layout: {layout}; MFU peak: {peak_source}")
        records: list[dict] = []
        bar = tqdm(total=tc.steps, initial=start_step, desc=self.name, unit="step",
                   disable=not (cfg.log.progress and world.is_main), dynamic_ncols=True)
        self._set_train(True)
        goodput.add("startup", time.perf_counter() - t_start)
        step, rollbacks = start_step, 0
        data = self.task.train_data
        while step < tc.steps:
            while data.position in self.skip_positions:
                data.skip_batch()
            t0 = time.perf_counter()
            lr = lr_at(step, tc)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            position = data.position
            with self.watchdog:
                maybe_hang(step + 1)
                maybe_kill(step + 1, world.rank)
                loss, trained = self.forward_backward(data.next_batch(tc.grad_accum), step + 1)
                grad_norm = clip_grad_norm(self.params, tc.grad_clip if tc.grad_clip > 0 else float("inf"), world,
                                           self.pipeline.skip_in_norm() if self.pipeline else frozenset())
                skipped = self.guard.check(step + 1, loss, grad_norm.item())
                if skipped is None:  # a bad step's gradients are dropped: the model never sees NaN/Inf updates
                    self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            maybe_corrupt(step + 1, world.rank, self.params)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            goodput.add("productive" if skipped is None else "lost", dt)

            # Roll back to the last checkpoint on a bad step (skipping its batch) or on replicas that disagree.
            mismatch, sdc_every = None, cfg.parallel.sdc_check_interval
            if skipped is None and sdc_every and (step + 1) % sdc_every == 0:
                mismatch = replica_mismatch(self.model, world)
                if mismatch and tc.on_bad_step != "rollback":
                    raise SilentCorruptionError(f"step {step + 1}: {mismatch}; stopping")
            if (skipped is not None or mismatch) and tc.on_bad_step == "rollback":
                self.checkpointer.wait()
                latest = self.newest_good_checkpoint()
                if latest is not None:
                    rollbacks += 1
                    if rollbacks > tc.max_bad_steps:
                        raise BadStepError(f"step {step + 1}: {rollbacks} rollbacks (train.max_bad_steps = "
                                           f"{tc.max_bad_steps}): stopping")
                    if skipped is not None:
                        self.skip_positions.add(position)
                    restored = self.restore(latest)
                    back_to = restored["step"]
                    tokens_seen = restored.get("tokens_seen", back_to * tokens_per_step)
                    redone = [r for r in records if r["step"] > back_to]
                    goodput.rolled_back(sum(r["step_time_s"] for r in redone if "skipped" not in r))
                    records = [r for r in records if r["step"] <= back_to]
                    if logger is not None:
                        logger.close()
                        logger = self._logger(back_to)
                        print(f"step {step + 1}: {skipped or mismatch}; rolled back to {latest}"
                              + (" and skipping that batch" if skipped is not None else ""), file=sys.stderr,
                              flush=True)
                    bar.n = step = back_to
                    continue
                if mismatch:
                    raise SilentCorruptionError(f"step {step + 1}: {mismatch}; no checkpoint to roll back to")
                if world.is_main:
                    print(f"step {step + 1}: {skipped}; no checkpoint to roll back to yet: update skipped",
                          file=sys.stderr, flush=True)

            tps = self.step_tokens / dt
            tokens_seen += self.step_tokens
            record = {"step": step + 1, "loss": loss, "lr": lr, "grad_norm": grad_norm.item(),
                      "tokens_per_s": tps, "trained_tokens": trained, "step_time_s": dt,
                      "mfu": flops.mfu(flops_per_token, tps, peak * world.size) if peak else None,
                      "memory_gb": _memory_gb(self.device), "tokens_seen": tokens_seen}
            if skipped is not None:
                record["skipped"] = skipped
            is_last = step + 1 == tc.steps
            if self.task.val_data is not None and tc.val_batches > 0 and (
                    is_last or (tc.val_interval and (step + 1) % tc.val_interval == 0)):
                t_eval = time.perf_counter()
                record["val_loss"] = self.evaluate()
                if hasattr(self.task, "val_metrics"):  # e.g. the reward model's held-out pair accuracy
                    record.update(self.task.val_metrics())
                goodput.add("evaluation", time.perf_counter() - t_eval)
            record["goodput"] = goodput.effective
            if logger is not None:
                logger.log(record)
            records.append(record)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}", refresh=False)
            bar.update(1)
            step += 1
            self.checkpointer.poll()
            if cfg.checkpoint.enabled and (is_last or (cfg.checkpoint.interval
                                                       and step % cfg.checkpoint.interval == 0)):
                t_save = time.perf_counter()
                self.checkpointer.save(step, self.model, self.optimizer, {
                    "loader": data.state_dict(), "config": dataclasses.asdict(cfg),
                    "model_args": dataclasses.asdict(self.args), "goodput": dict(goodput.totals),
                    "skip_windows": sorted(self.skip_positions), "tokens_seen": tokens_seen})
                goodput.add("checkpoint", time.perf_counter() - t_save)
        self.checkpointer.wait()
        bar.close()
        if logger is not None:
            logger.close()
        if cfg.checkpoint.export_hf:
            export = getattr(self.task, "export", None)  # a stage's own layout (reward model, LoRA adapters)
            if export is not None:
                export(self.model, self.run_dir / "model", self.tokenizer, world)
            else:
                export_model(self.model, self.args, self.run_dir / "model", self.tokenizer, world)
        if world.is_main:
            where = f"; model in {self.run_dir / 'model'}" if cfg.checkpoint.export_hf else ""
            print(f"done: {tc.steps} steps in {time.perf_counter() - t_start:.1f} s{where}")
            print(goodput.report())
        return records

    def _logger(self, resume_step: int) -> MetricsLogger | None:
        if not self.world.is_main:
            return None
        return MetricsLogger(self.run_dir, resume_step=resume_step, tensorboard=self.cfg.log.tensorboard)

    # --- one step -------------------------------------------------------------------------------------------------
    def _counts(self, batches: list[Batch]) -> tuple[int, int]:
        """What the step trains (the loss's normaliser, known before the forward) and the tokens the model reads,
        summed over the micro-batches and the data-parallel ranks in one all-reduce. The tokens are the batches'
        ``n_tokens`` where a stage pads its rows (post-training: dialogs and preference rows of varying length), else
        the full windows."""
        trained = sum(int(self.task.count(b.targets)) for b in batches)
        if any(b.n_tokens is None for b in batches):
            return self.world.sum_over_dp(trained), self.cfg.data.batch_size * self.cfg.data.seq_len
        return tuple(self.world.sums_over_dp([trained, sum(b.n_tokens for b in batches)]))

    def _pipeline_loss(self, output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.task.loss(output, targets)[0] * self.scale * self.poison

    def forward_backward(self, batches: list[Batch], step: int) -> tuple[float, int]:
        """Forward and backward of one step's micro-batches; the step's loss (sum over everything trained / count,
        the same on every rank) and the count. Gradients are those of that normalised loss."""
        self.poison = float("nan") if injected_fault("nan-at", step) else 1.0
        trained, self.step_tokens = self._counts(batches)
        # FSDP averages gradients over data-parallel ranks; multiplying by their number makes the result the gradient
        # of (sum over all ranks) / (count over all ranks).
        self.scale = self.world.dp_size / max(trained, 1)
        self.sums = []
        dev = self.device
        if self.pipeline is not None:
            (batch,) = batches
            with self.autocast(), self._loss_parallel():
                scaled = self.pipeline.step(batch.inputs.to(dev), batch.targets.to(dev), **self._inputs(batch))
            self.sums = [loss / self.scale for loss in scaled]  # poisoned ones stay NaN
        else:
            for batch in batches:
                with self.autocast(), self._loss_parallel():
                    output = self.model(batch.inputs.to(dev), **self._inputs(batch))
                    total, _ = self.task.loss(output, batch.targets.to(dev))
                    (total * self.scale * self.poison).backward()
                self.sums.append(total.detach())
        local = sum(_local_value(s) for s in self.sums) * self.poison
        return self.world.sum_of_losses(local) / max(trained, 1), trained

    def _inputs(self, batch: Batch) -> dict:
        kwargs = self.task.model_inputs(batch, self.device)
        if kwargs.get("positions") is None and self.world.degrees["tp"] > 1:
            # Under sequence parallelism the model sees only its shard of the sequence; give the positions.
            kwargs["positions"] = torch.arange(batch.inputs.size(1), device=self.device).expand(
                batch.inputs.size(0), -1)
        return kwargs

    @torch.no_grad()
    def evaluate(self) -> float:
        """Loss over the first ``val_batches`` validation batches (always the same ones), normalised like training."""
        self._set_train(False)
        data, dev = self.task.val_data, self.device
        data.rewind()
        total, count = 0.0, 0
        for _ in range(self.cfg.train.val_batches):
            (batch,) = data.next_batch(1)
            count += int(self.task.count(batch.targets))
            self.scale, self.poison = 1.0, 1.0
            with self.autocast(), self._loss_parallel():
                if self.pipeline is not None:
                    sums = self.pipeline.eval_loss(batch.inputs.to(dev), batch.targets.to(dev), **self._inputs(batch))
                else:
                    sums = [self.task.loss(self.model(batch.inputs.to(dev), **self._inputs(batch)),
                                           batch.targets.to(dev))[0]]
            total += sum(_local_value(s) for s in sums)
        self._set_train(True)
        return self.world.sum_of_losses(total) / max(self.world.sum_over_dp(count), 1)

    def _set_train(self, mode: bool) -> None:
        for m in self.pipeline.parts if self.pipeline is not None else [self.model]:
            m.train(mode)


def _local_value(t: torch.Tensor) -> float:
    """A loss on this rank as a float (a loss-parallel DTensor loss is replicated: its local value is the value)."""
    return float(t.to_local() if hasattr(t, "to_local") else t)


# --- export -----------------------------------------------------------------------------------------------------------
def full_state_dict(model: torch.nn.Module, world: World) -> dict[str, torch.Tensor]:
    """The model's full (unsharded) state dict on rank 0, on the CPU; an empty dict on the other ranks. FSDP / TP
    shards are gathered by DCP's full state dict; under pipeline parallelism each stage's full weights travel to rank 0
    from one pipeline only (the one rank 0 is in), never from every data-parallel replica. Every rank must call it."""
    if not world.distributed:
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # cpu_offload leaves the full state dict on global rank 0 only; other pipeline stages need theirs too.
    pp = world.pp_size > 1
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=not pp))
    if pp:
        if world.in_first_pipeline:
            group = world.group("pp")
            parts = [None] * world.pp_size if world.is_main else None
            dist.gather_object({k: v.cpu() for k, v in full.items()}, parts, dst=0, group=group)
            full = {k: v for part in parts for k, v in part.items()} if world.is_main else {}
        else:
            full = {}
    return full if world.is_main else {}


def export_model(model: Transformer, args: ModelArgs, path: Path, tokenizer: Tokenizer, world: World) -> None:
    """The trained model as an HF-layout directory, written by rank 0 (``full_state_dict``); a stage with its own
    layout defines ``task.export(model, path, tokenizer, world)`` instead."""
    if not world.distributed:
        save_model(model, path, tokenizer=tokenizer, overwrite=True)
        return
    full = full_state_dict(model, world)
    if world.is_main:
        plain = Transformer(args)
        plain.load_state_dict(full)
        save_model(plain, path, tokenizer=tokenizer, overwrite=True)
    world.barrier()


def _memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
