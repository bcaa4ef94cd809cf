"""Model FLOPs utilisation of `herd pretrain` on GPUs: an 8B-shaped Llama 3 (Meta's widths, fewer layers so it fits
the devices), bf16, `torch.compile` per block, FSDP2 and selective activation checkpointing, 8K sequences with
document masking (FlexAttention).

    python benchmarks/bench_mfu.py                      # one GPU: llama3-8b widths with 16 layers
    python benchmarks/bench_mfu.py --nproc 8 --layers 32  # a node: the full 8B under FSDP2 (dp_shard=8)
    python benchmarks/bench_mfu.py --smoke              # CPU plumbing check (tiny model), no figure worth quoting

It trains a tokenizer on, and tokenizes, the Python standard library's sources (offline), then runs `herd pretrain`
through its CLI (under torchrun when --nproc > 1) with checkpoints off, and reports the median MFU and tokens/s of
the steps after the first few (compilation). MFU counts 6N + attention FLOPs per token (herd.model.flops) over the
device's dense bf16 peak. The peers are published figures, not rerun here: Meta reports 38-43% bf16 MFU for Llama 3
405B on 8K-16K H100s; torchtitan reports about 39% for Llama 3 8B on H100s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import hardware  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def corpus() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [str(stdlib / p) for p in ("asyncio", "collections", "email", "http", "json", "logging", "unittest",
                                      "urllib", "xml") if (stdlib / p).is_dir()]


def herd(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "herd", *args], check=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=16, help="layers of the 8B shape (32 is the real 8B)")
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--micro-batch", type=int, default=2, help="sequences per GPU per step")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5, help="first steps left out of the median (compilation)")
    p.add_argument("--nproc", type=int, default=1, help="GPUs (FSDP2 dp_shard)")
    p.add_argument("--ac", default="selective", choices=["none", "selective", "full"])
    p.add_argument("--work-dir", help="keep the tokenizer / shards / run here (default: a temporary directory)")
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU: checks the plumbing only")
    a = p.parse_args()

    work = Path(a.work_dir or tempfile.mkdtemp(prefix="herd-bench-mfu-"))
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "tokenizer" / "tokenizer.model").exists():
        herd("tokenizer", "train", "--input", *corpus(), "--vocab-size", "4096", "--out", str(work / "tokenizer"))
    if not (work / "shards" / "manifest.json").exists():
        herd("data", "tokenize", "--input", *corpus(), "--tokenizer", str(work / "tokenizer"),
             "--out", str(work / "shards"))

    if a.smoke:
        model = ["--model.preset=tiny", "--model.n_layers=2", "--model.vocab_size=4352", "--train.device=cpu",
                 "--train.dtype=fp32"]
        seq, steps, warmup = 256, 4, 1
    else:
        # The 8B widths and Llama 3's 128K vocabulary (the bench tokenizer uses the first 4K ids).
        model = ["--model.preset=llama3-8b", f"--model.n_layers={a.layers}", "--model.vocab_size=128256",
                 "--train.device=cuda", "--train.dtype=bf16", "--train.compile=true"]
        seq, steps, warmup = a.seq, a.steps, a.warmup
    run = work / "run"
    subprocess.run(["rm", "-rf", str(run)], check=True)
    overrides = [*model, f"--data.path={work / 'shards'}", f"--data.seq_len={seq}",
                 f"--data.batch_size={a.micro_batch * a.nproc}", "--data.document_masking=true",
                 "--data.val_fraction=0", "--train.grad_accum=1", f"--train.steps={steps}", "--train.warmup_steps=2",
                 f"--train.activation_checkpointing={a.ac}", "--train.val_batches=0",
                 f"--parallel.dp_shard={a.nproc}", "--checkpoint.enabled=false", "--checkpoint.export_hf=false",
                 "--log.progress=false", "--log.tensorboard=false"]
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={a.nproc}"]
                if a.nproc > 1 else [sys.executable])
    cmd = [*launcher, "-m", "herd", "pretrain", "--config", str(ROOT / "configs" / "llama3-8b.toml"),
           "--run-dir", str(run), *overrides]
    print("command:", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"})

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    timed = records[warmup:]
    mfu = [r["mfu"] for r in timed if r.get("mfu") is not None]
    tps = statistics.median(r["tokens_per_s"] for r in timed)
    print(f"hardware: {hardware()}")
    print(f"{'smoke (tiny, CPU)' if a.smoke else f'llama3-8b widths, {a.layers} layers'}: seq {seq}, "
          f"{a.micro_batch} sequence(s) per GPU, {a.nproc} process(es), AC {a.ac}; median of steps "
          f"{warmup + 1}-{steps}")
    print(f"tokens/s (all devices): {tps:,.0f}; per device: {tps / a.nproc:,.0f}")
    print(f"MFU: {100 * statistics.median(mfu):.1f}%" if mfu else "MFU: unknown (no peak for this device)")
    print(f"peak memory per device: {max(r['memory_gb'] for r in records):.1f} GiB")
    print("published peers (not rerun): Meta Llama 3 405B 38-43% (H100, 8K-16K GPUs); torchtitan Llama 3 8B ~39% "
          "(H100)")


if __name__ == "__main__":
    main()
