"""How the model is prepared for training, applied from outside the model file (torchtitan's order):
activation checkpointing, then ``torch.compile`` per block. The model itself never changes.
"""

from __future__ import annotations

from herd.config import TrainConfig
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


def prepare_for_training(model: Transformer, cfg: TrainConfig) -> Transformer:
    apply_activation_checkpointing(model, cfg.activation_checkpointing)
    if cfg.compile:
        apply_compile(model)
    return model
