"""LoRA: identity at init, only adapters train, merge equals the adapted forward, DCP round trip, PEFT loads the
adapter and gives herd's logits."""

from __future__ import annotations

import json

import pytest
import torch

import herd
from herd.errors import UserError
from herd.posttrain.lora import (
    LoRALinear,
    apply_lora,
    has_lora,
    lora_modules,
    merge_lora,
    save_peft_adapter,
)

TOKENS = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(3))


def random_model(seed: int = 0, vocab_size: int = 512):
    """A small untied model (2 layers, dim 64) with weights large enough that every projection matters and samples
    vary (std 0.05, head 0.5). Shared by the post-training tests."""
    args = herd.ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab_size, multiple_of=32,
                          max_seq_len=128)
    model = herd.Transformer(args).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.5 if name == "output.weight" else 0.05, generator=gen)
    return model


def _randomise_adapters(model, seed=1, std=0.05):
    """What training would do: B no longer zero (and A moved), so the adapters change the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, m in lora_modules(model):
            m.lora_a.weight.normal_(0, std, generator=gen)
            m.lora_b.weight.normal_(0, std, generator=gen)


def _adapted(targets=("wq", "wk", "wv", "wo", "w1", "w2", "w3"), rank=4, alpha=8.0, dropout=0.0, seed=0):
    model = random_model(seed=seed)
    apply_lora(model, rank=rank, alpha=alpha, dropout=dropout, target_modules=list(targets))
    return model


def test_apply_lora_starts_identical_and_freezes_the_base():
    base = random_model()
    model = _adapted()
    with torch.no_grad():
        assert torch.equal(base(TOKENS), model(TOKENS))  # B = 0: the update is exactly zero
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_a." in n or ".lora_b." in n for n in trainable)
    # 7 projections x 2 layers x (A, B)
    assert len(trainable) == 7 * 2 * 2
    # The base weights keep their names: the state dict is the base's plus the adapters.
    base_keys = set(base.state_dict())
    keys = set(model.state_dict())
    assert base_keys <= keys and all("lora_" in k for k in keys - base_keys)
    # Same seed, same adapters (every data-parallel rank builds identical A).
    other = _adapted()
    for (_, _, a), (_, _, b) in zip(lora_modules(model), lora_modules(other)):
        assert torch.equal(a.lora_a.weight, b.lora_a.weight)
        assert a.lora_a.weight.abs().max() > 0 and a.lora_b.weight.abs().max() == 0


def test_only_adapters_change_when_training():
    model = _adapted(targets=["wq", "wv"], dropout=0.1)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(2):
        logits = model(TOKENS[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), TOKENS[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in frozen.items())
    assert any(m.lora_b.weight.abs().max() > 0 for _, _, m in lora_modules(model))


def test_merge_equals_adapted_forward_and_leaves_base_keys():
    base_keys = list(random_model().state_dict())
    model = _adapted()
    _randomise_adapters(model)
    model.eval()
    with torch.no_grad():
        adapted = model(TOKENS)
        plain = random_model()(TOKENS)
    assert (adapted - plain).abs().max() > 1e-2  # the adapters matter
    merge_lora(model)
    assert not has_lora(model)
    assert list(model.state_dict()) == base_keys
    with torch.no_grad():
        merged = model(TOKENS)
    # fp32: W x + s B (A x) and (W + s B A) x differ only by rounding (~1e-6 relative on logits of order 10).
    assert (merged - adapted).abs().max() <= 1e-4 * adapted.abs().max()


def test_bad_settings_are_refused():
    model = random_model()
    with pytest.raises(UserError, match="target_modules"):
        apply_lora(model, 4, 8.0, 0.0, ["q_proj"])
    with pytest.raises(UserError, match="rank"):
        apply_lora(model, 0, 8.0, 0.0, ["wq"])
    apply_lora(model, 4, 8.0, 0.0, ["wq"])
    with pytest.raises(UserError, match="already"):
        apply_lora(model, 4, 8.0, 0.0, ["wq"])



def test_target_modules_from_toml_array_or_command_line(tmp_path):
    """``lora.target_modules`` is a TOML array, or comma-separated on the command line; the resolved config a run
    writes (``to_toml``) reads back the same; anything else names the key."""
    from herd.config import ConfigError, load_config, to_toml
    from herd.posttrain.config import SFTRunConfig

    path = tmp_path / "sft.toml"
    path.write_text('[lora]\nrank = 4\ntarget_modules = ["wq", "w2"]\n')
    cfg = load_config(path, cls=SFTRunConfig)
    assert cfg.lora.modules() == ["wq", "w2"]
    assert load_config(path, ["--lora.target_modules=wk, w1,w3"], cls=SFTRunConfig).lora.modules() == ["wk", "w1",
                                                                                                       "w3"]
    (tmp_path / "resolved.toml").write_text(to_toml(cfg))
    assert load_config(tmp_path / "resolved.toml", cls=SFTRunConfig).lora == cfg.lora
    path.write_text("[lora]\ntarget_modules = 3\n")
    with pytest.raises(ConfigError, match="lora.target_modules: expected"):
        load_config(path, cls=SFTRunConfig)
    with pytest.raises(ConfigError, match="unknown module"):
        load_config(None, ["--lora.target_modules=wq,q_proj"], cls=SFTRunConfig).lora.modules()

def test_adapters_survive_a_dcp_checkpoint(tmp_path):
    """The loop's checkpoint (DCP) saves and restores adapters and their optimizer state like any weight."""
    from herd.train.checkpointing import Checkpointer, latest_checkpoint, load_checkpoint

    model = _adapted(targets=["wq", "w2"])
    _randomise_adapters(model, seed=5)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model(TOKENS).sum().backward()
    opt.step()
    ckpt = Checkpointer(tmp_path / "ckpt", keep=1)
    ckpt.save(1, model, opt, {"step": 1})
    ckpt.wait()

    fresh = _adapted(targets=["wq", "w2"])
    fresh_opt = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad], lr=1e-3)
    load_checkpoint(latest_checkpoint(tmp_path / "ckpt"), fresh, fresh_opt)
    for (k, v), (k2, v2) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    exp_avg = [s["exp_avg"] for s in opt.state.values()]
    fresh_avg = [s["exp_avg"] for s in fresh_opt.state.values()]
    assert len(exp_avg) == 8 and all(torch.equal(a, b) for a, b in zip(exp_avg, fresh_avg))


@pytest.mark.parametrize("targets", [("wq", "wv"), ("wq", "wk", "wv", "wo", "w1", "w2", "w3")])
def test_peft_loads_the_adapter_with_herds_logits(tmp_path, targets):
    """The PEFT layout: LlamaForCausalLM + PeftModel.from_pretrained gives the logits of herd's merged model."""
    pytest.importorskip("peft")
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    base = random_model()
    herd.save_model(base, tmp_path / "base")
    model = _adapted(targets=targets, rank=4, alpha=8.0)
    _randomise_adapters(model)
    save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8.0 and config["peft_type"] == "LORA"
    merge_lora(model)
    model.eval()

    hf = LlamaForCausalLM.from_pretrained(tmp_path / "base", torch_dtype=torch.float32, attn_implementation="eager")
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    n_lora = sum(1 for n, _ in peft_model.named_parameters() if "lora_A" in n)
    assert n_lora == len(targets) * 2  # every adapter was found and loaded (PEFT warns, not fails, on misses)
    with torch.no_grad():
        ref = peft_model(TOKENS).logits
        ours = model(TOKENS)
        with peft_model.disable_adapter():
            no_adapter = peft_model(TOKENS).logits
    assert (ref - no_adapter).abs().max() > 1e-2  # the adapters are applied on PEFT's side
    # fp32, two implementations (HF rotate-half RoPE, unmerged LoRA branch vs herd's merged weights): the
    # difference is accumulated rounding, ~1e-6 relative to logits of order 10-30.
    scale = ref.abs().max()
    assert (ref - ours).abs().max() <= 1e-5 * scale, ((ref - ours).abs().max(), scale)


def test_lora_linear_is_the_formula():
    weight = torch.nn.Parameter(torch.randn(6, 5))
    layer = LoRALinear(weight, rank=2, alpha=3.0, dropout=0.0)
    with torch.no_grad():
        layer.lora_a.weight.normal_()
        layer.lora_b.weight.normal_()
    x = torch.randn(4, 5)
    expected = x @ weight.T + (3.0 / 2) * (x @ layer.lora_a.weight.T) @ layer.lora_b.weight.T
    assert torch.allclose(layer(x), expected, atol=1e-6)
