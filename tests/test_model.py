"""Model numerics against transformers' LlamaForCausalLM on the same random weights.

Tolerance: fp32 logits within 1e-4 absolute. Both sides do the same math in fp32; the remaining differences come
from the RoPE layout (herd rotates adjacent pairs, HF rotates halves after a row permutation) and summation order
in matmuls, which leave ~1e-6 differences on logits of magnitude ~1-10.
"""

import math
from dataclasses import dataclass

import pytest
import torch

import herd
from herd.model.args import PRESETS, PUBLISHED_PARAMS, ModelArgs
from herd.model.flops import count_params
from herd.model.transformer import KVCache, rope_inv_freq

from .helpers import make_hf_model

CONFIGS = {
    "gqa-hd32-untied": dict(dim=128, n_heads=4, n_kv_heads=2),
    "mqa-hd64": dict(dim=128, n_heads=2, n_kv_heads=1),
    "mha-hd128-factor8": dict(dim=256, n_heads=2, n_kv_heads=2, rope_factor=8),
    "gqa-hd64-factor32-tied": dict(dim=256, n_heads=4, n_kv_heads=2, rope_factor=32, tied=True),
    "gqa-hd128-tied": dict(dim=256, n_heads=2, n_kv_heads=1, tied=True),
}


def _logits_both(hf_model, herd_model, tokens, start=0):
    pos = torch.arange(start, start + tokens.size(1))[None].expand(tokens.size(0), -1)
    with torch.no_grad():
        ref = hf_model(tokens, position_ids=pos).logits
        out = herd_model(tokens, positions=pos)
    return ref, out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers_fp32(tmp_path, name):
    hf_model = make_hf_model(tmp_path, **CONFIGS[name])
    model = herd.load_model(tmp_path)
    tokens = torch.randint(0, 320, (2, 48), generator=torch.Generator().manual_seed(1))
    # Far positions make the scaled low-frequency RoPE bands matter (a wrong factor would show).
    for start in (0, 20000):
        ref, out = _logits_both(hf_model, model, tokens, start)
        assert ref.abs().max() > 0.5
        assert (ref - out).abs().max().item() <= 1e-4, (name, start)


def test_wrong_rope_factor_is_detected(tmp_path):
    """The parity test above can fail: a model loaded with factor 8 instead of 32 misses at far positions."""
    hf_model = make_hf_model(tmp_path, **CONFIGS["gqa-hd64-factor32-tied"])
    model = herd.load_model(tmp_path)
    model.args.rope_scaling_factor = 8.0
    model.inv_freq = rope_inv_freq(model.args)
    tokens = torch.randint(0, 320, (1, 32))
    ref, out = _logits_both(hf_model, model, tokens, 20000)
    assert (ref - out).abs().max().item() > 1e-3


def test_logits_match_transformers_bf16(tmp_path):
    """bf16: both implementations round differently (herd keeps RoPE in fp32 like Meta; HF rounds cos/sin to bf16 and
    rotates in bf16; matmul accumulation orders differ), so the two bf16 outputs differ by a few bf16 ulps, which
    compounds over layers. The meaningful check is accuracy: against an fp32 forward of the same bf16 weights,
    herd's bf16 error must be no larger than 1.25x transformers' own bf16 error, and both stay under 5% of the
    logit scale (bf16 has 8 mantissa bits: ~0.4% per rounding, a few dozen roundings deep)."""
    hf_model = make_hf_model(tmp_path, dtype=torch.bfloat16, **CONFIGS["gqa-hd32-untied"])
    model = herd.load_model(tmp_path)
    exact = herd.load_model(tmp_path, dtype=torch.float32)
    assert model.output.weight.dtype == torch.bfloat16
    assert model.inv_freq.dtype == torch.float32
    tokens = torch.randint(0, 320, (2, 48), generator=torch.Generator().manual_seed(2))
    ref, out = _logits_both(hf_model, model, tokens)
    with torch.no_grad():
        truth = exact(tokens)
    scale = truth.abs().max()
    herd_err = (out.float() - truth).abs().max()
    hf_err = (ref.float() - truth).abs().max()
    assert herd_err <= 1.25 * hf_err
    assert max(herd_err, hf_err) <= 0.05 * scale


def test_inv_freq_matches_transformers_and_reference_vectors():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for hd, factor in ((128, 8.0), (128, 32.0), (64, 32.0)):
        args = ModelArgs(dim=hd * 4, n_layers=1, n_heads=4, use_scaled_rope=True, rope_scaling_factor=factor)
        cfg = LlamaConfig(hidden_size=hd * 4, num_attention_heads=4, max_position_embeddings=131072,
                          rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": factor,
                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                           "original_max_position_embeddings": 8192})
        ref, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
        assert torch.equal(rope_inv_freq(args), ref.float())
    # Values worked out by hand in the reference notes (fp32; last digit may differ from torch's pow).
    inv = rope_inv_freq(ModelArgs(dim=512, n_layers=1, n_heads=4, use_scaled_rope=True))
    assert inv[29].item() == pytest.approx(0.0021665706, rel=1e-6)
    assert inv[34].item() == pytest.approx(0.00017850779, rel=1e-6)
    assert inv[63].item() == pytest.approx(3.0689259e-07, rel=1e-6)
    inv = rope_inv_freq(ModelArgs(dim=256, n_layers=1, n_heads=4, use_scaled_rope=True, rope_scaling_factor=32.0))
    assert inv[15].item() == pytest.approx(0.0012905480, rel=1e-6)
    assert inv[31].item() == pytest.approx(9.4183072e-08, rel=1e-6)


def test_rope_table_stays_fp32_after_cast():
    model = herd.Transformer(PRESETS["tiny"])
    fp32 = model.inv_freq.clone()
    model.to(torch.bfloat16)
    assert model.inv_freq.dtype == torch.float32 and torch.equal(model.inv_freq, fp32)


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_preset_param_counts(name):
    args = ModelArgs.from_name(name)
    assert count_params(args) == PUBLISHED_PARAMS[name]
    with torch.device("meta"):  # the big presets are inspected without allocating memory
        model = herd.Transformer(args)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMS[name]


def test_ffn_hidden_sizes():
    expected = {"llama3-8b": 14336, "llama3-70b": 28672, "llama3.1-405b": 53248, "llama3.2-1b": 8192,
                "llama3.2-3b": 8192}
    for name, hidden in expected.items():
        assert ModelArgs.from_name(name).hidden_dim == hidden
    assert ModelArgs.from_name("llama3.2-1b").hd == 64


@dataclass
class MetaLlama3Args:
    """meta-llama/llama3's ``ModelArgs`` (llama/model.py): a strict dataclass, built as its ``Llama.build`` does:
    ``ModelArgs(max_seq_len=..., max_batch_size=..., **params)``."""

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    vocab_size: int = -1
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 500000
    max_batch_size: int = 32
    max_seq_len: int = 2048


def meta_llama_models_args(params: dict, max_seq_len: int, max_batch_size: int) -> dict:
    """meta-llama/llama-models' reading (models/llama3/args.py): unknown keys are ignored, but the runtime values are
    passed as keywords too, so a params.json that carries them gets the keyword twice (the crash herd had)."""
    known = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
             "norm_eps", "rope_theta", "use_scaled_rope", "max_batch_size", "max_seq_len"}

    def build(**kwargs):
        return {k: v for k, v in kwargs.items() if k in known}

    return build(max_seq_len=max_seq_len, max_batch_size=max_batch_size, **params)


def test_params_json_roundtrip_and_meta_loaders(tmp_path):
    for name in PRESETS:
        args = ModelArgs.from_name(name)
        assert ModelArgs.from_params(args.to_params() | args.herd_extras()) == args
        params = args.to_params()
        assert "max_seq_len" not in params and "tie_embeddings" not in params
        meta_llama_models_args(params, 8192, 4)  # raises TypeError on a duplicated keyword
        if not args.use_scaled_rope:  # Llama 3.0 shapes: what meta-llama/llama3 reads
            MetaLlama3Args(max_seq_len=8192, max_batch_size=4, **params)
    assert sorted(ModelArgs.from_name("llama3-8b").to_params()) == sorted(
        ["dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier", "norm_eps",
         "rope_theta"])
    # A written Meta directory reads back exactly (herd_params.json carries the rest) ...
    tiny = ModelArgs.from_name("tiny", vocab_size=300)
    herd.save_model(herd.Transformer(tiny), tmp_path / "meta", format="meta")
    assert herd.load_model(tmp_path / "meta").args == tiny
    # ... and without herd's extras it is what Meta's loaders see: a valid model of the same weights' shapes.
    (tmp_path / "meta" / "herd_params.json").unlink()
    assert herd.load_model(tmp_path / "meta").args.dim == tiny.dim
    with pytest.raises(ValueError, match="unknown key"):
        ModelArgs.from_params({"dim": 64, "n_layers": 1, "n_heads": 4, "dimm": 3})
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=3)


def test_kv_cache_decoding_equals_full_forward():
    from herd.model.masks import decode_mask

    torch.manual_seed(0)
    model = herd.Transformer(PRESETS["tiny"])
    model.init_weights(seed=0)
    tokens = torch.randint(0, 4000, (2, 20))
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache.for_model(model, 2, 32)
        valid = torch.zeros(2, 32, dtype=torch.bool)
        valid[:, :12] = True
        pos = torch.arange(12)[None].expand(2, -1)
        step_logits = [model(tokens[:, :12], positions=pos, mask=decode_mask(pos, valid), cache=cache,
                             cache_pos=pos)]
        for t in range(12, 20):
            valid[:, t] = True
            pos = torch.full((2, 1), t)
            step_logits.append(model(tokens[:, t:t + 1], positions=pos, mask=decode_mask(pos, valid), cache=cache,
                                     cache_pos=pos))
    assert (torch.cat(step_logits, 1) - full).abs().max() < 1e-5


def test_init_is_seeded_and_scaled():
    a, b = herd.Transformer(PRESETS["tiny"]), herd.Transformer(PRESETS["tiny"])
    a.init_weights(seed=3)
    b.init_weights(seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    wo = a.layers["0"].attention.wo.weight
    assert wo.std().item() == pytest.approx(0.02 / math.sqrt(2 * 4), rel=0.1)


@pytest.mark.parametrize("layout", ["causal", "row-positions", "dense-mask"])
def test_logits_at_equals_the_full_forward_at_those_positions(layout):
    """``logits_at`` starts the last block's queries at the first selected column (keys/values still cover every
    position). The selected logits equal the full forward's (1e-6: the same sums over other matmul shapes) and so do
    the gradients (1e-5 relative), for causal attention, per-row RoPE positions and a dense mask; the bool and
    (rows, cols) forms agree exactly. A hook checks that the last feed-forward really ran on the trimmed columns."""
    from herd.model.masks import document_causal_mask

    torch.manual_seed(0)
    model = herd.Transformer(ModelArgs.from_name("tiny", vocab_size=300, max_seq_len=64))
    model.init_weights(seed=0)
    B, S = 4, 40
    tokens = torch.randint(0, 300, (B, S))
    selected = torch.zeros(B, S, dtype=torch.bool)
    selected[0, 20:30] = selected[1, 15:] = selected[2, 33:35] = selected[3, 18] = True
    inputs = {}
    if layout == "row-positions":
        inputs["positions"] = torch.arange(S).repeat(B, 1) + torch.arange(B)[:, None]
    if layout == "dense-mask":
        doc_ids = (torch.arange(S) >= 12).long().repeat(B, 1)
        inputs["mask"] = document_causal_mask(doc_ids)
    widths = []
    model.layers[str(model.args.n_layers - 1)].feed_forward.register_forward_hook(
        lambda m, args, out: widths.append(args[0].size(1)))

    def run(trimmed: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad()
        out = model(tokens, logits_at=selected, **inputs) if trimmed else model(tokens, **inputs)[selected]
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    full, full_grads = run(False)
    trimmed, grads = run(True)
    assert widths == [S, S - 15]
    torch.testing.assert_close(trimmed, full, rtol=0, atol=1e-6)
    for name, g in full_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-5 * g.abs().max().item())
    rows, cols = selected.nonzero(as_tuple=True)
    with torch.no_grad():
        assert torch.equal(model(tokens, logits_at=(rows, cols), **inputs), model(tokens, logits_at=selected, **inputs))
