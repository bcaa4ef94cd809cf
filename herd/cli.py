"""``herd <verb>``: each verb is a thin function that parses its arguments and calls the library.

Errors in the user's input (files, keys, configs) print one line naming the culprit and exit with status 2;
set HERD_DEBUG=1 for the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import pkgutil
import sys
from pathlib import Path

import torch

from herd.errors import UserError

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (sizes, counts, shards); anything else is an argument error."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _human(n: float, unit: str = "B") -> str:
    for prefix in ("", "K", "M", "G", "T"):
        if abs(n) < 1024 or prefix == "T":
            return f"{n:.2f} {prefix}{unit}" if prefix else f"{n:.0f} {unit}"
        n /= 1024
    return f"{n} {unit}"


# --- info -------------------------------------------------------------------------------------------------------
def cmd_info(a: argparse.Namespace) -> None:
    from herd.checkpoint import read_args
    from herd.model import flops
    from herd.model.args import PRESETS, PUBLISHED_PARAMS, ModelArgs

    if a.model.lower() in PRESETS:
        args, name = ModelArgs.from_name(a.model), a.model.lower()
    elif Path(a.model).exists():
        args, name = read_args(a.model), a.model
    else:
        raise UserError(f"{a.model}: neither a preset ({', '.join(PRESETS)}) nor a model directory")
    seq_len = a.seq_len or min(args.max_seq_len, 8192)
    n = flops.count_params(args)
    rows = [
        ("model", name),
        ("layers / dim / heads / kv heads", f"{args.n_layers} / {args.dim} / {args.n_heads} / {args.n_kv_heads}"),
        ("head dim / ffn hidden / vocab", f"{args.hd} / {args.hidden_dim} / {args.vocab_size}"),
        ("rope", f"theta {args.rope_theta:g}" + (f", llama3 scaling x{args.rope_scaling_factor:g}"
                                                 if args.use_scaled_rope else ", no scaling")),
        ("tied embeddings", str(args.tie_embeddings)),
        ("max sequence length", f"{args.max_seq_len:,}"),
        ("parameters", f"{n:,}"),
        ("matmul parameters (N)", f"{flops.matmul_params(args):,}"),
        (f"training FLOPs / token (seq {seq_len})", f"{flops.train_flops_per_token(args, seq_len):.4g}"),
        (f"weights ({a.dtype})", _human(flops.weight_bytes(args, a.dtype))),
        (f"KV cache / token ({a.dtype})", _human(flops.kv_cache_bytes_per_token(args, a.dtype))),
        (f"KV cache at {seq_len} tokens", _human(flops.kv_cache_bytes_per_token(args, a.dtype) * seq_len)),
    ]
    if name in PUBLISHED_PARAMS:
        rows.append(("published parameters", f"{PUBLISHED_PARAMS[name]:,}"
                     + (" (matches)" if PUBLISHED_PARAMS[name] == n else " (MISMATCH)")))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


# --- convert ----------------------------------------------------------------------------------------------------
def cmd_convert(a: argparse.Namespace) -> None:
    import json

    from herd.checkpoint import check_tokenizer, load_model, save_model
    from herd.tokenizer import Tokenizer
    from herd.train.checkpointing import is_training_checkpoint, load_model_from_checkpoint

    src = Path(a.src)
    tokenizer = Tokenizer(a.tokenizer) if a.tokenizer else None
    if is_training_checkpoint(src):  # a DCP step of a pretraining run
        model, run_tokenizer = load_model_from_checkpoint(src)
        tokenizer = tokenizer or run_tokenizer or _run_tokenizer(src)
        if a.dtype:
            model.to(DTYPES[a.dtype])
        if tokenizer is not None and tokenizer.n_words > model.args.vocab_size:
            raise UserError(f"{a.tokenizer}: {tokenizer.n_words:,} token ids do not fit the model's vocabulary of "
                            f"{model.args.vocab_size:,}")
    else:
        model = load_model(src, dtype=DTYPES[a.dtype] if a.dtype else None)
        for candidate in (src / "tokenizer.model", src / "tokenizer.json", src / "original" / "tokenizer.model"):
            if tokenizer is None and candidate.exists():
                tokenizer = Tokenizer(candidate)
        if tokenizer is not None:
            check_tokenizer(src, tokenizer, model.args)
    gen = None
    if (src / "generation_config.json").exists():
        gen = json.loads((src / "generation_config.json").read_text())
    save_model(model, a.dst, format=a.to, tokenizer=tokenizer, shards=a.shards, generation_config=gen,
               max_shard_bytes=int(a.max_shard_gb * 1e9))
    print(f"wrote {a.to} model to {a.dst}")


def _run_tokenizer(step_dir: Path):
    """The tokenizer of a training checkpoint whose run read its shards through a path relative to another working
    directory: ``data.path`` is looked up beside the run directory and its parents, and the run's exported ``model/``
    is tried; a checkpoint whose tokenizer cannot be found is an error, never a model directory without one."""
    from herd.tokenizer import Tokenizer
    from herd.train.checkpointing import read_trainer_state

    run_dir = step_dir.resolve().parent.parent  # RUN/checkpoints/step-N
    data_path = Path(read_trainer_state(step_dir)["config"]["data"]["path"])
    candidates = [run_dir / "model"]
    if not data_path.is_absolute():
        candidates += [parent / data_path for parent in (run_dir, *run_dir.parents)]
    for directory in candidates:
        if (directory / "tokenizer.model").exists():
            return Tokenizer(directory)
    raise UserError(f"{step_dir}: the run's tokenizer is not found (data.path={str(data_path)!r} is not a shard "
                    f"directory from here, nor from {run_dir} or its parents); pass --tokenizer PATH")


# --- tokenizer --------------------------------------------------------------------------------------------------
def cmd_tokenizer_train(a: argparse.Namespace) -> None:
    from herd.tokenizer.train import train_and_save

    tok = train_and_save(a.input, a.vocab_size, a.out, progress=not a.quiet)
    print(f"wrote tokenizer with {len(tok.ranks)} BPE ranks + {len(tok.special_tokens)} special tokens to {a.out}")


def cmd_tokenizer_stats(a: argparse.Namespace) -> None:
    from herd.tokenizer.stats import run_stats

    run_stats(a.tokenizer, a.input, spm_vocab=a.sentencepiece_vocab, out_json=a.json,
              spm_train=a.sentencepiece_train)


# --- data, pretraining, plots ------------------------------------------------------------------------------------
def cmd_data_tokenize(a: argparse.Namespace) -> None:
    from herd.data.shards import tokenize_to_shards

    m = tokenize_to_shards(a.input, a.tokenizer, a.out, workers=a.workers, progress=not a.quiet)
    print(f"wrote {m['n_tokens']:,} tokens in {m['n_docs']:,} documents ({len(m['shards'])} shard(s)) to {a.out}")


def cmd_pretrain(a: argparse.Namespace, overrides: list[str]) -> None:
    from herd.config import load_config
    from herd.train.pretrain import pretrain

    run_dir = Path(a.run_dir)
    existed = run_dir.exists()
    try:
        pretrain(load_config(a.config, overrides), run_dir)
    except BaseException:
        if not existed and run_dir.is_dir() and not any(run_dir.iterdir()):
            run_dir.rmdir()  # a run that failed before writing anything leaves no empty directory behind
        raise


def cmd_plot(a: argparse.Namespace) -> None:
    from herd.train.plot import plot_run

    print(f"wrote {plot_run(a.run_dir, a.out)}")


# --- generation -------------------------------------------------------------------------------------------------
def _load_for_inference(a: argparse.Namespace):
    """(model, tokenizer, stop ids) of a model directory, on ``--device`` in ``--dtype``."""
    from herd.checkpoint import check_tokenizer, load_model, read_generation_config
    from herd.tokenizer import Tokenizer

    device = _device(a.device)
    dtype = DTYPES[a.dtype] if a.dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    tok = Tokenizer(a.model)
    model = load_model(a.model, dtype=dtype, device=device).eval()
    check_tokenizer(a.model, tok, model.args)
    return model, tok, read_generation_config(a.model, tok)["eos_token_id"]


def _device(name: str | None) -> str:
    """``--device``, checked: a device type torch knows and this machine has (default: cuda when available)."""
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r}: not a device (expected cpu, cuda, cuda:N or mps)") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(device.type, False):
        raise UserError(f"--device {name!r}: no {device.type} device on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return name


def _sampling(a: argparse.Namespace, stop_ids: list[int]):
    from herd.inference.sampling import SamplingParams

    return SamplingParams(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                          frequency_penalty=a.frequency_penalty, presence_penalty=a.presence_penalty, seed=a.seed,
                          stop_ids=tuple(stop_ids), stop=tuple(a.stop))


def cmd_generate(a: argparse.Namespace) -> None:
    from herd.inference.generate import stream

    model, tok, stop_ids = _load_for_inference(a)
    print(a.prompt, end="", flush=True)
    for piece in stream(model, tok, tok.encode(a.prompt, bos=True), _sampling(a, stop_ids)):
        print(piece, end="", flush=True)
    print()


def cmd_chat(a: argparse.Namespace) -> None:
    from herd.inference.chat_repl import chat_repl

    model, tok, stop_ids = _load_for_inference(a)
    chat_repl(model, tok, _sampling(a, stop_ids), system=a.system)


def cmd_serve(a: argparse.Namespace) -> None:
    import uvicorn

    from herd.errors import UserError
    from herd.inference.engine import Engine
    from herd.inference.server import Server, create_app

    # Checked before anything loads: a flag that cannot work is one line and exit 2, never a server that hangs.
    for flag, value, least in (("--max-batch", a.max_batch, 1), ("--max-len", a.max_len, 1),
                               ("--max-waiting", a.max_waiting, 1), ("--max-body-bytes", a.max_body_bytes, 1),
                               ("--drain-timeout", a.drain_timeout, 0)):
        if value is not None and value < least:
            raise UserError(f"{flag} must be >= {least}, got {value}")
    if not 1 <= a.port <= 65535:
        raise UserError(f"--port must be in [1, 65535], got {a.port}")
    if not 0 <= a.guard_threshold <= 1:
        raise UserError(f"--guard-threshold must be in [0, 1], got {a.guard_threshold}")
    model, tok, stop_ids = _load_for_inference(a)
    if a.max_len is not None and a.max_len > model.args.max_seq_len:
        raise UserError(f"--max-len {a.max_len} exceeds the model's max_seq_len of {model.args.max_seq_len} "
                        f"({a.model})")
    engine = Engine(model, tok, max_batch=a.max_batch, max_len=a.max_len, max_waiting=a.max_waiting,
                    compile=a.compile, batch_invariant=a.batch_invariant)
    name = a.name or Path(a.model).resolve().name
    moderator = None
    if a.guard or a.codeshield:  # herd/safety/moderation.py: checks before and after generation
        from herd.safety.guard import LlamaGuard
        from herd.safety.moderation import Moderator

        guard = LlamaGuard.from_dir(a.guard, device=a.device, threshold=a.guard_threshold) if a.guard else None
        moderator = Moderator(guard, codeshield=a.codeshield)
    server = Server(engine, tok, name, stop_ids, api_key=a.api_key or os.environ.get("HERD_API_KEY"),
                    moderator=moderator, max_body_bytes=a.max_body_bytes, drain_timeout=a.drain_timeout)
    print(f"herd: serving '{name}' on http://{a.host}:{a.port}/v1 ({a.max_batch} slots of {engine.max_len} tokens)",
          flush=True)
    uvicorn.run(create_app(server), host=a.host, port=a.port, log_level=a.log_level,
                timeout_graceful_shutdown=a.drain_timeout)


def _inference_args(s: argparse.ArgumentParser, sampling: bool = True) -> None:
    s.add_argument("--model", required=True, help="model directory (HF or Meta layout, with its tokenizer)")
    s.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    s.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on GPU, fp32 on CPU")
    if not sampling:
        return
    s.add_argument("--max-new-tokens", type=int, default=256)
    s.add_argument("--temperature", type=float, default=0.6, help="0 = greedy")
    s.add_argument("--top-p", type=float, default=0.9)
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--frequency-penalty", type=float, default=0.0)
    s.add_argument("--presence-penalty", type=float, default=0.0)
    s.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    s.add_argument("--seed", type=int, default=None)


# --- parser -----------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="herd", description="The Llama 3 system in PyTorch.")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    s = sub.add_parser("info", help="parameters, FLOPs per token, memory of a preset or model directory")
    s.add_argument("model", help="preset name (e.g. llama3-8b) or model directory")
    s.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16", "fp8", "int8"])
    s.add_argument("--seq-len", type=positive_int, default=None,
                   help="sequence length for the attention FLOPs / KV figures")
    s.set_defaults(fn=cmd_info)

    s = sub.add_parser("convert", help="convert a model directory (HF, Meta, or a pretraining checkpoint step)")
    s.add_argument("src")
    s.add_argument("dst")
    s.add_argument("--to", required=True, choices=["hf", "meta"])
    s.add_argument("--shards", type=positive_int, default=1, help="model-parallel shards for --to meta")
    s.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast weights (default: keep)")
    s.add_argument("--max-shard-gb", type=positive_float, default=5.0, help="safetensors shard size for --to hf")
    s.add_argument("--tokenizer", default=None, help="tokenizer to save with the model (default: the one in SRC; for "
                                                     "a training checkpoint, the one its run read)")
    s.set_defaults(fn=cmd_convert)

    tok = sub.add_parser("tokenizer", help="train or measure tokenizers").add_subparsers(
        dest="tok_verb", required=True, metavar="VERB")
    s = tok.add_parser("train", help="train a byte-level BPE with Llama 3's pre-tokenization")
    s.add_argument("--input", nargs="+", required=True, help="txt / jsonl / parquet files or directories")
    s.add_argument("--vocab-size", type=positive_int, required=True,
                   help="BPE ranks to learn (256 special tokens are added)")
    s.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=cmd_tokenizer_train)
    s = tok.add_parser("stats", help="bytes per token and tokens per word, per file, for one or more tokenizers")
    s.add_argument("--tokenizer", action="append", required=True, help="rank file or directory (repeatable)")
    s.add_argument("--input", nargs="+", required=True)
    s.add_argument("--sentencepiece-vocab", type=int, default=None,
                   help="also train a Llama-2-style SentencePiece BPE of this size on the input and compare")
    s.add_argument("--sentencepiece-train", nargs="+", default=None,
                   help="train the SentencePiece baseline on these files instead of --input (a held-out comparison)")
    s.add_argument("--json", default=None, help="also write the figures to this JSON file")
    s.set_defaults(fn=cmd_tokenizer_stats)

    data = sub.add_parser("data", help="data preparation").add_subparsers(dest="data_verb", required=True,
                                                                         metavar="VERB")
    s = data.add_parser("tokenize", help="tokenize documents into token shards (BOS/EOS per document)")
    s.add_argument("--input", nargs="+", required=True, help="txt / jsonl / parquet files or directories")
    s.add_argument("--tokenizer", required=True, help="rank file, tokenizer.json or a directory holding one")
    s.add_argument("--out", required=True)
    s.add_argument("--workers", type=positive_int, default=None, help="tokenizer processes (default: CPUs, at most 8)")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=cmd_data_tokenize)

    s = sub.add_parser("pretrain", help="pretrain a model; resumes from the run directory's latest checkpoint",
                       description="Extra --section.key=value arguments override the config file.")
    s.add_argument("--config", default=None, help="TOML file (see configs/)")
    s.add_argument("--run-dir", required=True)
    s.set_defaults(fn=cmd_pretrain, takes_overrides=True)

    s = sub.add_parser("plot", help="PNG curves of a run (loss, learning rate, throughput)")
    s.add_argument("run_dir")
    s.add_argument("--out", default=None, help="output PNG (default RUN_DIR/curves.png)")
    s.set_defaults(fn=cmd_plot)

    s = sub.add_parser("generate", help="complete a prompt with a model directory (streamed)")
    _inference_args(s)
    s.add_argument("--prompt", required=True)
    s.set_defaults(fn=cmd_generate)

    s = sub.add_parser("chat", help="chat with a model in the terminal (/reset, /system TEXT, /exit)")
    _inference_args(s)
    s.add_argument("--system", default=None, help="system prompt")
    s.set_defaults(fn=cmd_chat)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching")
    _inference_args(s, sampling=False)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or set HERD_API_KEY)")
    s.add_argument("--name", default=None, help="model name clients use (default: the directory name)")
    s.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (KV-cache slots)")
    s.add_argument("--max-len", type=int, default=None, help="context per sequence (default: the model's)")
    s.add_argument("--max-waiting", type=int, default=64, help="queued requests beyond this get 503")
    s.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    s.add_argument("--batch-invariant", action=argparse.BooleanOptionalAction, default=True,
                   help="decode all slots every step, so a request's output never depends on the others (default); "
                        "--no-batch-invariant is faster at low load")
    s.add_argument("--drain-timeout", type=int, default=30, help="seconds to finish open requests on shutdown")
    s.add_argument("--max-body-bytes", type=int, default=16 * 2**20,
                   help="request bodies above this get 413 (default 16 MiB)")
    s.add_argument("--guard", default=None, help="Llama Guard model directory: check prompts and responses, "
                                                 "serve /v1/moderations")
    s.add_argument("--guard-threshold", type=float, default=0.5, help="flag when P('unsafe') >= this")
    s.add_argument("--codeshield", action="store_true", help="scan code in responses: block or annotate")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug", "trace"])
    s.set_defaults(fn=cmd_serve)

    # Each lifecycle stage (data, posttrain, eval, safety, scaling) adds its own verbs from
    # ``herd/<stage>/commands.py``: ``register(sub, groups)``, where ``groups`` holds the verb groups that already
    # exist here (``data``), so a stage can add to one. Those modules import their libraries lazily, inside the verbs.
    groups = {"data": data}
    for stage in _stage_packages():
        importlib.import_module(f"herd.{stage}.commands").register(sub, groups)
    return p


def _stage_packages() -> list[str]:
    import herd

    return sorted(m.name for m in pkgutil.iter_modules(herd.__path__)
                  if m.ispkg and importlib.util.find_spec(f"herd.{m.name}.commands") is not None)


def main(argv: list[str] | None = None) -> int:
    from herd.errors import UserError
    from herd.train.resilience import BadStepError

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "takes_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if getattr(args, "takes_overrides", False):
            args.fn(args, extra)
        else:
            args.fn(args)
    except KeyboardInterrupt:
        if os.environ.get("HERD_DEBUG"):
            raise
        print("herd: interrupted", file=sys.stderr)
        return 130
    except (UserError, BadStepError, OSError) as e:
        # Only the project's input errors (and the OS's word on a path) are shown as one line; anything else is a
        # bug and keeps its traceback.
        if os.environ.get("HERD_DEBUG"):
            raise
        print(f"herd: error: {_one_line(e)}", file=sys.stderr)
        return 2
    return 0


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and not isinstance(e, UserError) and e.filename is not None:
        return f"{e.filename}: {e.strerror or e}"
    return str(e).splitlines()[0] if str(e) else type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
