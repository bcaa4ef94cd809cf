"""Run configuration: plain dataclasses are the schema, TOML files fill them, ``--section.key=value`` overrides.

Unknown sections or keys, values of the wrong type and numbers outside a field's declared range (``ranged``) are errors
that name the file or key. The resolved configuration is written to the run directory (``config.toml``) so a run can
always be reproduced.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from herd.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(UserError):
    """A configuration file or override is invalid; the message names the file / key."""


# --- numeric ranges: declared on the field, checked in one place (``check_ranges``, run by ``load_config``) ----------
@dataclass(frozen=True)
class Range:
    """The values a numeric field accepts: ``min``/``max`` inclusive, ``above``/``below`` exclusive, and ``off``: one
    more value outside the interval that switches the feature off (``spike_factor``: 0, or above 1)."""

    min: float | None = None
    max: float | None = None
    above: float | None = None
    below: float | None = None
    off: float | None = None

    def __contains__(self, value: float) -> bool:
        if self.off is not None and value == self.off:
            return True
        return (math.isfinite(value) and (self.min is None or value >= self.min)
                and (self.max is None or value <= self.max) and (self.above is None or value > self.above)
                and (self.below is None or value < self.below))

    def __str__(self) -> str:
        lo = f"[{self.min:g}" if self.min is not None else f"({self.above:g}" if self.above is not None else None
        hi = f"{self.max:g}]" if self.max is not None else f"{self.below:g})" if self.below is not None else None
        if lo and hi:
            text = f"{lo}, {hi}"
        elif lo:
            text = f">= {self.min:g}" if self.min is not None else f"> {self.above:g}"
        elif hi:
            text = f"<= {self.max:g}" if self.max is not None else f"< {self.below:g}"
        else:
            text = "any finite number"
        return text if self.off is None else f"{self.off:g} (off) or {text}"


def ranged(default: Any, *, min: float | None = None, max: float | None = None, above: float | None = None,
           below: float | None = None, off: float | None = None) -> Any:
    """A dataclass field whose value must lie in the range (None, for an optional field, is always accepted). Any
    stage's config declares its numeric fields this way: ``steps: int = ranged(1000, min=1)``."""
    return field(default=default, metadata={"range": Range(min, max, above, below, off)})


def check_ranges(cfg: Any, prefix: str = "") -> None:
    """Check every numeric field of ``cfg`` (and of its nested dataclass sections): a field declared with ``ranged``
    must lie in its range, every float must be finite. Raises ConfigError naming the key, the value and the range."""
    for f in dataclasses.fields(cfg):
        value, key = getattr(cfg, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            check_ranges(value, f"{key}.")
            continue
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        allowed = f.metadata.get("range", Range())
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is out of range: allowed {allowed}")


@dataclass
class ModelConfig:
    preset: str = "tiny"  # a ModelArgs preset; the fields below override it when set
    # Start from these weights instead of a seeded init: an HF or Meta model directory, or a training checkpoint
    # (run/checkpoints/step-N). The shape is then the source's (the fields below must be unset or equal).
    init_from: str = ""
    dim: int | None = ranged(None, min=1)
    n_layers: int | None = ranged(None, min=1)
    n_heads: int | None = ranged(None, min=1)
    n_kv_heads: int | None = ranged(None, min=1)
    vocab_size: int | None = ranged(None, min=1)  # None: the vocabulary of the tokenizer recorded in the shards
    multiple_of: int | None = ranged(None, min=1)
    ffn_dim_multiplier: float | None = ranged(None, above=0)
    max_seq_len: int | None = ranged(None, min=1)
    rope_theta: float | None = ranged(None, above=0)
    tie_embeddings: bool | None = None


@dataclass
class DataConfig:
    path: str = ""  # a directory written by `herd data tokenize`
    tokenizer: str = ""  # optional: must match the tokenizer recorded in the shards
    seq_len: int = ranged(8192, min=1)  # tokens per training sequence (Llama 3: 8192)
    # sequences per optimizer step (global, summed over accumulation and data-parallel ranks)
    batch_size: int = ranged(8, min=1)
    document_masking: bool = True  # attention never crosses a document boundary
    # RoPE positions restart at each document. Default False: Meta describes masking only, and absolute positions
    # keep the model's view of position identical between packed training and single-document inference prefixes.
    per_document_positions: bool = False
    val_fraction: float = ranged(0.01, min=0, below=1)  # the last documents (this fraction) are held out for validation
    seed: int = ranged(0, min=0)  # shuffles the document order (a new permutation every epoch)


@dataclass
class TrainConfig:
    steps: int = ranged(1000, min=1)
    lr: float = ranged(3e-4, min=0)
    min_lr_ratio: float = ranged(0.1, min=0, max=1)  # the decay ends at lr * min_lr_ratio
    warmup_steps: int = ranged(100, min=0)
    decay: str = "cosine"  # cosine | linear
    weight_decay: float = ranged(0.1, min=0)
    beta1: float = ranged(0.9, min=0, below=1)
    beta2: float = ranged(0.95, min=0, below=1)
    eps: float = ranged(1e-8, min=0)
    grad_clip: float = ranged(1.0, min=0)  # max global grad norm; 0 disables clipping
    grad_accum: int = ranged(1, min=1)  # micro-batches per step (batch_size must divide evenly)
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    activation_checkpointing: str = "none"  # none | full (every block) | selective (op-level, torchtitan's policy)
    compile: bool = False  # torch.compile each block
    device: str = "auto"  # auto | cpu | cuda
    seed: int = ranged(0, min=0)  # model initialisation
    val_interval: int = ranged(0, min=0)  # steps between validation passes (0: only at the end)
    val_batches: int = ranged(4, min=0)
    peak_flops: float = ranged(0.0, min=0)  # FLOP/s for MFU; 0: known-device table, or a measured matmul peak on CPU
    on_bad_step: str = "skip"  # non-finite loss/grad norm or a spike: skip (drop the update) | rollback | stop
    max_bad_steps: int = ranged(5, min=0)  # consecutive bad steps tolerated before stopping
    # a loss above this x its recent mean is a bad step (0: no spike check)
    spike_factor: float = ranged(0.0, above=1, off=0)
    step_timeout_s: float = ranged(0.0, min=0)  # a step longer than this dumps all stacks and exits 1 (0: no watchdog)


@dataclass
class CheckpointConfig:
    enabled: bool = True  # false: no training checkpoints at all (throughput benchmarks); such a run cannot resume
    interval: int = ranged(0, min=0)  # steps between checkpoints; 0: only at the end
    keep: int = ranged(2, min=0)  # most recent checkpoints kept (0: all)
    async_save: bool = False  # dcp.async_save: copy to host memory, write in a background thread
    export_hf: bool = True  # write the final model as an HF-layout directory (run_dir/model) with its tokenizer


@dataclass
class LogConfig:
    progress: bool = True  # a progress bar with rate and ETA
    tensorboard: bool = True  # TensorBoard events when the package is installed


@dataclass
class ParallelConfig:
    """The device mesh under torchrun, outermost to innermost: ``pp`` x ``dp_replicate`` x ``dp_shard`` x ``tp``; the
    product must equal the number of processes. FSDP2 shards parameters, gradients and optimizer state over
    ``dp_shard`` ranks (``dp_replicate`` > 1 adds replica groups: HSDP); ``tp`` splits every matmul over heads / hidden
    units (sequence parallel on the norms); ``pp`` splits the layers into pipeline stages."""

    dp_replicate: int = ranged(1, min=1)
    dp_shard: int = ranged(1, min=1)
    tp: int = ranged(1, min=1)
    pp: int = ranged(1, min=1)
    pp_schedule: str = "1f1b"  # gpipe | 1f1b | interleaved (interleaved 1F1B: two stages per pipeline rank)
    pp_microbatches: int = ranged(0, min=0)  # micro-batches per step through the pipeline; 0: one per pipeline stage
    # steps between cross-replica parameter checksums (needs dp_replicate > 1); 0: off
    sdc_check_interval: int = ranged(0, min=0)


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


# --- loading ----------------------------------------------------------------------------------------------------
def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check / convert ``value`` to the annotated type ``tp`` (int, float, bool, str, Optional of those, and list[str]:
    a TOML array, or a comma-separated string on the command line)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = [t for t in typing.get_args(tp) if t is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, options[0], where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin is list and typing.get_args(tp) == (str,):
        if isinstance(value, str):  # a command-line override: comma-separated
            return [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
    raise ConfigError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def _apply(section_obj: Any, values: dict[str, Any], where: str) -> None:
    hints = typing.get_type_hints(type(section_obj))
    names = {f.name for f in dataclasses.fields(section_obj)}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(f"{where}: unknown key '{key}' (known: {', '.join(sorted(names))})")
        setattr(section_obj, key, _coerce(value, hints[key], f"{where}.{key}"))


def load_config(path: str | Path | None, overrides: list[str] = (), cls: type = PretrainConfig) -> Any:
    cfg = cls()
    sections = {f.name for f in dataclasses.fields(cfg)}
    if path is not None:
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: invalid TOML ({e})") from None
        for name, values in data.items():
            if name not in sections or not isinstance(values, dict):
                raise ConfigError(f"{path}: unknown section [{name}] (known: {', '.join(sorted(sections))})")
            _apply(getattr(cfg, name), values, f"{path}: {name}")
    for item in overrides:
        if not item.startswith("--") or "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"override {item!r}: expected --section.key=value")
        dotted, value = item[2:].split("=", 1)
        section, key = dotted.split(".", 1)
        if section not in sections:
            raise ConfigError(f"override {item!r}: unknown section '{section}' (known: {', '.join(sorted(sections))})")
        _apply(getattr(cfg, section), {key: value}, f"override --{section}")
    check_ranges(cfg)
    return cfg


def to_toml(cfg: Any) -> str:
    """Render a config as TOML (None values are omitted, which restores them to None on load)."""
    lines = []
    for f in dataclasses.fields(cfg):
        lines.append(f"[{f.name}]")
        for key, value in dataclasses.asdict(getattr(cfg, f.name)).items():
            if value is not None:
                lines.append(f"{key} = {json.dumps(value)}")
        lines.append("")
    return "\n".join(lines)
