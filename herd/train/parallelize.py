"""How the model is laid out over devices, applied from outside the model file (torchtitan's order): tensor
parallelism (sequence parallel on the norms), then activation checkpointing, then ``torch.compile`` per block, then
FSDP2 (``fully_shard`` per block, then the root). Pipeline parallelism (``pipeline.py``) splits the layers into
stages first and this is applied to each stage. The model itself never changes.

Distributed runs start under torchrun (``torchrun --nproc-per-node N -m herd pretrain ...``): gloo on CPU, NCCL on
GPU. One device mesh holds every dimension, outermost first: ``pp`` x ``dp_replicate`` x ``dp_shard`` x ``tp`` (tensor
parallelism innermost, where the bandwidth is). The layout is checked against the world size, the model and the batch
before any process group is created.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from herd.config import ConfigError, PretrainConfig, TrainConfig
from herd.model.args import ModelArgs
from herd.model.transformer import Transformer

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")
PP_SCHEDULES = ("gpipe", "1f1b", "interleaved")


# --- the layout ------------------------------------------------------------------------------------------------
@dataclass
class World:
    """This process's place in the mesh (rank 0 of 1 without torchrun)."""

    rank: int = 0
    size: int = 1
    mesh: object = None  # a DeviceMesh over the dimensions of degree > 1, when distributed
    degrees: dict = field(default_factory=lambda: dict.fromkeys(MESH_DIMS, 1))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def _in_mesh(self, dim: str) -> bool:
        return self.mesh is not None and dim in self.mesh.mesh_dim_names

    def coord(self, dim: str) -> int:
        """This rank's index along mesh dimension ``dim`` (0 for a dimension of degree 1)."""
        return self.mesh.get_local_rank(dim) if self._in_mesh(dim) else 0

    def group(self, dim: str):
        return self.mesh.get_group(dim)

    @property
    def dp_size(self) -> int:
        return self.degrees["dp_replicate"] * self.degrees["dp_shard"]

    @property
    def dp_rank(self) -> int:
        """Which share of the global batch this rank reads (tensor- and pipeline-parallel peers read the same)."""
        return self.coord("dp_replicate") * self.degrees["dp_shard"] + self.coord("dp_shard")

    @property
    def pp_size(self) -> int:
        return self.degrees["pp"]

    @property
    def is_last_stage(self) -> bool:
        return self.coord("pp") == self.pp_size - 1

    def submesh(self, *dims: str):
        """The mesh over those of ``dims`` that the mesh has (None when there are none)."""
        dims = tuple(d for d in dims if self._in_mesh(d))
        return self.mesh[dims] if dims else None

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    @property
    def in_first_pipeline(self) -> bool:
        """This rank's pipeline is the one global rank 0 is in (coordinate 0 on every dimension but ``pp``)."""
        return all(self.coord(d) == 0 for d in MESH_DIMS if d != "pp")

    def _all_reduce_sum(self, value: float, dtype: torch.dtype) -> float:
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        t = torch.tensor([value], dtype=dtype, device=device)
        dist.all_reduce(t)
        return t.item()

    def sum_over_dp(self, count: int) -> int:
        """A per-rank count summed over the data-parallel ranks (tensor- and pipeline-parallel peers read the same
        batch, so each data-parallel share is counted once)."""
        return self.sums_over_dp([count])[0]

    def sums_over_dp(self, counts: list[int]) -> list[int]:
        """``sum_over_dp`` of several counts in one all-reduce."""
        if not self.distributed:
            return list(counts)
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        t = torch.tensor(counts, dtype=torch.int64, device=device)
        dist.all_reduce(t)
        return [int(c) // (self.degrees["tp"] * self.pp_size) for c in t.tolist()]

    def sum_of_losses(self, value: float) -> float:
        """A per-rank loss sum added over the data-parallel ranks: taken from the last pipeline stage (the only one
        with a loss) of tensor-parallel rank 0 (its peers hold the same value)."""
        if not self.distributed:
            return value
        mine = self.is_last_stage and self.coord("tp") == 0
        return self._all_reduce_sum(value if mine else 0.0, torch.float64)

    def close(self, finished: bool = True) -> None:
        """Tear down the process group. After a run that ``finished`` on every rank, wait for all ranks first: gloo
        torn down on one rank while a peer's connection is still busy can abort that peer ("terminate called without
        an active exception"). After a failure the barrier is skipped, since a failed peer would never reach it."""
        if self.distributed and dist.is_initialized():
            if finished:
                dist.barrier()
            dist.destroy_process_group()


def check_layout(cfg: PretrainConfig, args: ModelArgs) -> dict[str, int]:
    """The degree of each mesh dimension, after checking the layout against torchrun's world size, the model and the
    batch. Raises ConfigError naming the field."""
    p = cfg.parallel
    degrees = {d: getattr(p, d) for d in MESH_DIMS}
    for d, n in degrees.items():
        if n < 1:
            raise ConfigError(f"parallel.{d} must be >= 1, got {n}")
    total = 1
    for n in degrees.values():
        total *= n
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if total != world:
        raise ConfigError(f"parallel.pp x dp_replicate x dp_shard x tp = {total}, but {world} process(es) were "
                          f"started (run under `torchrun --nproc-per-node {total}`)")
    dp = degrees["dp_replicate"] * degrees["dp_shard"]
    per_rank, accum = cfg.data.batch_size // dp, cfg.train.grad_accum
    if accum < 1:
        raise ConfigError(f"train.grad_accum must be >= 1, got {accum}")
    if cfg.data.batch_size % dp or per_rank % accum:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} must split evenly over {dp} data-parallel ranks "
                          f"and then over train.grad_accum={accum} micro-batches")
    tp = degrees["tp"]
    if tp > 1 and cfg.train.compile:
        # Seen on torch 2.13 (CPU, gloo): the backward of a compiled tensor-parallel block hands a DTensor
        # redistribute a plain-tensor gradient ("'Tensor' object has no attribute '_local_tensor'").
        raise ConfigError("train.compile=true with parallel.tp > 1 is not supported yet (the compiled "
                          "tensor-parallel block fails in backward); set train.compile=false")
    if tp > 1:
        for name, value in (("model.n_heads", args.n_heads), ("model.n_kv_heads", args.n_kv_heads),
                            ("the feed-forward hidden size", args.hidden_dim),
                            ("model.vocab_size", args.vocab_size), ("data.seq_len", cfg.data.seq_len)):
            if value % tp:
                raise ConfigError(f"parallel.tp={tp} does not divide {name} ({value})")
    pp = degrees["pp"]
    if pp > 1:
        if p.pp_schedule not in PP_SCHEDULES:
            raise ConfigError(f"parallel.pp_schedule must be one of {', '.join(PP_SCHEDULES)}, got {p.pp_schedule!r}")
        stages = pp * (2 if p.pp_schedule == "interleaved" else 1)
        if args.n_layers < stages:
            raise ConfigError(f"parallel.pp={pp} with the {p.pp_schedule} schedule needs {stages} stages, but the "
                              f"model has only {args.n_layers} layers")
        if accum != 1:
            raise ConfigError("with parallel.pp > 1, micro-batches come from parallel.pp_microbatches; "
                              f"set train.grad_accum=1 (got {accum})")
        m = microbatches(cfg)
        if per_rank % m:
            raise ConfigError(f"parallel.pp_microbatches={m} does not divide the per-rank batch of {per_rank} "
                              f"(data.batch_size={cfg.data.batch_size} over {dp} data-parallel ranks)")
        if p.pp_schedule != "gpipe" and m < pp:
            raise ConfigError(f"the {p.pp_schedule} schedule needs parallel.pp_microbatches >= parallel.pp={pp}, "
                              f"got {m}")
        if p.pp_schedule == "interleaved" and m % pp:
            raise ConfigError(f"the interleaved schedule needs parallel.pp_microbatches ({m}) to be a multiple of "
                              f"parallel.pp={pp}")
        if cfg.data.document_masking and cfg.train.device != "cpu" and torch.cuda.is_available():
            raise ConfigError("parallel.pp > 1 with data.document_masking on GPU is not supported yet (the "
                              "FlexAttention block mask cannot be split into micro-batches); set "
                              "data.document_masking=false or parallel.pp=1")
    if p.sdc_check_interval < 0:
        raise ConfigError(f"parallel.sdc_check_interval must be >= 0, got {p.sdc_check_interval}")
    if p.sdc_check_interval and degrees["dp_replicate"] < 2:
        raise ConfigError("parallel.sdc_check_interval compares parameters across data-parallel replicas: it needs "
                          f"parallel.dp_replicate >= 2 (got {degrees['dp_replicate']}); with dp_shard alone every "
                          "rank holds different shards and there is nothing to compare")
    return degrees


def microbatches(cfg: PretrainConfig) -> int:
    return cfg.parallel.pp_microbatches or cfg.parallel.pp


def init_world(cfg: PretrainConfig, args: ModelArgs, device: torch.device) -> World:
    degrees = check_layout(cfg, args)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return World()
    from torch.distributed.device_mesh import init_device_mesh

    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # torchrun's store outlives a restart: without a per-attempt prefix, a restarted rank would read the previous
    # attempt's addresses and try to connect to processes that are gone.
    store, rank, size = next(dist.rendezvous("env://"))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.PrefixStore(
        f"herd/attempt-{attempt}", store), rank=rank, world_size=size)
    # HSDP needs the shard dimension even at degree 1 (a 2-D mesh replicates; a 1-D one would shard).
    dims = tuple(d for d in MESH_DIMS if degrees[d] > 1 or (d == "dp_shard" and degrees["dp_replicate"] > 1))
    mesh = init_device_mesh(device.type, tuple(degrees[d] for d in dims), mesh_dim_names=dims)
    return World(rank=dist.get_rank(), size=dist.get_world_size(), mesh=mesh, degrees=degrees)


# --- what is applied to the model -------------------------------------------------------------------------------
def apply_tensor_parallel(model: Transformer, tp_mesh) -> None:
    """Megatron-style tensor parallelism with sequence parallelism, on DTensor: ``wq wk wv w1 w3`` split by output
    (heads / hidden units), ``wo w2`` by input with a reduce-scatter onto sequence shards; the norms run on sequence
    shards; the embedding splits the vocabulary and the output head gathers full logits. The residual stream between
    blocks stays sharded on the sequence, ``[B, S / tp, dim]``. Attention reads its local head count from the
    projections' widths, so the modules are not edited.
    Parts a pipeline stage does not hold (None) are skipped."""
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    plan = {}
    if model.tok_embeddings is not None:
        plan["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
    if model.norm is not None:
        plan["norm"] = SequenceParallel()
    if model.output is not None:
        # Logits stay sharded on the vocabulary (a DTensor): the loss runs under ``loss_parallel`` and the full
        # [B, S, vocab] tensor is never gathered on any rank (with a 128K vocabulary, the memory Meta avoided).
        plan["output"] = ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1), use_local_output=False)
    if plan:
        parallelize_module(model, tp_mesh, plan)
    if model.args.tie_embeddings and model.tok_embeddings is not None and model.output is not None:
        # Each plan replaced its module's weight with a new DTensor; tie them again (both are split on the
        # vocabulary, Shard(0), so one tensor serves both).
        model.output.weight = model.tok_embeddings.weight
    for block in model.layers.values():
        parallelize_module(block, tp_mesh, {
            "attention_norm": SequenceParallel(),
            # Attention(x, cos, sin, mask, cache, cache_pos, layer): gather the sequence of x; the rest are not
            # DTensors.
            "attention": PrepareModuleInput(input_layouts=(Shard(1),) + (None,) * 6,
                                            desired_input_layouts=(Replicate(),) + (None,) * 6),
            "attention.wq": ColwiseParallel(), "attention.wk": ColwiseParallel(), "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
            "ffn_norm": SequenceParallel(),
            "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "feed_forward.w1": ColwiseParallel(), "feed_forward.w3": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
        })
    # Parameters no plan covers (a reward model's score head) are replicated on the tensor-parallel mesh: every
    # parameter is then a DTensor, and its gradient is reduced over the sequence shards like the norms'.
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if not isinstance(param, DTensor):
                replicated = distribute_tensor(param.data, tp_mesh, [Replicate()])
                module.register_parameter(name, torch.nn.Parameter(replicated, requires_grad=param.requires_grad))


def loss_parallel():
    """Context for the loss (forward and backward) on vocabulary-sharded logits: ``torch``'s ``loss_parallel``."""
    from torch.distributed.tensor.parallel import loss_parallel as _loss_parallel

    return _loss_parallel()


AC_MODES = ("none", "full", "selective")


def _selective_policy():
    """torchtitan's op-level selective activation checkpointing: keep the outputs of the expensive ops (matmuls,
    attention, tensor-parallel reductions) except every second matmul, recompute everything else (norms,
    activations, RoPE: cheap pointwise work that holds most of the memory)."""
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    aten = torch.ops.aten
    save = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.max.default}
    for name in ("_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention",
                 "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu"):
        if hasattr(aten, name):
            save.add(getattr(aten, name).default)
    if hasattr(torch.ops, "_c10d_functional"):
        save.add(torch.ops._c10d_functional.reduce_scatter_tensor.default)

    def context_fn():
        counts = {"forward": 0, "recompute": 0}

        def policy(ctx, func, *args, **kwargs):
            mode = "recompute" if ctx.is_recompute else "forward"
            if func == aten.mm.default:
                counts[mode] += 1
            keep = func in save and not (func == aten.mm.default and counts[mode] % 2 == 0)
            return CheckpointPolicy.MUST_SAVE if keep else CheckpointPolicy.PREFER_RECOMPUTE

        return create_selective_checkpoint_contexts(policy)

    return context_fn


def apply_activation_checkpointing(model: Transformer, mode: str) -> None:
    """``full``: recompute every block in backward; ``selective``: op-level selective checkpointing of every block
    (``_selective_policy``); ``none``: keep all activations."""
    if mode == "none":
        return
    if mode not in AC_MODES:
        raise ConfigError(f"train.activation_checkpointing must be one of {', '.join(AC_MODES)}, got {mode!r}")
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    extra = {"context_fn": _selective_policy()} if mode == "selective" else {}
    for name, block in list(model.layers.items()):
        model.layers[name] = checkpoint_wrapper(block, preserve_rng_state=False, **extra)


def apply_compile(model: Transformer) -> None:
    """Compile each block separately: the blocks are identical, so one graph is reused and compile time stays low."""
    for block in model.layers.values():
        block.compile(fullgraph=True)


def apply_fsdp(model: Transformer, dp_mesh, bf16: bool) -> None:
    """FSDP2: each block is one all-gather / reduce-scatter unit, the root holds embeddings, norm and output.
    With bf16, parameters are gathered in bf16 and gradients reduced in fp32 (the master weights stay fp32).
    A 2-D ``dp_mesh`` (dp_replicate x dp_shard) gives HSDP."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
        MixedPrecisionPolicy()
    for block in model.layers.values():
        fully_shard(block, mesh=dp_mesh, mp_policy=mp)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp)


def prepare_for_training(model: Transformer, cfg: TrainConfig, world: World | None = None,
                         bf16: bool = False) -> Transformer:
    """Tensor parallel -> activation checkpointing -> compile -> FSDP2, each only where configured."""
    world = world or World()
    if world.degrees["tp"] > 1:
        apply_tensor_parallel(model, world.submesh("tp"))
    apply_activation_checkpointing(model, cfg.activation_checkpointing)
    if cfg.compile:
        apply_compile(model)
    if world.dp_size > 1:
        apply_fsdp(model, world.submesh("dp_replicate", "dp_shard"), bf16)
    return model


# --- gradients ----------------------------------------------------------------------------------------------------
def clip_grad_norm(params: list[torch.Tensor], max_norm: float, world: World,
                   skip_in_norm: set[int] = frozenset()) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over a mesh: the norm of DTensor gradients is the global one
    (``full_tensor``), and pipeline stages add their squared norms. ``skip_in_norm`` (parameter ids) are clipped
    but not counted, for a weight two stages hold (tied embeddings) that the other stage already counts."""
    grads = [p.grad for p in params if p.grad is not None and id(p) not in skip_in_norm]
    total = torch.nn.utils.get_total_norm(grads, 2.0)
    if hasattr(total, "full_tensor"):
        total = total.full_tensor()
    if world.pp_size > 1:
        squared = total.double() ** 2
        dist.all_reduce(squared, group=world.group("pp"))
        total = squared.sqrt().to(total.dtype)
    torch.nn.utils.clip_grads_with_norm_([p for p in params if p.grad is not None], max_norm, total)
    return total
