"""A second training task for the loop tests: next-token prediction on packed windows where a varying prefix of every
row is not trained (targets -100), so micro-batches train different numbers of tokens, as chat data with masked
prompts does. It trains through ``herd.train.loop.train`` like pretraining, with no loop code of its own.

Run as a script (also under torchrun): ``python tests/masked_task.py --config C --run-dir D [--dump-grads F]
[--section.key=value ...]``. ``--dump-grads`` runs one forward/backward of the first batch and saves the full
gradients (gathered from every shard) to F instead of training.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from herd.config import load_config
from herd.data.loader import Batch, PackedLoader
from herd.train.loop import Trainer, model_args_for, resolve_device, train
from herd.train.parallelize import init_world
from herd.train.pretrain import open_shards, packed_task
from herd.train.task import IGNORE_INDEX, LanguageModelTask


def masked_prefix(row: int, seq_len: int) -> int:
    """How many leading targets of global row ``row`` are not trained (0 to seq_len - 1, varying by row)."""
    return (row * 37) % seq_len


@dataclass
class MaskedSource:
    """A ``PackedLoader`` whose rows have their first ``masked_prefix(row)`` targets set to -100 (rows are numbered
    globally, so the pattern is the same whatever the data-parallel layout)."""

    loader: PackedLoader

    @property
    def position(self) -> int:
        return self.loader.position

    def next_batch(self, micro_batches: int = 1) -> list[Batch]:
        first_row = self.loader.position + self.loader.rank * (self.loader.batch_size // self.loader.world_size)
        batches = self.loader.next_batch(micro_batches)
        row = first_row
        for b in batches:
            b.targets = b.targets.clone()  # a view of the same window as the inputs
            for r in range(b.targets.size(0)):
                b.targets[r, : masked_prefix(row, b.targets.size(1))] = IGNORE_INDEX
                row += 1
        return batches

    def skip_batch(self) -> None:
        self.loader.skip_batch()

    def rewind(self) -> None:
        self.loader.rewind()

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)


def masked_task(cfg, shards, world) -> LanguageModelTask:
    task = packed_task(cfg, shards, world)
    task.train_data = MaskedSource(task.train_data)
    return task


def full_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every gradient as a full tensor (DTensor shards gathered)."""
    return {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().clone()
            for n, p in model.named_parameters() if p.grad is not None}


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--dump-grads", default=None)
    a, overrides = p.parse_known_args(argv)
    cfg = load_config(a.config, overrides)
    shards, tokenizer = open_shards(cfg)
    if a.dump_grads is None:
        train(cfg, a.run_dir, lambda world: masked_task(cfg, shards, world), tokenizer, name="masked")
        return
    device = resolve_device(cfg.train.device)
    args = model_args_for(cfg, tokenizer.n_words)
    world = init_world(cfg, args, device)
    finished = False
    try:
        task = masked_task(cfg, shards, world)
        trainer = Trainer(cfg, Path(a.run_dir), task, tokenizer, args, world, device, "masked")
        loss, trained = trainer.forward_backward(task.train_data.next_batch(cfg.train.grad_accum), step=1)
        grads = full_grads(trainer.model)
        if world.is_main:
            torch.save({"loss": loss, "trained": trained, "grads": grads}, a.dump_grads)
        finished = True
    finally:
        world.close(finished)


if __name__ == "__main__":
    main(sys.argv[1:])
