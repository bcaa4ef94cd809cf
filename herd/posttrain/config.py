"""Post-training configuration: the pretraining sections plus ``[lora]`` and ``[dpo]``, and a data section for JSONL
dialogs / preference rows. Loaded with ``herd.config.load_config(path, overrides, cls=SFTRunConfig)`` (or
``RewardRunConfig`` / ``DPORunConfig``), so unknown keys and bad values are errors naming the file and key.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from herd.config import ConfigError, DataConfig, PretrainConfig


@dataclass
class PosttrainDataConfig(DataConfig):
    path: str = ""  # JSONL: dialogs ({"messages": [...]}) for SFT, preference rows for reward / DPO
    tokenizer: str = ""  # default: the tokenizer saved in model.init_from
    seq_len: int = 2048  # SFT: tokens per packed row; reward / DPO: longest prompt + response
    batch_size: int = 8  # SFT: packed rows per step; reward / DPO: preference rows (pairs) per step
    per_document_positions: bool = True  # SFT: RoPE positions restart at each packed dialog (as if it were alone)
    val_fraction: float = 0.0  # this fraction of the rows (from the end of the file) is held out for validation
    train_on: str = "all"  # SFT: loss on "all" assistant turns or only the "last" one
    packing: bool = True  # SFT: several whole dialogs per row (attention kept inside each); false: one per row
    skip_invalid: bool = False  # bad rows (roles out of order, empty answer, too long, ...) are skipped and counted


@dataclass
class LoraConfig:
    """LoRA adapters (herd.posttrain.lora): rank 0 means full fine-tuning."""

    rank: int = 0
    alpha: float = 32.0  # Meta llama-recipes lora_config: rank 8, alpha 32, dropout 0.05, q_proj + v_proj
    dropout: float = 0.05
    # herd (Meta) names among wq wk wv wo w1 w2 w3: a TOML array, or --lora.target_modules=wq,wv
    target_modules: list[str] = field(default_factory=lambda: ["wq", "wv"])

    def modules(self) -> list[str]:
        names = list(self.target_modules)
        known = {"wq", "wk", "wv", "wo", "w1", "w2", "w3"}
        if unknown := [m for m in names if m not in known]:
            raise ConfigError(f"lora.target_modules: unknown module(s) {unknown} (known: {', '.join(sorted(known))})")
        return names


@dataclass
class DPOConfig:
    beta: float = 0.1  # Llama 3 / TRL default
    nll_coef: float = 0.2  # Llama 3: NLL on the chosen response (TRL: loss_type ["sigmoid","sft"], weights [1, 0.2])
    mask_formatting_tokens: bool = True  # Llama 3: header and end-of-turn tokens do not enter the DPO term
    ref_batch_size: int = 8  # pairs per forward of the reference pass (before training)


@dataclass
class SFTRunConfig(PretrainConfig):
    data: PosttrainDataConfig = field(default_factory=PosttrainDataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class RewardRunConfig(PretrainConfig):
    data: PosttrainDataConfig = field(default_factory=PosttrainDataConfig)


@dataclass
class DPORunConfig(PretrainConfig):
    data: PosttrainDataConfig = field(default_factory=PosttrainDataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
