"""What a training stage plugs into the one training loop (``loop.py``): a resumable batch source, a loss that
returns a sum and a count, and the model's keyword inputs for a batch.

Every stage (pretraining, SFT, reward modelling, DPO, scaling sweeps) is a ``Task``; the loop brings checkpoints,
exact resume, parallel layouts, rollback, SDC checks, goodput and metrics. ``LanguageModelTask`` is the next-token
loss that pretraining and supervised fine-tuning share.

Losses are normalised by what was trained: ``loss`` returns ``(sum, count)`` for one micro-batch, and the loop divides
by the count summed over the step's micro-batches and data-parallel ranks (counted from the targets before the
forward, as torchtitan does). Micro-batches that train different numbers of tokens (chat data with masked prompts)
then give the gradient of one big batch, not a mean of means.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from herd.data.loader import Batch
from herd.model.masks import document_block_mask, document_causal_mask

IGNORE_INDEX = -100  # targets that train nothing (PyTorch's and HF's convention)


class BatchSource(Protocol):
    """A resumable stream of global batches; each rank reads its data-parallel share.

    ``position`` is the stream position (what a rollback's skip list records); the whole state round-trips through
    ``state_dict`` / ``load_state_dict``."""

    @property
    def position(self) -> int: ...

    def next_batch(self, micro_batches: int = 1) -> list[Batch]: ...

    def skip_batch(self) -> None: ...

    def rewind(self) -> None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class Task(Protocol):
    """What the loop needs from a stage. Optional hooks, looked up with ``getattr`` (post-training uses them):

    - ``build_model(cfg, args) -> nn.Module``: the model to train instead of ``loop.initial_model(cfg, args)`` (a
      reward model's scalar head, LoRA adapters); parameters with ``requires_grad=False`` are not optimised.
    - ``export(model, path, tokenizer, world)``: write the final model instead of ``loop.export_model`` (every rank
      calls it; ``loop.full_state_dict`` gathers the weights on rank 0).
    - ``val_metrics() -> dict``: extra fields for the metrics record after each validation pass (every rank calls it).

    ``Batch.targets`` may be a stage's own object with ``.to(device)`` (DPO's labels and reference log-probs); such a
    stage refuses pipeline parallelism, whose schedule splits tensors."""

    train_data: BatchSource
    val_data: BatchSource | None

    def model_inputs(self, batch: Batch, device: torch.device) -> dict:
        """Keyword arguments of the model's forward for ``batch`` (attention mask, RoPE positions)."""
        ...

    def count(self, targets: Tensor) -> Tensor:
        """What one micro-batch trains (tokens, pairs, ...): the loss's normaliser, known before the forward."""
        ...

    def loss(self, output: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """``(sum, count)`` of the micro-batch's loss; ``count`` equals ``self.count(targets)``."""
        ...


def causal_lm_loss(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Summed next-token cross-entropy over the targets that are not ``IGNORE_INDEX``, and their number."""
    total = F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                            reduction="sum")
    return total, (targets != IGNORE_INDEX).sum()


@dataclass
class LanguageModelTask:
    """Next-token prediction on packed windows: pretraining, and SFT with ``IGNORE_INDEX`` on untrained tokens.

    ``document_masking`` keeps attention inside each document of a window; ``per_document_positions`` restarts the
    RoPE positions at each document."""

    train_data: BatchSource
    val_data: BatchSource | None = None
    document_masking: bool = True
    per_document_positions: bool = False
    trained_logits_only: bool = False  # logits of the trained positions only (the model's ``logits_at``)

    def model_inputs(self, batch: Batch, device: torch.device) -> dict:
        mask = None
        if self.document_masking and batch.doc_ids is not None:
            doc_ids = batch.doc_ids.to(device)
            # FlexAttention has no backward on CPU: the dense SDPA mask there (same values, tested against each other).
            mask = document_block_mask(doc_ids) if device.type == "cuda" else document_causal_mask(doc_ids)
        positions = batch.positions.to(device) if self.per_document_positions else None
        inputs = {"mask": mask, "positions": positions}
        if self.trained_logits_only:
            inputs["logits_at"] = batch.targets.to(device) != IGNORE_INDEX
        return inputs

    def count(self, targets: Tensor) -> Tensor:
        return (targets != IGNORE_INDEX).sum()

    def loss(self, output: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        if output.dim() == 2:  # [N, vocab]: the logits of the trained positions only, in row-major order
            targets = targets[targets != IGNORE_INDEX]
        return causal_lm_loss(output, targets)
