"""Hugging Face layout: ``config.json`` + ``model.safetensors`` (or ``model-0000K-of-0000N.safetensors`` + index).

HF stores q/k projections for the "rotate half" RoPE layout, herd (like Meta) rotates adjacent pairs; ``permute_to_hf``
and ``permute_from_hf`` convert between them, per head. Everything else is a rename.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from herd.checkpoint.errors import CheckpointError
from herd.io import atomic_write_json, read_json
from herd.model.args import PRESETS, ModelArgs

CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"

_LAYER_MAP = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_MAP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
            "output.weight": "lm_head.weight"}
_FROM_HF_LAYER = {v: k for k, v in _LAYER_MAP.items()}
_FROM_HF_TOP = {v: k for k, v in _TOP_MAP.items()}
_HF_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")
_HF_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")  # old .bin conversions


def to_hf_name(name: str) -> str:
    if name in _TOP_MAP:
        return _TOP_MAP[name]
    _, layer, rest = name.split(".", 2)
    return f"model.layers.{layer}.{_LAYER_MAP[rest]}"


def from_hf_name(name: str) -> str | None:
    """herd name for an HF tensor name; None for tensors to ignore; KeyError for unknown ones."""
    if name in _FROM_HF_TOP:
        return _FROM_HF_TOP[name]
    if _HF_IGNORED.fullmatch(name):
        return None
    m = _HF_LAYER_RE.fullmatch(name)
    if m and m.group(2) in _FROM_HF_LAYER:
        return f"layers.{m.group(1)}.{_FROM_HF_LAYER[m.group(2)]}"
    raise KeyError(name)


def permute_to_hf(w: Tensor, n_heads: int) -> Tensor:
    """Meta (interleaved pairs) -> HF (rotate-half) row order, per head: (n, hd/2, 2) -> (n, 2, hd/2)."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def permute_from_hf(w: Tensor, n_heads: int) -> Tensor:
    """Inverse of ``permute_to_hf``: (n, 2, hd/2) -> (n, hd/2, 2)."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, 2, out_dim // n_heads // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


# --- config.json <-> ModelArgs ------------------------------------------------------------------------------------
_REQUIRED = object()


def config_value(cfg: dict[str, Any], key: str, kind: type, source: str, default: Any = _REQUIRED) -> Any:
    """``cfg[key]`` checked against ``kind``: int (a positive integer), float (a positive finite number) or bool; a
    missing key gives ``default`` (``None`` included), or an error naming the key when there is none."""
    import math

    if key not in cfg or (cfg[key] is None and default is not _REQUIRED):
        if default is _REQUIRED:
            raise CheckpointError(f"{source}: missing required key '{key}'")
        return default
    value = cfg[key]
    if kind is bool:
        if not isinstance(value, bool):
            raise CheckpointError(f"{source}: '{key}' must be true or false, got {value!r}")
        return value
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int and not (number and value == int(value) and value >= 1):
        raise CheckpointError(f"{source}: '{key}' must be a positive integer, got {value!r}")
    if kind is float and not (number and math.isfinite(value) and value > 0):
        raise CheckpointError(f"{source}: '{key}' must be a positive number, got {value!r}")
    return kind(value)


def args_from_config(cfg: dict[str, Any], source: str) -> ModelArgs:
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{source}: expected a JSON object of model settings, got a {type(cfg).__name__}")

    def need(key: str, kind: type = int) -> Any:
        return config_value(cfg, key, kind, source)

    def get(key: str, default: Any, kind: type) -> Any:
        return config_value(cfg, key, kind, source, default)

    if cfg.get("model_type", "llama") != "llama":
        raise CheckpointError(f"{source}: model_type {cfg['model_type']!r} is not 'llama'")
    if cfg.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{source}: hidden_act {cfg['hidden_act']!r} is not supported (Llama uses 'silu')")
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            raise CheckpointError(f"{source}: '{flag}: true' is not a Llama 3 architecture")
    # Newer transformers fold rope_theta and scaling into "rope_parameters"; older ones use "rope_scaling".
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise CheckpointError(f"{source}: rope_scaling/rope_parameters must be an object, got {rope!r}")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    theta = (config_value(rope, "rope_theta", float, f"{source}: rope_parameters") if "rope_theta" in rope
             else get("rope_theta", 10000.0, float))
    kw: dict[str, Any] = dict(
        dim=need("hidden_size"), n_layers=need("num_hidden_layers"), n_heads=need("num_attention_heads"),
        n_kv_heads=get("num_key_value_heads", None, int), vocab_size=need("vocab_size"),
        norm_eps=get("rms_norm_eps", 1e-6, float),
        rope_theta=theta, max_seq_len=get("max_position_embeddings", 8192, int),
        tie_embeddings=get("tie_word_embeddings", False, bool),
    )
    if rope_type == "llama3":
        where = f"{source}: rope_scaling"
        kw.update(use_scaled_rope=True, rope_scaling_factor=config_value(rope, "factor", float, where),
                  rope_low_freq_factor=config_value(rope, "low_freq_factor", float, where),
                  rope_high_freq_factor=config_value(rope, "high_freq_factor", float, where),
                  rope_original_max_seq_len=config_value(rope, "original_max_position_embeddings", int, where))
    elif rope_type != "default":
        raise CheckpointError(f"{source}: unknown rope type {rope_type!r} (supported: default, llama3)")
    head_dim = get("head_dim", None, int)
    if head_dim is not None and head_dim != kw["dim"] // kw["n_heads"]:
        kw["head_dim"] = head_dim
    try:
        args = ModelArgs(**kw)
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None
    # Express the FFN size through Meta's (multiple_of, multiplier) rule when a known one fits, else state it.
    hidden = need("intermediate_size")
    for preset in PRESETS.values():
        candidate = ModelArgs(**{**kw, "multiple_of": preset.multiple_of,
                                 "ffn_dim_multiplier": preset.ffn_dim_multiplier})
        if candidate.hidden_dim == hidden:
            return candidate
    args.ffn_hidden_dim = hidden
    return args


def config_from_args(args: ModelArgs, dtype: torch.dtype, bos_id: int | None, eos_id: int | list[int] | None
                     ) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": args.hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.hd,
        "vocab_size": args.vocab_size,
        "max_position_embeddings": args.max_seq_len,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "rope_scaling": None,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "tie_word_embeddings": args.tie_embeddings,
        "initializer_range": 0.02,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
    }
    if args.use_scaled_rope:
        cfg["rope_scaling"] = {
            "rope_type": "llama3", "factor": args.rope_scaling_factor, "low_freq_factor": args.rope_low_freq_factor,
            "high_freq_factor": args.rope_high_freq_factor,
            "original_max_position_embeddings": args.rope_original_max_seq_len,
        }
    if bos_id is not None:
        cfg["bos_token_id"] = bos_id
    if eos_id is not None:
        cfg["eos_token_id"] = eos_id
    return cfg


# --- reading -------------------------------------------------------------------------------------------------------
def read_args(path: Path) -> ModelArgs:
    cfg_path = path / CONFIG
    return args_from_config(read_json(cfg_path, CheckpointError), str(cfg_path))


def weight_files(path: Path) -> list[Path]:
    index = path / INDEX
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: malformed index ({e!r})") from None
        files = [path / name for name in dict.fromkeys(weight_map.values())]
    elif (path / SINGLE).exists():
        files = [path / SINGLE]
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors weights found")
    for f in files:
        if not f.exists():
            raise CheckpointError(f"{f}: listed in {INDEX} but missing")
    return files


def iter_tensors(path: Path, args: ModelArgs) -> Iterator[tuple[str, Tensor, str]]:
    """Yield ``(herd name, tensor in herd layout, file)``; tensors are memory-mapped, one at a time."""
    from safetensors import SafetensorError, safe_open

    for file in weight_files(path):
        open(file, "rb").close()  # safetensors reports an unreadable file as "No such file or directory"
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                for hf_name in f.keys():
                    try:
                        name = from_hf_name(hf_name)
                    except KeyError:
                        raise CheckpointError(f"{file}: unexpected tensor '{hf_name}'") from None
                    if name is None:
                        continue
                    t = f.get_tensor(hf_name)
                    if name.endswith("attention.wq.weight"):
                        t = permute_from_hf(_check_rows(t, args.n_heads * args.hd, file, hf_name), args.n_heads)
                    elif name.endswith("attention.wk.weight"):
                        t = permute_from_hf(_check_rows(t, args.n_kv_heads * args.hd, file, hf_name),
                                            args.n_kv_heads)
                    yield name, t, str(file)
        except SafetensorError as e:
            raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({e})") from None


def _check_rows(t: Tensor, rows: int, file: Path, key: str) -> Tensor:
    if t.dim() != 2 or t.size(0) != rows:
        raise CheckpointError(f"{file}: tensor '{key}' has shape {tuple(t.shape)}, config implies {rows} rows")
    return t


# --- writing -------------------------------------------------------------------------------------------------------
def write(state: dict[str, Tensor], args: ModelArgs, out: Path, max_shard_bytes: int = 5 * 10**9) -> None:
    """Write herd-named tensors as HF safetensors shards (+ index when there is more than one) and config.json."""
    from safetensors.torch import save_file

    tensors: dict[str, Tensor] = {}
    for name, t in state.items():
        if name == "output.weight" and args.tie_embeddings:
            continue  # HF omits the tied head and re-ties it on load
        if name.endswith("attention.wq.weight"):
            t = permute_to_hf(t, args.n_heads)
        elif name.endswith("attention.wk.weight"):
            t = permute_to_hf(t, args.n_kv_heads)
        tensors[to_hf_name(name)] = t.contiguous()
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], out / SINGLE, metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out / fname, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    atomic_write_json(out / INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
