"""Sampling settings and the per-row sampler: penalties, temperature, top-k, top-p, seeded draws, logprobs."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class SamplingParams:
    """How one sequence is generated. ``temperature=0`` is greedy.

    ``stop_ids`` end generation and are not part of the output; ``stop`` strings end it too, and the text is cut
    before them. ``logprobs=k`` records each new token's log-probability and its ``k`` most likely alternatives
    (``k=0``: only the token's own); ``prompt_logprobs`` does the same for every prompt token after the first (what
    an OpenAI ``echo`` + ``logprobs`` request scores). Penalties follow OpenAI / vLLM: they count generated tokens.
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    stop_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    prompt_logprobs: bool = False
    extra: dict = field(default_factory=dict, repr=False)  # caller's bookkeeping, ignored by the engine

    def validate(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs must be in [0, 20], got {self.logprobs}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop strings must be non-empty strings")


def apply_penalties(logits: Tensor, counts: Tensor, frequency: float, presence: float) -> Tensor:
    """``logits [V] - frequency * count - presence * (count > 0)``, with ``counts [V]`` of generated tokens."""
    if frequency == 0 and presence == 0:
        return logits
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


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


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]  # the k most likely (token, logprob), most likely first


def token_logprobs(logits: Tensor, tokens: Tensor, k: int) -> list[TokenLogprob]:
    """Log-probabilities of ``tokens [N]`` under ``logits [N, V]`` (of the raw model distribution, before sampling
    settings, as OpenAI reports them), each with its ``k`` most likely alternatives."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(-1, tokens[:, None]).squeeze(-1).tolist()
    if k > 0:
        top_v, top_i = logp.topk(k, dim=-1)
        tops = [list(zip(i, v)) for i, v in zip(top_i.tolist(), top_v.tolist())]
    else:
        tops = [[] for _ in chosen]
    return [TokenLogprob(t, lp, top) for t, lp, top in zip(tokens.tolist(), chosen, tops)]
