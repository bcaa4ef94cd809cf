"""Batched generation with a preallocated KV cache: prefill once, then one token per step.

Prompts of different lengths are left-padded into one batch. Every row keeps its own RoPE positions (each prompt
starts at position 0), a validity mask hides the padding slots from real tokens, and padding queries attend only to
themselves so no row of the attention is empty (an empty softmax row would produce NaN and poison the cache).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from herd.model.masks import decode_mask
from herd.model.transformer import Transformer


def sample(logits: Tensor, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
           generator: torch.Generator | None = None) -> Tensor:
    """Next token per row from ``logits [B, V]``: greedy at temperature 0, else top-k / top-p (Meta's rule: drop
    tokens whose preceding cumulative probability already exceeds p), renormalised."""
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"invalid sampling settings: temperature={temperature}, top_p={top_p}, top_k={top_k}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    if top_k > 0:
        sorted_probs[:, top_k:] = 0.0
    if top_p < 1.0:
        preceding = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs[preceding > top_p] = 0.0
    sorted_probs /= sorted_probs.sum(dim=-1, keepdim=True)
    choice = torch.multinomial(sorted_probs, 1, generator=generator)
    return order.gather(-1, choice).squeeze(-1)


@torch.no_grad()
def generate(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, stop_ids: Sequence[int] = (), seed: int | None = None
             ) -> list[list[int]]:
    """New tokens for each prompt (without the prompt; generation stops at, and excludes, a stop id)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    device = next(model.parameters()).device
    B, P = len(prompts), max(len(p) for p in prompts)
    total = min(P + max_new_tokens, model.args.max_seq_len)
    if P >= model.args.max_seq_len:
        raise ValueError(f"prompt of {P} tokens does not fit the context of {model.args.max_seq_len}")
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)

    pad = [P - len(p) for p in prompts]
    tokens = torch.tensor([[0] * n + list(p) for n, p in zip(pad, prompts)], device=device)
    offset = torch.tensor(pad, device=device)[:, None]  # slot - offset = the row's own position
    valid = torch.zeros(B, total, dtype=torch.bool, device=device)
    for b, n in enumerate(pad):
        valid[b, n:P] = True

    model.setup_caches(B, total)
    try:
        slots = torch.arange(P, device=device)[None].expand(B, P)
        mask = decode_mask(slots, valid[:, :P]) | torch.eye(P, dtype=torch.bool, device=device)
        logits = model(tokens, positions=(slots - offset).clamp(min=0), mask=mask, cache_pos=slots)[:, -1]
        out: list[list[int]] = [[] for _ in range(B)]
        done = [False] * B
        stop = set(stop_ids)
        n_new = total - P
        for i in range(n_new):
            next_tok = sample(logits, temperature, top_p, top_k, generator)
            for b, t in enumerate(next_tok.tolist()):
                if done[b]:
                    continue
                if t in stop:
                    done[b] = True
                else:
                    out[b].append(t)
            if all(done) or i == n_new - 1:
                break
            slot = P + i  # the token just sampled goes into this cache slot
            valid[:, slot] = True
            cache_pos = torch.full((B, 1), slot, device=device)
            logits = model(next_tok[:, None], positions=cache_pos - offset,
                           mask=decode_mask(cache_pos, valid[:, :slot + 1]), cache_pos=cache_pos)[:, -1]
        return out
    finally:
        model.clear_caches()
