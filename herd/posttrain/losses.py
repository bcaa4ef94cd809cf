"""Post-training losses as pure functions of tensors (no model, no trainer), each with its formula.

Conventions: ``logits [B, S, V]`` and ``labels [B, S]`` are aligned the way herd's training targets are:
``labels[b, t]`` is the token that ``logits[b, t]`` predicts (the inputs shifted by one), and ``IGNORE_INDEX`` (-100)
marks positions that train nothing (prompt, padding, masked formatting tokens). Log-probabilities are computed in fp32.

TRL 1.x has no public loss functions (they live inside its trainers); ``tests/test_posttrain_losses.py`` checks these
against direct computations and TRL's trainers on the same model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from herd.train.task import IGNORE_INDEX


def token_logprobs(logits: Tensor, labels: Tensor) -> Tensor:
    """``[B, S]``: log p(labels[b, t] | logits[b, t]) = log softmax(logits[b, t])[labels[b, t]], and 0 where
    ``labels == IGNORE_INDEX``. (Computed as a fused cross-entropy, so no ``[B, S, V]`` log-softmax is kept.)"""
    flat = F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="none")
    return -flat.view(labels.shape)


def sequence_logprobs(logits: Tensor, labels: Tensor) -> Tensor:
    """``[B]``: log π(y | x) = Σ_t log p(labels[b, t]) over the positions whose label is not ``IGNORE_INDEX`` (summed,
    not averaged, as in DPO and TRL's ``DPOTrainer``)."""
    return token_logprobs(logits, labels).sum(dim=-1)


def nll_loss(logits: Tensor, labels: Tensor, reduction: str = "mean") -> Tensor:
    """Negative log-likelihood of the labelled tokens: ``"mean"`` = −Σ log p / (number of labelled tokens in the
    whole batch) — TRL's ``"sft"`` DPO term and SFT loss —, or ``"sum"`` = −Σ log p."""
    total = -token_logprobs(logits, labels).sum()
    if reduction == "sum":
        return total
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    return total / (labels != IGNORE_INDEX).sum().clamp(min=1)


def dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
             ref_rejected_logps: Tensor, beta: float = 0.1) -> Tensor:
    """Per-pair sigmoid DPO loss (Rafailov et al. 2023; TRL ``loss_type="sigmoid"``, label smoothing 0):

        Δ = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l)),   ℓ = −log σ(β Δ).

    Inputs are ``[P]`` sequence log-probabilities (``sequence_logprobs``); the result is ``[P]`` (average it)."""
    delta = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    return -F.logsigmoid(beta * delta)


def dpo_rewards(policy_logps: Tensor, ref_logps: Tensor, beta: float = 0.1) -> Tensor:
    """The implicit reward TRL logs: β (log π(y) − log π_ref(y))."""
    return beta * (policy_logps - ref_logps)


def reward_loss(chosen_rewards: Tensor, rejected_rewards: Tensor) -> Tensor:
    """Per-pair Bradley–Terry loss without a margin (Llama 3 dropped Llama 2's margin term; TRL ``RewardTrainer``
    without a ``margin`` column): ℓ = −log σ(r_chosen − r_rejected). ``[P]`` in, ``[P]`` out."""
    return -F.logsigmoid(chosen_rewards.float() - rejected_rewards.float())


def formatting_token_mask(ids: Tensor, tokenizer) -> Tensor:
    """Bool tensor shaped like ``ids``: True on the Llama 3 chat format's formatting tokens, which Meta masks out of
    the DPO loss in both the chosen and the rejected response (Llama 3 paper §4.1.4): the header
    ``<|start_header_id|> role <|end_header_id|>`` (both special tokens and the role name between them) and the
    termination tokens ``<|eot_id|>``, ``<|eom_id|>`` and ``<|end_of_text|>``. The mask runs along the last dim."""
    special = tokenizer.special_tokens
    start, end = special["<|start_header_id|>"], special["<|end_header_id|>"]
    terminators = [tokenizer.eot_id, tokenizer.eos_id] + ([tokenizer.eom_id] if tokenizer.eom_id is not None else [])
    is_start, is_end = ids == start, ids == end
    # Inside a header: more header starts up to here than header ends before here.
    opened = is_start.long().cumsum(-1) - (is_end.long().cumsum(-1) - is_end.long())
    return (opened > 0) | is_end | torch.isin(ids, torch.tensor(terminators, device=ids.device))
