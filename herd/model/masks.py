"""Attention masks: causal, document-causal (packed training sequences), shared-prefix (a DPO pair in one row) and
decoding masks.

Convention: boolean masks, True = may attend. ``Transformer.forward(mask=None)`` means plain causal attention.

Document masking keeps attention inside each document of a packed sequence. Two backends compute the same thing:

- ``document_block_mask``: a FlexAttention ``BlockMask`` (sparse; skips fully-masked blocks). Used on GPU, where
  FlexAttention has a backward.
- ``document_causal_mask``: a dense ``[B, 1, S, S]`` block-diagonal causal mask for SDPA. Used on CPU, where
  FlexAttention has no backward (torch 2.13 raises NotImplementedError), and as the reference in tests.
"""

from __future__ import annotations

import torch
from torch import Tensor


def document_causal_mask(doc_ids: Tensor) -> Tensor:
    """``doc_ids [B, S]`` -> bool ``[B, 1, S, S]``: query i sees key j iff j <= i and both are in the same document."""
    S = doc_ids.size(-1)
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
    causal = torch.ones(S, S, dtype=torch.bool, device=doc_ids.device).tril()
    return (same_doc & causal).unsqueeze(1)


def document_block_mask(doc_ids: Tensor, block_size: int = 128):
    """The same mask as a FlexAttention ``BlockMask`` (built on ``doc_ids``' device)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        return (doc_ids[b, q_idx] == doc_ids[b, kv_idx]) & (kv_idx <= q_idx)

    B, S = doc_ids.shape
    return create_block_mask(mask_mod, B, None, S, S, device=doc_ids.device, BLOCK_SIZE=block_size)


def shared_prefix_mask(branch: Tensor) -> Tensor:
    """``branch [B, S]`` -> bool ``[B, 1, S, S]`` for rows that hold a shared prefix (branch 0) followed by branches
    1, 2, ... that each continue it (a prompt, then its chosen and its rejected response): query i sees key j iff
    j <= i and j is in the prefix or in i's own branch. Every branch then attends as if it followed the prefix alone.
    """
    S = branch.size(-1)
    visible = (branch[:, None, :] == 0) | (branch[:, :, None] == branch[:, None, :])
    causal = torch.ones(S, S, dtype=torch.bool, device=branch.device).tril()
    return (visible & causal).unsqueeze(1)


def shared_prefix_block_mask(branch: Tensor, block_size: int = 128):
    """The same mask as a FlexAttention ``BlockMask`` (built on ``branch``' device)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        return ((branch[b, kv_idx] == 0) | (branch[b, q_idx] == branch[b, kv_idx])) & (kv_idx <= q_idx)

    B, S = branch.shape
    return create_block_mask(mask_mod, B, None, S, S, device=branch.device, BLOCK_SIZE=block_size)


def document_positions(doc_ids: Tensor) -> Tensor:
    """Positions that restart at 0 at each document start: ``[B, S]`` int64."""
    B, S = doc_ids.shape
    idx = torch.arange(S, device=doc_ids.device).expand(B, S)
    is_start = torch.ones_like(doc_ids, dtype=torch.bool)
    is_start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    start_of_doc = torch.where(is_start, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - start_of_doc


def decode_mask(cache_pos: Tensor, valid: Tensor) -> Tensor:
    """Mask for a step that writes queries at ``cache_pos [B, S]`` into a KV cache.

    ``valid [B, T]`` marks which cache slots hold real tokens of each row (False for left padding). Query at slot p may
    attend to slot t iff t <= p and slot t is valid. Returns ``[B, 1, S, T]``.
    """
    T = valid.size(-1)
    slots = torch.arange(T, device=cache_pos.device)
    return ((slots[None, None, :] <= cache_pos[:, :, None]) & valid[:, None, :]).unsqueeze(1)
