"""Sampling settings and the per-row sampler: penalties, temperature, top-k, top-p, seeded draws, logprobs."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch
from torch import Tensor

from herd.errors import UserError

# The smallest positive temperature accepted. Any value >= float32's smallest normal number would sample correctly
# (the sampler divides max-subtracted logits, see ``sample``); a round floor is easier to document, and at 1e-6 the
# draw is already greedy except between logits closer than ~1e-5.
MIN_TEMPERATURE = 1e-6


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

    def validate(self) -> None:
        """Raise ``UserError`` naming the first bad field (its name starts the message). NaN and infinities are
        rejected everywhere; a positive temperature must be at least ``MIN_TEMPERATURE``."""
        if self.max_new_tokens < 0:
            raise UserError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        t = self.temperature
        if not math.isfinite(t) or t < 0 or 0 < t < MIN_TEMPERATURE:
            raise UserError(f"temperature must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE}, got {t}")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise UserError(f"top_k must be >= 0 (0: no limit), got {self.top_k}")
        for name in ("frequency_penalty", "presence_penalty"):
            if not (math.isfinite(getattr(self, name)) and -2 <= getattr(self, name) <= 2):
                raise UserError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise UserError(f"logprobs must be in [0, 20], got {self.logprobs}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise UserError("stop strings must be non-empty strings")


def generator_seed(seed: int) -> int:
    """The 64-bit seed of a sequence's ``torch.Generator``: a hash of the whole integer (any size or sign). Seeding
    torch with the integer itself would keep only its low 32 bits on CPU (mt19937), so seeds 0 and 2**32 would draw
    the same tokens; hashed, two seeds collide on CPU only with probability 2**-32."""
    digest = hashlib.blake2b(str(int(seed)).encode(), digest_size=8, person=b"herd-seed").digest()
    return int.from_bytes(digest, "little")


def apply_penalties(logits: Tensor, counts: Tensor, frequency: float, presence: float) -> Tensor:
    """``logits [V] - frequency * count - presence * (count > 0)``, with ``counts [V]`` of generated tokens."""
    if frequency == 0 and presence == 0:
        return logits
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def sample(logits: Tensor, temperature: float | Seq[float] = 0.0, top_p: float | Seq[float] = 1.0,
           top_k: int | Seq[int] = 0, generator: torch.Generator | Seq[torch.Generator | None] | None = None) -> Tensor:
    """Next token per row from ``logits [B, V]``, all rows in one call with no host synchronisation: greedy where
    the row's temperature is 0, else top-k / top-p (Meta's rule: drop tokens whose preceding cumulative probability
    already exceeds p). Settings are one value for every row or one per row; ``generator`` likewise (a seeded
    generator per row makes each row's draw independent of the others).

    The draw is the exponential race: ``argmax(p_i / E_i)`` with ``E_i ~ Exp(1)`` picks token i with probability
    p_i (what ``multinomial`` does), with no normalisation and no sync."""
    B, V = logits.shape
    temps = [float(temperature)] * B if isinstance(temperature, (int, float)) else [float(t) for t in temperature]
    greedy = logits.argmax(dim=-1)
    if all(t == 0 for t in temps):
        return greedy
    dev = logits.device
    t = torch.tensor([t if t > 0 else 1.0 for t in temps], dtype=torch.float32, device=dev)[:, None]
    # Subtract the row maximum before dividing: a tiny temperature then sends the others to -inf, never to +inf/NaN.
    z = logits.float()
    probs = torch.softmax((z - z.max(dim=-1, keepdim=True).values) / t, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    ks = [top_k] * B if isinstance(top_k, int) else list(top_k)
    ks = torch.tensor([min(k, V) for k in ks], dtype=torch.long, device=dev)[:, None]  # k >= V keeps all
    ps = torch.as_tensor(top_p, dtype=torch.float32, device=dev).expand(B)[:, None]
    ranks = torch.arange(V, device=dev)[None]
    preceding = sorted_probs.cumsum(dim=-1) - sorted_probs
    drop = ((ks > 0) & (ranks >= ks)) | ((ps < 1) & (preceding > ps))
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    noise = torch.empty_like(sorted_probs)
    gens = list(generator) if isinstance(generator, (list, tuple)) else None
    if gens is None:
        noise.exponential_(generator=generator)
    else:
        for row, gen in zip(noise, gens):
            row.exponential_(generator=gen)
    choice = (sorted_probs / noise).argmax(dim=-1, keepdim=True)
    sampled = order.gather(-1, choice).squeeze(-1)
    is_greedy = torch.tensor([t == 0 for t in temps], device=dev)
    return torch.where(is_greedy, greedy, sampled)


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
