"""The Llama 3 / 3.1 / 3.2 decoder for one device, readable top to bottom.

RMSNorm -> RoPE (with Llama 3.1 frequency scaling) -> Attention (grouped-query, optional KV cache) -> FeedForward
(SwiGLU) -> TransformerBlock -> Transformer.

Parameter names are Meta's (``wq wk wv wo``, ``w1 w2 w3``, ``attention_norm``, ``ffn_norm``, ``tok_embeddings``,
``output``), so a Meta ``consolidated.pth`` loads directly and ``checkpoint/hf.py`` maps HF names onto these.

The model does not know how it is parallelised, compiled or checkpointed: ``train/`` applies that from outside.
Two hooks serve the other stages without touching this file:

- ``forward(tokens, positions=None, mask=None, cache=None, cache_pos=None, last_only=False, logits_at=None)``:
  ``positions`` are the RoPE positions (per-document positions for packed training, each sequence's own positions
  when decoding), ``mask`` is an attention mask (None means causal; a boolean tensor ``[B, 1, S, T]`` with True = may
  attend; or a FlexAttention ``BlockMask``), see ``masks.py``; ``last_only`` computes the logits of the last position
  only, ``logits_at`` those of the positions a boolean ``[B, S]`` or a pair of (row, column) index tensors selects
  (the trained ones of a fine-tuning batch; the last block then computes queries and feed-forward from the first
  selected column on, since nothing before it is read).
- ``cache``: a ``KVCache`` the caller owns (``KVCache.for_model(model, batch, max_len)``; ``rows`` selects some of
  its rows, to fill one sequence of a batch); ``cache_pos`` says where the new keys/values are written (``[S]`` for
  the whole batch, or ``[B, S]`` per row). The model keeps no inference state of its own, so the same model can be
  sampled from (rejection sampling, PPO rollouts) and trained in one process.

Numerics follow Meta's reference: RMSNorm normalises in fp32 and casts back before the weight multiply; RoPE angles,
cos/sin and the rotation are computed in fp32 (the frequency table is kept in fp32 even after ``model.to(bf16)``);
softmax runs in fp32 inside SDPA.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from herd.model.args import ModelArgs

try:  # FlexAttention (torch >= 2.5); used for document masks on GPU.
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError:  # pragma: no cover - old torch
    BlockMask, flex_attention = None, None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32, cast back to the input dtype, then multiply by the weight (Meta's order, bit for bit).
        normed = F.rms_norm(x.float(), (x.size(-1),), eps=self.eps)
        return normed.type_as(x) * self.weight


# --- Rotary position embedding -----------------------------------------------------------------------------------
def rope_inv_freq(args: ModelArgs, device: torch.device | str | None = None) -> Tensor:
    """Inverse frequencies theta^(-2i/hd), i < hd/2, in fp32, with Llama 3.1 scaling when ``use_scaled_rope``."""
    hd = args.hd
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2, device=device).float() / hd))
    if not args.use_scaled_rope:
        return inv_freq
    factor, low, high = args.rope_scaling_factor, args.rope_low_freq_factor, args.rope_high_freq_factor
    old_len = args.rope_original_max_seq_len
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths (> old_len / low) are divided by the factor, short ones (< old_len / high) kept,
    # and the band in between (inclusive at both ends) interpolated smoothly.
    smooth = (old_len / wavelen - low) / (high - low)
    interpolated = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    in_band = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(in_band, interpolated, scaled)


def rope_cos_sin(inv_freq: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
    """cos/sin of position * inv_freq in fp32, laid out for ``apply_rope``: each angle's cos twice (the pair's two
    elements), its sin as (-sin, +sin); shaped ``[..., S, 1, hd]`` to broadcast over heads."""
    angles = positions.float()[..., None] * inv_freq  # [..., S, hd/2]
    cos, sin = angles.cos(), angles.sin()
    return cos.repeat_interleave(2, -1).unsqueeze(-2), torch.stack((-sin, sin), -1).flatten(-2).unsqueeze(-2)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) by the angle of pair i (Meta's interleaved layout), in fp32:
    (x0 cos - x1 sin, x1 cos + x0 sin), computed as x * cos + (x with each pair swapped) * (-sin, +sin). Eager, that
    is bit for bit the pairwise formula (a - b is a + (-b) exactly; a compiler may fuse either into FMAs), with two
    full-width multiplies instead of four half-width ones on strided views, whose backward zero-fills and copies
    (about 3x faster forward + backward on CPU)."""
    xf = x.float()
    swapped = xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return (xf * cos + swapped * sin).type_as(x)


# --- Attention ---------------------------------------------------------------------------------------------------
class KVCache:
    """Preallocated keys and values of every layer, each ``[B, n_kv_heads, max_seq_len, hd]`` (only the KV heads are
    cached). Plain tensors outside the module tree: whoever generates owns the cache, not the model."""

    def __init__(self, k: list[Tensor], v: list[Tensor]):
        self.k, self.v = k, v

    @classmethod
    def for_model(cls, model: Transformer, batch_size: int, max_seq_len: int,
                  dtype: torch.dtype | None = None) -> KVCache:
        args = model.args
        if max_seq_len > args.max_seq_len:
            raise ValueError(f"KV cache of {max_seq_len} positions exceeds the model's max_seq_len {args.max_seq_len}")
        ref = model.output.weight if model.output is not None else next(model.parameters())
        shape = (batch_size, args.n_kv_heads, max_seq_len, args.hd)
        make = [torch.zeros(shape, dtype=dtype or ref.dtype, device=ref.device) for _ in range(2 * len(model.layers))]
        return cls(make[0::2], make[1::2])

    @property
    def batch_size(self) -> int:
        return self.k[0].size(0)

    def rows(self, start: int, n: int) -> KVCache:
        """A cache over rows ``[start, start + n)`` sharing this one's storage (writes land in place)."""
        if start == 0 and n == self.batch_size:
            return self
        return KVCache([t.narrow(0, start, n) for t in self.k], [t.narrow(0, start, n) for t in self.v])

    def update(self, layer: int, cache_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write layer ``layer``'s ``k, v [B, S, n_kv, hd]`` at ``cache_pos`` (``[S]`` or ``[B, S]``); return that
        layer's whole cache."""
        ck, cv = self.k[layer], self.v[layer]
        rows = torch.arange(k.size(0), device=k.device)[:, None]
        # Advanced indices on dims 0 and 2 around a slice put the indexed dims first: the target is [B, S, n_kv, hd].
        ck[rows, :, cache_pos] = k.to(ck.dtype)
        cv[rows, :, cache_pos] = v.to(cv.dtype)
        return ck, cv


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | BlockMask | None) -> Tensor:
    """Scaled dot-product attention over ``[B, H, S, hd]`` queries and ``[B, H_kv, T, hd]`` keys/values."""
    if BlockMask is not None and isinstance(mask, BlockMask):
        return _flex_attention(q, k, v, block_mask=mask, enable_gqa=True)
    # Query head h reads KV head h // (H / H_kv); enable_gqa does that without copying the keys/values H / H_kv
    # times (which, when decoding, costs as much memory traffic as the attention itself).
    gqa = q.size(1) != k.size(1)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def _flex_attention(q: Tensor, k: Tensor, v: Tensor, **kwargs) -> Tensor:
    # FlexAttention is only fast compiled; compile once per process, lazily (eager works too, e.g. CPU forward).
    global _compiled_flex
    if q.device.type == "cpu":
        return flex_attention(q, k, v, **kwargs)
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention)
    return _compiled_flex(q, k, v, **kwargs)


_compiled_flex = None


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.hd = args.hd
        self.wq = nn.Linear(args.dim, args.n_heads * self.hd, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * self.hd, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * self.hd, bias=False)
        self.wo = nn.Linear(args.n_heads * self.hd, args.dim, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask=None, cache: KVCache | None = None,
                cache_pos: Tensor | None = None, layer: int = 0, queries_from: int = 0) -> Tensor:
        B, S, _ = x.shape
        # Head counts come from the projections' widths (-1), so a tensor-parallel shard that holds only some heads
        # runs the same code.
        xq, cos_q, sin_q = x, cos, sin
        if queries_from:
            # Only positions >= queries_from are read after this layer (see Transformer.forward): queries there,
            # keys and values everywhere, and the causal mask of those rows.
            xq, cos_q, sin_q = x[:, queries_from:], cos[..., queries_from:, :, :], sin[..., queries_from:, :, :]
            mask = causal_rows(queries_from, S, x.device) if mask is None else mask[..., queries_from:, :]
        # q, k, v in this order: it fixes the order in which backward adds their gradients into x, and pretraining's
        # golden losses are bit-exact.
        q = self.wq(xq).view(B, S - queries_from, -1, self.hd)
        k = self.wk(x).view(B, S, -1, self.hd)
        v = self.wv(x).view(B, S, -1, self.hd)
        q, k = apply_rope(q, cos_q, sin_q), apply_rope(k, cos, sin)  # keys are cached already rotated
        q = q.transpose(1, 2)  # [B, H, S, hd]
        if cache is not None:
            if cache_pos is None or mask is None:
                raise ValueError("with a KV cache, forward needs cache_pos and an explicit mask (see masks.py)")
            k, v = cache.update(layer, cache_pos, k, v)  # [B, H_kv, max_seq_len, hd]
            if isinstance(mask, Tensor) and mask.size(-1) < k.size(2):
                # The mask's width says how much of the cache can be attended to: skip the unused tail.
                k, v = k[:, :, : mask.size(-1)], v[:, :, : mask.size(-1)]
        else:
            k, v = k.transpose(1, 2), v.transpose(1, 2)
        out = attend(q, k, v, mask)  # [B, H, S, hd]
        return self.wo(out.transpose(1, 2).reshape(B, S - queries_from, -1))


def causal_rows(first: int, n: int, device: torch.device) -> Tensor:
    """Rows ``first .. n-1`` of the causal mask over ``n`` positions, ``[n - first, n]`` (True = may attend)."""
    return torch.ones(n - first, n, dtype=torch.bool, device=device).tril(first)


# --- Feed-forward and block ------------------------------------------------------------------------------------
class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)  # up

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask=None, cache: KVCache | None = None,
                cache_pos: Tensor | None = None, layer: int = 0, queries_from: int = 0) -> Tensor:
        """``queries_from``: compute the output of positions ``queries_from ..`` only (``[B, S - queries_from, dim]``;
        they still attend to every earlier position)."""
        # queries_from goes by keyword: tensor parallelism prepares the seven positional inputs only.
        residual = x[:, queries_from:] if queries_from else x
        h = residual + self.attention(self.attention_norm(x), cos, sin, mask, cache, cache_pos, layer,
                                      queries_from=queries_from)
        return h + self.feed_forward(self.ffn_norm(h))


# --- The model -------------------------------------------------------------------------------------------------
def first_column(logits_at: Tensor | tuple[Tensor, Tensor]) -> int:
    """The first column a ``logits_at`` selection (bool ``[B, S]`` or ``(rows, cols)``) reads; 0 when it is empty."""
    if isinstance(logits_at, Tensor):
        return int(logits_at.any(0).int().argmax())
    cols = logits_at[1]
    return int(cols.min()) if cols.numel() else 0


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        # A dict keyed "0", "1", ... keeps Meta's state-dict names and lets pipeline stages delete layers.
        self.layers = nn.ModuleDict({str(i): TransformerBlock(args) for i in range(args.n_layers)})
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer("inv_freq", rope_inv_freq(args), persistent=False)

    def _apply(self, fn, recurse: bool = True):
        # model.to(bf16) would round the RoPE frequencies; recompute them in fp32 on whatever device they moved to.
        super()._apply(fn, recurse)
        self.inv_freq = rope_inv_freq(self.args, device=self.inv_freq.device)
        return self

    def forward(self, tokens: Tensor, positions: Tensor | None = None, mask=None, cache: KVCache | None = None,
                cache_pos: Tensor | None = None, last_only: bool = False,
                logits_at: Tensor | tuple[Tensor, Tensor] | None = None) -> Tensor:
        """``tokens [B, S]`` (or hidden states ``[B, S, dim]`` on a pipeline stage without embeddings) -> logits.

        ``last_only`` computes logits for the last position only (a prefill needs no more, and the full
        ``[B, S, vocab]`` tensor of a long prompt can be larger than the model). ``logits_at`` (bool ``[B, S]``, or
        ``(rows, cols)`` index tensors, which may repeat a position) computes them for the selected positions only,
        returned as ``[N, vocab]`` (row-major for a boolean mask, else in the indices' order): fine-tuning
        trains the responses alone, and the prompt's share of the output layer, its ``[B, S, vocab]`` logits and
        their cross-entropy is then not spent."""
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        if positions is None:
            positions = torch.arange(h.size(1), device=h.device)
        cos, sin = rope_cos_sin(self.inv_freq, positions)
        # With logits_at, the last block's output is read from the first selected column on: its queries, attention
        # output and feed-forward start there (a fine-tuning batch's prompts are then only keys and values in it).
        # Not with a KV cache or a BlockMask (whose rows cannot be sliced).
        queries_from = 0
        if logits_at is not None and cache is None and (mask is None or isinstance(mask, Tensor)):
            queries_from = first_column(logits_at)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers.values()):
            h = layer(h, cos, sin, mask, cache, cache_pos, i, queries_from=queries_from if i == last else 0)
        if last_only:
            h = h[:, -1:]
        elif isinstance(logits_at, Tensor):
            h = h[logits_at[:, queries_from:]]
        elif logits_at is not None:
            h = h[logits_at[0], logits_at[1] - queries_from]
        h = self.norm(h) if self.norm is not None else h
        return self.output(h) if self.output is not None else h

    # --- initialisation for training from scratch ---
    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """GPT-2 / torchtitan-style init: weights ~ trunc-normal(0, 0.02), the two projections that write into the
        residual stream (``wo``, ``w2``) scaled by 1/sqrt(2 * n_layers) so the residual variance does not grow with
        depth, norms at 1, and an untied output head at std dim^-0.5 (unit-scale logits)."""
        gen = torch.Generator(device="cpu")
        if seed is not None:
            gen.manual_seed(seed)
        else:
            gen.seed()

        def normal_(t: Tensor, std: float) -> None:
            # Draw on the CPU with our own generator so the init is identical on every device and rank.
            values = torch.empty(t.shape, dtype=torch.float32).normal_(0.0, std, generator=gen)
            t.copy_(values.clamp_(-3 * std, 3 * std))

        residual_std = 0.02 / math.sqrt(2 * self.args.n_layers)
        if self.tok_embeddings is not None:
            normal_(self.tok_embeddings.weight, 0.02)
        for layer in self.layers.values():
            for lin in (layer.attention.wq, layer.attention.wk, layer.attention.wv,
                        layer.feed_forward.w1, layer.feed_forward.w3):
                normal_(lin.weight, 0.02)
            normal_(layer.attention.wo.weight, residual_std)
            normal_(layer.feed_forward.w2.weight, residual_std)
            layer.attention_norm.weight.fill_(1.0)
            layer.ffn_norm.weight.fill_(1.0)
        if self.norm is not None:
            self.norm.weight.fill_(1.0)
        if self.output is not None and not self.args.tie_embeddings:
            normal_(self.output.weight, self.args.dim ** -0.5)
        self.inv_freq = rope_inv_freq(self.args, device=self.inv_freq.device)
