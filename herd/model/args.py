"""Model hyper-parameters, named as in Meta's ``params.json``, and the named presets.

The field names are Meta's so that a ``params.json`` loads with ``ModelArgs(**params)``. A few fields that Meta keeps
in code rather than in the file (the RoPE scaling constants, tied embeddings, the context length) are explicit here so
that every shipped Llama 3.x model is described by data alone.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

from herd.errors import UserError


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None means n_heads (multi-head attention)
    vocab_size: int = 128256
    multiple_of: int = 256  # FFN hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    use_scaled_rope: bool = False  # Llama 3.1 frequency scaling ("llama3" rope type)
    max_seq_len: int = 8192
    tie_embeddings: bool = False  # Llama 3.2 1B/3B share the embedding with the output head
    # Llama 3.1 scaling constants (Meta hard-codes them; HF stores them under rope_scaling).
    rope_scaling_factor: float = 8.0  # 8 for 3.1/3.3, 32 for 3.2 1B/3B
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_seq_len: int = 8192
    # Overrides for checkpoints whose sizes do not follow Meta's rules (HF configs state them directly).
    head_dim: int | None = None
    ffn_hidden_dim: int | None = None

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise UserError(f"ModelArgs.{name} must be a positive integer, got {value!r}")
        for name in ("head_dim", "ffn_hidden_dim", "rope_original_max_seq_len"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise UserError(f"ModelArgs.{name} must be a positive integer, got {value!r}")
        for name in ("norm_eps", "rope_theta", "ffn_dim_multiplier", "rope_scaling_factor", "rope_low_freq_factor",
                     "rope_high_freq_factor"):
            value = getattr(self, name)
            if value is None and name == "ffn_dim_multiplier":
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not (math.isfinite(value)
                                                                                     and value > 0):
                raise UserError(f"ModelArgs.{name} must be a positive number, got {value!r}")
        for name in ("use_scaled_rope", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise UserError(f"ModelArgs.{name} must be true or false, got {getattr(self, name)!r}")
        if self.n_heads % self.n_kv_heads != 0:
            raise UserError(f"ModelArgs: n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim is None and self.dim % self.n_heads != 0:
            raise UserError(f"ModelArgs: dim={self.dim} is not a multiple of n_heads={self.n_heads}")
        if self.hd % 2 != 0:
            raise UserError(f"ModelArgs: head dimension {self.hd} must be even for rotary embeddings")

    @property
    def hd(self) -> int:
        """Per-head dimension."""
        return self.head_dim if self.head_dim is not None else self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        """FFN hidden size by Meta's rule: int(2*4*dim/3), times the multiplier (truncated), rounded up."""
        if self.ffn_hidden_dim is not None:
            return self.ffn_hidden_dim
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    # --- presets and (de)serialisation -------------------------------------------------------------------------
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> ModelArgs:
        key = name.lower().replace("_", "-")
        if key not in PRESETS:
            raise KeyError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        return dataclasses.replace(PRESETS[key], **overrides)

    @classmethod
    def from_params(cls, params: dict[str, Any], source: str = "params.json") -> ModelArgs:
        """Build from a Meta ``params.json`` dict (tolerates the nested ``{"model": {...}}`` form); errors name
        ``source`` and the key."""
        if not isinstance(params, dict):
            raise UserError(f"{source}: expected a JSON object of model settings, got a {type(params).__name__}")
        if "model" in params and isinstance(params["model"], dict):
            params = params["model"]
        known = {f.name for f in dataclasses.fields(cls)}
        # Runtime-only keys Meta sometimes writes; they do not describe the weights.
        ignored = {"max_batch_size", "vision_chunk_size", "vision_max_num_chunks", "vision_num_cross_attention_layers"}
        unknown = sorted(set(params) - known - ignored)
        if unknown:
            raise UserError(f"{source}: unknown key(s) {unknown}")
        kwargs = {k: v for k, v in params.items() if k in known}
        if "dim" not in kwargs or "n_layers" not in kwargs or "n_heads" not in kwargs:
            raise UserError(f"{source}: needs at least 'dim', 'n_layers' and 'n_heads'")
        try:
            return cls(**kwargs)
        except UserError as e:  # "ModelArgs.n_heads must be ..." -> "params.json: 'n_heads' must be ..."
            message = re.sub(r"ModelArgs[.]([a-z_]+)", r"'\1'", str(e))
            raise UserError(f"{source}: {message}") from None

    def to_params(self) -> dict[str, Any]:
        """Meta ``params.json`` content: exactly the keys Meta writes for this generation, so Meta's own loaders
        read it (``llama3``'s strict ``ModelArgs`` has no ``use_scaled_rope``, and both repositories pass
        ``max_seq_len`` themselves). Llama 3.0 shapes get the nine base keys; 3.1 / 3.2 shapes add
        ``use_scaled_rope``. What Meta's format cannot say is in ``herd_extras``."""
        out: dict[str, Any] = {
            "dim": self.dim,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "vocab_size": self.vocab_size,
            "multiple_of": self.multiple_of,
            "ffn_dim_multiplier": self.ffn_dim_multiplier,
            "norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
        }
        if self.use_scaled_rope:
            out["use_scaled_rope"] = True
        if self.ffn_hidden_dim is not None:
            # Express any hidden size through Meta's own rule: rounding floor(m * h1) up to a multiple of the
            # target hidden size gives exactly the target when 0 < floor(m * h1) <= target.
            h1 = int(2 * (4 * self.dim) / 3)
            out["multiple_of"] = self.ffn_hidden_dim
            out["ffn_dim_multiplier"] = self.ffn_hidden_dim / h1
        return out

    def herd_extras(self) -> dict[str, Any]:
        """The fields Meta's ``params.json`` has no key for, where they differ from the defaults (context length,
        tied embeddings, RoPE scaling details, an explicit head dimension): herd keeps them beside it, in
        ``herd_params.json``, so a round trip through Meta's layout is exact."""
        defaults = ModelArgs(dim=self.dim, n_layers=1, n_heads=self.n_heads)
        names = ("max_seq_len", "tie_embeddings", "rope_scaling_factor", "rope_low_freq_factor",
                 "rope_high_freq_factor", "rope_original_max_seq_len", "head_dim")
        return {name: getattr(self, name) for name in names if getattr(self, name) != getattr(defaults, name)}


def _llama(dim: int, n_layers: int, n_heads: int, multiple_of: int, mult: float, **kw: Any) -> ModelArgs:
    return ModelArgs(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=8, vocab_size=128256,
                     multiple_of=multiple_of, ffn_dim_multiplier=mult, **kw)


_LONG = dict(use_scaled_rope=True, max_seq_len=131072)
PRESETS: dict[str, ModelArgs] = {
    "llama3-8b": _llama(4096, 32, 32, 1024, 1.3),
    "llama3-70b": _llama(8192, 80, 64, 4096, 1.3),
    "llama3.1-8b": _llama(4096, 32, 32, 1024, 1.3, **_LONG),
    "llama3.1-70b": _llama(8192, 80, 64, 4096, 1.3, **_LONG),
    "llama3.1-405b": _llama(16384, 126, 128, 4096, 1.2, **_LONG),
    "llama3.2-1b": _llama(2048, 16, 32, 256, 1.5, tie_embeddings=True, rope_scaling_factor=32.0, **_LONG),
    "llama3.2-3b": _llama(3072, 28, 24, 256, 1.0, tie_embeddings=True, rope_scaling_factor=32.0, **_LONG),
    # Debug sizes. `tiny` trains at several steps/s on 2 CPU cores; `small-100m` is the benchmark size
    # (~100M parameters with a 32K vocabulary, tied, like a scaled-down Llama 3.2).
    "tiny": ModelArgs(dim=256, n_layers=4, n_heads=8, n_kv_heads=2, vocab_size=4352, multiple_of=64,
                      max_seq_len=1024, tie_embeddings=True),
    "small-100m": ModelArgs(dim=768, n_layers=12, n_heads=12, n_kv_heads=4, vocab_size=32768, multiple_of=256,
                            max_seq_len=2048, tie_embeddings=True),
}

# Published parameter counts (Meta model cards / HF index total_size / 2), checked by tests and `herd info`.
PUBLISHED_PARAMS: dict[str, int] = {
    "llama3-8b": 8_030_261_248,
    "llama3-70b": 70_553_706_496,
    "llama3.1-8b": 8_030_261_248,
    "llama3.1-70b": 70_553_706_496,
    "llama3.1-405b": 405_853_388_800,
    "llama3.2-1b": 1_235_814_400,
    "llama3.2-3b": 3_212_749_824,
}

__all__ = ["ModelArgs", "PRESETS", "PUBLISHED_PARAMS"]
