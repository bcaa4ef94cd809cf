"""LoRA (Hu et al. 2021, arXiv 2106.09685): train low-rank adapters beside frozen weights, merge them on export.

A target projection ``y = W x`` becomes ``y = W x + (alpha / rank) * B A dropout(x)`` with ``A [rank, in]`` drawn
like PEFT / torchtune (Kaiming-uniform, a = sqrt(5)) and ``B [out, rank]`` zero, so the adapted model starts
identical to the base. Only ``A`` and ``B`` train.

    apply_lora(model, rank=8, alpha=32, dropout=0.05, target_modules=["wq", "wv"])   # in place, base frozen
    ... train ...
    save_peft_adapter(model, "out/adapter", base_model_name_or_path="meta-llama/Meta-Llama-3-8B")  # PEFT loads it
    merge_lora(model)                                                                 # W += (alpha/rank) B A
    herd.save_model(model, "out/model")                                               # a plain Llama directory

Target modules use Meta's names (``wq wk wv wo`` in attention, ``w1 w2 w3`` in the feed-forward). The defaults are
Meta's llama-recipes ``lora_config`` (rank 8, alpha 32, dropout 0.05, ``q_proj`` and ``v_proj``), which is also
PEFT's default target set for Llama.

The adapters are plain ``nn.Parameter``s on ordinary submodules (``layers.N.attention.wq.lora_a.weight``), so FSDP2
shards them with their block and DCP checkpoints them like any weight; the frozen base weight keeps its own name
(``layers.N.attention.wq.weight``), so ``merge_lora`` leaves exactly the base model's state-dict keys. Under FSDP,
export by gathering the full state dict into a plain ``Transformer`` with the same ``apply_lora`` and merging that.
Tensor parallelism is not supported with adapters (its plans expect ``nn.Linear`` projections).

The PEFT layout (``adapter_config.json`` + ``adapter_model.safetensors``) names tensors after transformers'
``LlamaForCausalLM`` wrapped in ``PeftModelForCausalLM``: ``base_model.model.model.layers.N.self_attn.q_proj.lora_A
.weight``. HF stores ``q_proj`` / ``k_proj`` rows in the rotate-half order (``checkpoint/hf.py``): a row permutation
``P`` of Meta's, so ``P (W + s B A) = P W + s (P B) A`` and only ``B`` of those two is permuted.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from herd.errors import UserError
from herd.io import atomic_directory, atomic_write_json
from herd.model.transformer import Transformer

ATTENTION_TARGETS = ("wq", "wk", "wv", "wo")
FFN_TARGETS = ("w1", "w2", "w3")
ALL_TARGETS = ATTENTION_TARGETS + FFN_TARGETS
DEFAULT_TARGET_MODULES = ("wq", "wv")  # Meta llama-recipes / PEFT's Llama default
DEFAULT_RANK, DEFAULT_ALPHA, DEFAULT_DROPOUT = 8, 32.0, 0.05

# Meta name -> transformers' LlamaForCausalLM submodule (inside each decoder layer).
HF_MODULE = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj", "wo": "self_attn.o_proj",
             "w1": "mlp.gate_proj", "w2": "mlp.down_proj", "w3": "mlp.up_proj"}
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"


class LoRALinear(nn.Module):
    """A bias-free linear layer with a frozen ``weight`` and a trainable low-rank update ``lora_b(lora_a(x))``."""

    def __init__(self, weight: nn.Parameter, rank: int, alpha: float, dropout: float):
        super().__init__()
        out_features, in_features = weight.shape
        self.weight = weight  # the base layer's own parameter (same storage, same name in the state dict)
        self.weight.requires_grad_(False)
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_a = nn.Linear(in_features, rank, bias=False, device=weight.device, dtype=weight.dtype)
        self.lora_b = nn.Linear(rank, out_features, bias=False, device=weight.device, dtype=weight.dtype)

    @property
    def in_features(self) -> int:
        return self.weight.size(1)

    @property
    def out_features(self) -> int:
        return self.weight.size(0)

    @torch.no_grad()
    def reset_adapter(self, generator: torch.Generator) -> None:
        """A ~ Kaiming-uniform (a = sqrt(5): U(-1/sqrt(in), 1/sqrt(in)), nn.Linear's and PEFT's init), B = 0."""
        bound = 1.0 / math.sqrt(self.in_features)
        values = torch.empty(self.lora_a.weight.shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
        self.lora_a.weight.copy_(values)
        self.lora_b.weight.zero_()

    def delta(self) -> Tensor:
        """The update this adapter adds to ``weight``: ``(alpha / rank) * B @ A``, in fp32."""
        return (self.lora_b.weight.float() @ self.lora_a.weight.float()) * self.scaling

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight) + self.lora_b(self.lora_a(self.dropout(x))) * self.scaling

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha}"


def _targets(model: Transformer) -> Iterator[tuple[str, nn.Module, str]]:
    """(layer index, parent module, attribute) of every projection LoRA can wrap."""
    for index, block in model.layers.items():
        block = getattr(block, "_checkpoint_wrapped_module", block)  # under activation checkpointing
        for name in ATTENTION_TARGETS:
            yield index, block.attention, name
        for name in FFN_TARGETS:
            yield index, block.feed_forward, name


def check_target_modules(target_modules: Sequence[str]) -> list[str]:
    names = list(target_modules)
    unknown = [n for n in names if n not in ALL_TARGETS]
    if unknown or not names:
        raise UserError(f"lora.target_modules: {unknown or 'empty'}; choose among {', '.join(ALL_TARGETS)} "
                        "(Meta's names for q/k/v/o and the gate/down/up projections)")
    return sorted(set(names), key=ALL_TARGETS.index)


def apply_lora(model: Transformer, rank: int = DEFAULT_RANK, alpha: float = DEFAULT_ALPHA,
               dropout: float = DEFAULT_DROPOUT, target_modules: Sequence[str] = DEFAULT_TARGET_MODULES,
               seed: int = 0) -> None:
    """Freeze every parameter of ``model`` and wrap the ``target_modules`` projections of every layer with LoRA
    adapters (in place). The adapters' ``A`` come from a generator seeded with ``seed`` (the same on every rank,
    whatever the device), ``B`` is zero: the model's outputs are unchanged until it trains."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise UserError(f"lora.rank must be a positive integer, got {rank!r}")
    if alpha <= 0:
        raise UserError(f"lora.alpha must be positive, got {alpha!r}")
    if not 0 <= dropout < 1:
        raise UserError(f"lora.dropout must be in [0, 1), got {dropout!r}")
    targets = check_target_modules(target_modules)
    if has_lora(model):
        raise UserError("the model already has LoRA adapters")
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for _, parent, name in _targets(model):
        if name not in targets:
            continue
        linear = getattr(parent, name)
        if not isinstance(linear, nn.Linear) or linear.bias is not None:
            raise UserError(f"LoRA expects bias-free nn.Linear projections, found {type(linear).__name__} at {name}")
        adapted = LoRALinear(linear.weight, rank, alpha, dropout)
        adapted.reset_adapter(gen)
        setattr(parent, name, adapted)


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def lora_modules(model: Transformer) -> Iterator[tuple[str, str, LoRALinear]]:
    """(layer index, Meta projection name, adapter) of every adapted projection, in layer order."""
    for index, parent, name in _targets(model):
        module = getattr(parent, name)
        if isinstance(module, LoRALinear):
            yield index, name, module


@torch.no_grad()
def merge_lora(model: Transformer) -> None:
    """Fold every adapter into its weight (``W += (alpha / rank) B A``, summed in fp32, stored in ``W``'s dtype) and
    put a plain ``nn.Linear`` back, so the state dict has exactly the base model's keys. All parameters are left
    trainable again (as a freshly built model's are)."""
    for _, parent, name in _targets(model):
        module = getattr(parent, name)
        if not isinstance(module, LoRALinear):
            continue
        weight = module.weight
        weight.copy_((weight.float() + module.delta()).to(weight.dtype))
        linear = nn.Linear(module.in_features, module.out_features, bias=False, device="meta")
        linear.weight = weight
        setattr(parent, name, linear)
    for p in model.parameters():
        p.requires_grad_(True)


def lora_config_of(model: Transformer) -> dict:
    """``rank``, ``alpha``, ``dropout`` and ``target_modules`` of the adapters on ``model`` (one setting for all)."""
    found = list(lora_modules(model))
    if not found:
        raise UserError("the model has no LoRA adapters")
    settings = {(m.rank, m.alpha, m.dropout.p if isinstance(m.dropout, nn.Dropout) else 0.0) for _, _, m in found}
    if len(settings) != 1:
        raise UserError(f"adapters with different settings {sorted(settings)} cannot be described by one config")
    (rank, alpha, dropout), = settings
    targets = [n for n in ALL_TARGETS if any(name == n for _, name, _ in found)]
    return {"rank": rank, "alpha": alpha, "dropout": dropout, "target_modules": targets}


def peft_state_dict(model: Transformer) -> dict[str, Tensor]:
    """The adapters under PEFT's names for ``LlamaForCausalLM`` (see the module docstring for the q/k row order)."""
    from herd.checkpoint.hf import permute_to_hf

    args = model.args
    out: dict[str, Tensor] = {}
    for index, name, module in lora_modules(model):
        a = module.lora_a.weight.detach().cpu()
        b = module.lora_b.weight.detach().cpu()
        if name == "wq":
            b = permute_to_hf(b, args.n_heads)
        elif name == "wk":
            b = permute_to_hf(b, args.n_kv_heads)
        prefix = f"base_model.model.model.layers.{index}.{HF_MODULE[name]}"
        out[f"{prefix}.lora_A.weight"] = a.contiguous()
        out[f"{prefix}.lora_B.weight"] = b.contiguous()
    return out


def peft_adapter_config(model: Transformer, base_model_name_or_path: str | None) -> dict:
    """PEFT's ``LoraConfig`` as ``adapter_config.json`` holds it (the fields PEFT needs to rebuild the adapters)."""
    cfg = lora_config_of(model)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": cfg["rank"],
        "lora_alpha": cfg["alpha"],
        "lora_dropout": cfg["dropout"],
        "target_modules": [HF_MODULE[n].split(".")[-1] for n in cfg["target_modules"]],
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }


def save_peft_adapter(model: Transformer, path: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write the adapters as a PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``),
    atomically; ``peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), path)`` loads it."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = peft_state_dict(model)
    config = peft_adapter_config(model, base_model_name_or_path)
    with atomic_directory(path, overwrite=True) as tmp:
        save_file(tensors, tmp / PEFT_WEIGHTS, metadata={"format": "pt"})
        atomic_write_json(tmp / PEFT_CONFIG, config)
    return path
