"""Pretraining, readable top to bottom: data -> model -> optimizer -> resume -> loop -> export.

``herd pretrain --config FILE.toml --run-dir DIR [--section.key=value ...]``. The run directory holds the resolved
config, ``metrics.jsonl``, TensorBoard events (when installed), ``checkpoints/step-N`` (DCP) and, at the end, the
model in HF layout (``model/``) with its tokenizer. Starting again in the same directory resumes from the latest
checkpoint with the same data order, RNG state and loss trajectory (bit-identical on CPU).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from herd.checkpoint import save_model
from herd.config import ConfigError, PretrainConfig, to_toml
from herd.data.loader import Batch, PackedLoader, split_documents
from herd.data.shards import TokenShards
from herd.io import atomic_write_text
from herd.model import flops
from herd.model.args import ModelArgs
from herd.model.masks import document_block_mask, document_causal_mask
from herd.model.transformer import Transformer
from herd.tokenizer import Tokenizer
from herd.train import checkpointing
from herd.train.metrics import MetricsLogger
from herd.train.optim import build_optimizer, lr_at
from herd.train.parallelize import World, clip_grad_norm, init_world, prepare_for_training
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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device = 'cuda' but no CUDA device is available")
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"train.device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def build_model_args(cfg: PretrainConfig, vocab_size: int) -> ModelArgs:
    try:
        overrides = {k: v for k, v in dataclasses.asdict(cfg.model).items() if k != "preset" and v is not None}
        overrides.setdefault("vocab_size", vocab_size)
        args = ModelArgs.from_name(cfg.model.preset, **overrides)
    except (KeyError, ValueError) as e:
        raise ConfigError(f"model: {e}") from None
    if args.vocab_size < vocab_size:
        raise ConfigError(f"model.vocab_size={args.vocab_size} is smaller than the tokenizer's {vocab_size} ids")
    if cfg.data.seq_len > args.max_seq_len:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds the model's max_seq_len={args.max_seq_len}")
    return args


def attention_inputs(batch: Batch, cfg: PretrainConfig, device: torch.device):
    """(mask, positions) for one micro-batch: document masking and per-document RoPE positions if configured."""
    mask = None
    if cfg.data.document_masking:
        doc_ids = batch.doc_ids.to(device)
        # FlexAttention has no backward on CPU: use the dense SDPA mask there (same values, tested against each other).
        mask = document_block_mask(doc_ids) if device.type == "cuda" else document_causal_mask(doc_ids)
    positions = batch.positions.to(device) if cfg.data.per_document_positions else None
    return mask, positions


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def peak_flops_for(device: torch.device, dtype: torch.dtype, cfg: PretrainConfig) -> tuple[float | None, str]:
    """The MFU denominator and where it came from. An unknown GPU gets none, never a silent guess."""
    if cfg.train.peak_flops > 0:
        return cfg.train.peak_flops, "config"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = flops.lookup_peak_flops(name, "bf16" if dtype == torch.bfloat16 else "fp32")
        return peak, f"table ({name})" if peak else f"unknown device {name!r}: set train.peak_flops for MFU"
    return flops.measure_peak_flops("cpu", dtype if dtype == torch.bfloat16 else torch.float32), "measured matmul"


def evaluate(step_fn: StepRunner, loader: PackedLoader, cfg: PretrainConfig) -> float:
    """Mean loss over the first ``val_batches`` validation batches (always the same ones: no zig-zag)."""
    loader.windows_consumed = 0
    losses = [step_fn.eval_loss(loader.next_batch()[0]) for _ in range(cfg.train.val_batches)]
    return step_fn.world.mean(sum(losses) / len(losses))


def pretrain(cfg: PretrainConfig, run_dir: str | Path) -> list[dict]:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    device = resolve_device(cfg.train.device)
    if not cfg.data.path:
        raise ConfigError("data.path is not set (a directory written by `herd data tokenize`)")
    shards = TokenShards.open(cfg.data.path)
    tokenizer = Tokenizer(shards.path)
    if cfg.data.tokenizer:
        configured = Tokenizer(cfg.data.tokenizer)
        if configured.fingerprint() != shards.manifest["tokenizer"]:
            raise ConfigError(f"data.tokenizer {cfg.data.tokenizer} (hash {configured.fingerprint()}) is not the "
                              f"tokenizer the shards in {cfg.data.path} were made with "
                              f"(hash {shards.manifest['tokenizer']})")
    args = build_model_args(cfg, tokenizer.n_words)
    world = init_world(cfg, args, device)  # checks the layout first; a process group only under torchrun
    try:
        return _pretrain(cfg, run_dir, device, world, t_start, shards, tokenizer, args)
    finally:
        world.close()


def _pretrain(cfg: PretrainConfig, run_dir: Path, device: torch.device, world: World, t_start: float,
              shards: TokenShards, tokenizer: Tokenizer, args: ModelArgs) -> list[dict]:
    tc = cfg.train

    # --- data (the batch split was checked with the layout) ---------------------------------------------------
    train_docs, val_docs = split_documents(shards, cfg.data.val_fraction)
    # Tensor- and pipeline-parallel peers read the same batch: the loader is split over data-parallel ranks only.
    train_loader = PackedLoader(shards, train_docs, cfg.data.seq_len, cfg.data.batch_size, cfg.data.seed,
                                rank=world.dp_rank, world_size=world.dp_size)
    val_loader = (PackedLoader(shards, val_docs, cfg.data.seq_len, cfg.data.batch_size // tc.grad_accum,
                               cfg.data.seed, rank=world.dp_rank, world_size=world.dp_size, shuffle=False)
                  if len(val_docs) and tc.val_batches > 0 else None)

    # --- model and optimizer --------------------------------------------------------------------------------
    if tc.dtype not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"train.dtype must be auto, fp32 or bf16, got {tc.dtype!r}")
    if tc.decay not in ("cosine", "linear"):
        raise ConfigError(f"train.decay must be cosine or linear, got {tc.decay!r}")
    try:
        guard = LossGuard(tc.on_bad_step, tc.spike_factor, tc.max_bad_steps)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    watchdog = StepWatchdog(tc.step_timeout_s)
    use_bf16 = tc.dtype == "bf16" or (tc.dtype == "auto" and device.type == "cuda")
    compute_dtype = torch.bfloat16 if use_bf16 else torch.float32

    def autocast():  # under FSDP, bf16 comes from its mixed-precision policy instead
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16 and world.dp_size == 1)

    model = Transformer(args)
    model.init_weights(seed=tc.seed)  # parameters stay fp32; bf16 comes from autocast (or FSDP's policy)
    model.to(device)
    step_fn = StepRunner(cfg, device, world, autocast)
    if world.pp_size > 1:
        step_fn.pipeline = build_pipeline(model, cfg, world, device, step_fn.micro_batch_loss,
                                          prepare=lambda part: prepare_for_training(part, tc, world, bf16=use_bf16))
        model = merged_view(step_fn.pipeline.parts)  # this rank's stages, under the model's own names
    else:
        prepare_for_training(model, tc, world, bf16=use_bf16)
    step_fn.model = model
    optimizer = build_optimizer(model, tc)
    params = list(dict.fromkeys(model.parameters()))

    # --- resume ---------------------------------------------------------------------------------------------
    ckpt_root = run_dir / "checkpoints"
    checkpointer = checkpointing.Checkpointer(ckpt_root, cfg.checkpoint.keep, world, cfg.checkpoint.async_save)
    if world.is_main:
        checkpointing.remove_incomplete(ckpt_root)
    world.barrier()
    skip_windows: set[int] = set()  # loader positions of batches a rollback skips

    def restore(path: Path) -> dict:
        state = checkpointing.load_checkpoint(path, model, optimizer)
        train_loader.load_state_dict(state["loader"])
        checkpointing.set_rng_state(state["rng"])
        skip_windows.update(state.get("skip_windows", ()))
        return state

    start_step = 0
    goodput = Goodput()
    latest = checkpointing.latest_checkpoint(ckpt_root)
    if latest is not None:
        state = restore(latest)
        start_step = state["step"]
        goodput = Goodput(state.get("goodput"))
        goodput.resumed(_logged_step_time_after(run_dir / "metrics.jsonl", start_step))
        if world.is_main:
            print(f"resumed from {latest} (step {start_step})")
    if world.is_main:
        atomic_write_text(run_dir / "config.toml", to_toml(cfg))

    # --- loop -----------------------------------------------------------------------------------------------
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    flops_per_token = flops.train_flops_per_token(args, cfg.data.seq_len)
    peak, peak_source = peak_flops_for(device, compute_dtype, cfg)
    logger = MetricsLogger(run_dir, resume_step=start_step, tensorboard=cfg.log.tensorboard) if world.is_main \
        else None
    if world.is_main:
        layout = " x ".join(f"{d}={n}" for d, n in world.degrees.items() if n > 1) or "one process"
        print(f"model: {flops.count_params(args):,} parameters on {device} ({compute_dtype}); "
              f"{tokens_per_step:,} tokens/step; layout: {layout}; MFU peak: {peak_source}")
    records: list[dict] = []
    bar = tqdm(total=tc.steps, initial=start_step, desc="pretrain", unit="step",
               disable=not (cfg.log.progress and world.is_main), dynamic_ncols=True)
    step_fn.train(True)
    goodput.add("startup", time.perf_counter() - t_start)
    step, rollbacks = start_step, 0
    while step < tc.steps:
        while train_loader.windows_consumed in skip_windows:
            train_loader.skip_batch()
        t0 = time.perf_counter()
        lr = lr_at(step, tc)
        for group in optimizer.param_groups:
            group["lr"] = lr
        window = train_loader.windows_consumed
        with watchdog:
            maybe_hang(step + 1)
            maybe_kill(step + 1, world.rank)
            loss_sum = step_fn.forward_backward(train_loader.next_batch(tc.grad_accum), step + 1)
            grad_norm = clip_grad_norm(params, tc.grad_clip if tc.grad_clip > 0 else float("inf"), world,
                                       step_fn.pipeline.skip_in_norm() if step_fn.pipeline else frozenset())
            loss_sum = world.mean(loss_sum)  # every rank logs, and judges the step by, the global mean loss
            skipped = guard.check(step + 1, loss_sum, grad_norm.item())
            if skipped is None:  # a bad step's gradients are dropped: the model never sees NaN/Inf updates
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        maybe_corrupt(step + 1, world.rank, params)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        goodput.add("productive" if skipped is None else "lost", dt)

        # Roll back to the last checkpoint on a bad step (skipping its batch) or on replicas that disagree.
        mismatch = None
        if skipped is None and cfg.parallel.sdc_check_interval and (step + 1) % cfg.parallel.sdc_check_interval == 0:
            mismatch = replica_mismatch(model, world)
            if mismatch and tc.on_bad_step != "rollback":
                raise SilentCorruptionError(f"step {step + 1}: {mismatch}; stopping")
        if (skipped is not None or mismatch) and tc.on_bad_step == "rollback":
            checkpointer.wait()
            latest = checkpointing.latest_checkpoint(ckpt_root)
            if latest is not None:
                rollbacks += 1
                if rollbacks > tc.max_bad_steps:
                    raise BadStepError(f"step {step + 1}: {rollbacks} rollbacks (train.max_bad_steps = "
                                       f"{tc.max_bad_steps}): stopping")
                if skipped is not None:
                    skip_windows.add(window)
                back_to = restore(latest)["step"]
                redone = [r for r in records if r["step"] > back_to]
                goodput.rolled_back(sum(r["step_time_s"] for r in redone if "skipped" not in r))
                records = [r for r in records if r["step"] <= back_to]
                if logger is not None:
                    logger.close()
                    logger = MetricsLogger(run_dir, resume_step=back_to, tensorboard=cfg.log.tensorboard)
                    print(f"step {step + 1}: {skipped or mismatch}; rolled back to {latest}"
                          + (" and skipping that batch" if skipped is not None else ""), file=sys.stderr, flush=True)
                bar.n = step = back_to
                continue
            if mismatch:
                raise SilentCorruptionError(f"step {step + 1}: {mismatch}; no checkpoint to roll back to")
            if world.is_main:
                print(f"step {step + 1}: {skipped}; no checkpoint to roll back to yet: update skipped",
                      file=sys.stderr, flush=True)

        tps = tokens_per_step / dt
        mfu = flops_per_token * tps / (peak * world.size) if peak else None  # per-device peak, all devices
        record = {"step": step + 1, "loss": loss_sum, "lr": lr, "grad_norm": grad_norm.item(),
                  "tokens_per_s": tps, "step_time_s": dt, "mfu": mfu,
                  "memory_gb": _memory_gb(device), "tokens_seen": (step + 1) * tokens_per_step}
        if skipped is not None:
            record["skipped"] = skipped
        is_last = step + 1 == tc.steps
        if val_loader is not None and (is_last or (tc.val_interval and (step + 1) % tc.val_interval == 0)):
            t_eval = time.perf_counter()
            step_fn.train(False)
            record["val_loss"] = evaluate(step_fn, val_loader, cfg)
            step_fn.train(True)
            goodput.add("evaluation", time.perf_counter() - t_eval)
        record["goodput"] = goodput.effective
        if logger is not None:
            logger.log(record)
        records.append(record)
        bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}", refresh=False)
        bar.update(1)
        step += 1
        checkpointer.poll()
        if cfg.checkpoint.enabled and (is_last or (cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0)):
            t_save = time.perf_counter()
            checkpointer.save(step, model, optimizer, {
                "loader": train_loader.state_dict(), "config": dataclasses.asdict(cfg),
                "model_args": dataclasses.asdict(args), "goodput": dict(goodput.totals),
                "skip_windows": sorted(skip_windows)})
            goodput.add("checkpoint", time.perf_counter() - t_save)
    checkpointer.wait()
    bar.close()
    if logger is not None:
        logger.close()

    if cfg.checkpoint.export_hf:
        export_model(model, args, run_dir / "model", tokenizer, world)
    if world.is_main:
        where = f"; model in {run_dir / 'model'}" if cfg.checkpoint.export_hf else ""
        print(f"done: {tc.steps} steps in {time.perf_counter() - t_start:.1f} s{where}")
        print(goodput.report())
    return records


class StepRunner:
    """Forward and backward of one step's micro-batches: plain (with gradient accumulation) or through the
    pipeline schedule; and the validation forward."""

    def __init__(self, cfg: PretrainConfig, device: torch.device, world: World, autocast):
        self.cfg, self.device, self.world, self.autocast = cfg, device, world, autocast
        self.model: Transformer | None = None
        self.pipeline: Pipeline | None = None
        self.poison = 1.0  # NaN when fault injection poisons this step

    def micro_batch_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return loss_fn(logits, targets) * self.poison

    def inputs(self, batch: Batch) -> dict:
        """The model's keyword inputs for one batch: attention mask and RoPE positions."""
        mask, positions = attention_inputs(batch, self.cfg, self.device)
        if positions is None and self.world.degrees["tp"] > 1:
            # Under sequence parallelism the model sees only its shard of the sequence; give the positions.
            positions = torch.arange(batch.inputs.size(1), device=self.device).expand(batch.inputs.size(0), -1)
        return {"mask": mask, "positions": positions}

    def forward_backward(self, batches: list[Batch], step: int) -> float:
        """The step's mean loss (this rank's share; 0.0 on pipeline stages without the loss)."""
        self.poison = float("nan") if injected_fault("nan-at", step) else 1.0
        if self.pipeline is not None:
            (batch,) = batches
            with self.autocast():
                return self.pipeline.step(batch.inputs.to(self.device), batch.targets.to(self.device),
                                          **self.inputs(batch))
        total = 0.0
        for batch in batches:
            with self.autocast():
                logits = self.model(batch.inputs.to(self.device), **self.inputs(batch))
            loss = self.micro_batch_loss(logits, batch.targets.to(self.device)) / len(batches)
            loss.backward()
            total += loss.item()
        return total

    @torch.no_grad()
    def eval_loss(self, batch: Batch) -> float:
        with self.autocast():
            if self.pipeline is not None:
                return self.pipeline.eval_loss(batch.inputs.to(self.device), batch.targets.to(self.device),
                                               **self.inputs(batch))
            logits = self.model(batch.inputs.to(self.device), **self.inputs(batch))
        return loss_fn(logits, batch.targets.to(self.device)).item()

    def train(self, mode: bool) -> None:
        for m in self.pipeline.parts if self.pipeline is not None else [self.model]:
            m.train(mode)


def _logged_step_time_after(metrics: Path, step: int) -> float:
    """Seconds of the steps logged after ``step``: work done before a crash that a resume repeats."""
    if not metrics.exists():
        return 0.0
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return sum(r.get("step_time_s") or 0.0 for r in records if r.get("step", 0) > step)


def export_model(model: Transformer, args: ModelArgs, path: Path, tokenizer: Tokenizer, world: World) -> None:
    """The trained model as an HF-layout directory. Distributed, the full weights are gathered to rank 0 first:
    FSDP / TP shards by DCP's full state dict, pipeline stages (each a different set of layers) by gathering them."""
    if not world.distributed:
        save_model(model, path, tokenizer=tokenizer, overwrite=True)
        return
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # cpu_offload leaves the full state dict on global rank 0 only; stages other than the first need theirs too.
    pp = world.pp_size > 1
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=not pp))
    if pp:
        full = {k: v.cpu() for k, v in full.items()}
        gathered = [None] * world.size if world.is_main else None
        dist.gather_object(full, gathered, dst=0)
        full = {k: v for part in gathered for k, v in part.items()} if world.is_main else {}
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
