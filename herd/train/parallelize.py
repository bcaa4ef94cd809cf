"""How the model is prepared for training, applied from outside the model file (torchtitan's order):
activation checkpointing, then ``torch.compile`` per block, then FSDP2 (``fully_shard`` per block, then the root).
The model itself never changes.

Distributed runs start under torchrun (``torchrun --nproc-per-node N -m herd pretrain ...``): gloo on CPU, NCCL on
GPU. The layout (``parallel.dp_replicate`` x ``parallel.dp_shard``) is checked against the world size and the batch
before any process group is created.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from herd.config import ConfigError, PretrainConfig, TrainConfig
from herd.model.transformer import Transformer


def apply_activation_checkpointing(model: Transformer, mode: str) -> None:
    """``full``: recompute every block in backward; ``selective``: every other block (half the memory saving at
    half the recompute cost); ``none``: keep all activations."""
    if mode == "none":
        return
    if mode not in ("full", "selective"):
        raise ValueError(f"train.activation_checkpointing must be none, full or selective, got {mode!r}")
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for i, (name, block) in enumerate(list(model.layers.items())):
        if mode == "full" or i % 2 == 0:
            model.layers[name] = checkpoint_wrapper(block, preserve_rng_state=False)


def apply_compile(model: Transformer) -> None:
    """Compile each block separately: the blocks are identical, so one graph is reused and compile time stays low."""
    for block in model.layers.values():
        block.compile(fullgraph=True)


@dataclass
class World:
    """This process's place in the data-parallel layout (rank 0 of 1 without torchrun)."""

    rank: int = 0
    size: int = 1
    mesh: object = None  # a DeviceMesh when distributed

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def mean(self, value: float) -> float:
        """The mean of a per-rank float over all ranks (identity when not distributed)."""
        if not self.distributed:
            return value
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.item() / self.size

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def check_layout(cfg: PretrainConfig) -> int:
    """The data-parallel degree, after checking the layout against torchrun's world size and the batch."""
    p = cfg.parallel
    if p.dp_replicate < 1 or p.dp_shard < 1:
        raise ConfigError(f"parallel.dp_replicate and parallel.dp_shard must be >= 1, got {p.dp_replicate}, "
                          f"{p.dp_shard}")
    dp = p.dp_replicate * p.dp_shard
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if dp != world:
        raise ConfigError(f"parallel.dp_replicate x parallel.dp_shard = {dp}, but {world} process(es) were started "
                          f"(run under `torchrun --nproc-per-node {dp}`)")
    per_rank, accum = cfg.data.batch_size // dp, cfg.train.grad_accum
    if cfg.data.batch_size % dp or per_rank % accum:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} must split evenly over {dp} data-parallel ranks "
                          f"and then over train.grad_accum={accum} micro-batches")
    return dp


def init_world(cfg: PretrainConfig, device: torch.device) -> World:
    dp = check_layout(cfg)
    if dp == 1:
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
    p = cfg.parallel
    if p.dp_replicate > 1:
        mesh = init_device_mesh(device.type, (p.dp_replicate, p.dp_shard), mesh_dim_names=("dp_replicate",
                                                                                           "dp_shard"))
    else:
        mesh = init_device_mesh(device.type, (p.dp_shard,), mesh_dim_names=("dp_shard",))
    return World(rank=dist.get_rank(), size=dist.get_world_size(), mesh=mesh)


def apply_fsdp(model: Transformer, world: World, bf16: bool) -> None:
    """FSDP2: each block is one all-gather / reduce-scatter unit, the root holds embeddings, norm and output.
    With bf16, parameters are gathered in bf16 and gradients reduced in fp32 (the master weights stay fp32)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
        MixedPrecisionPolicy()
    for block in model.layers.values():
        fully_shard(block, mesh=world.mesh, mp_policy=mp)
    fully_shard(model, mesh=world.mesh, mp_policy=mp)


def prepare_for_training(model: Transformer, cfg: TrainConfig, world: World | None = None,
                         bf16: bool = False) -> Transformer:
    apply_activation_checkpointing(model, cfg.activation_checkpointing)
    if cfg.compile:
        apply_compile(model)
    if world is not None and world.distributed:
        apply_fsdp(model, world, bf16)
    return model
