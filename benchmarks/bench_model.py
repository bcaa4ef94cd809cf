"""Forward + backward time of herd's Transformer vs transformers' LlamaForCausalLM (sdpa), same weights and batch.

    python benchmarks/bench_model.py [--preset small-100m --batch 4 --seq 512 --repeats 7]

Both compute logits and the mean cross-entropy loss and backpropagate; runs alternate between the two models and
the median time per step is compared. Peak memory is measured in a fresh subprocess per implementation (max RSS).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import alternate, hardware, median, peak_rss_mb  # noqa: E402

import herd  # noqa: E402
from herd.model.flops import train_flops_per_token  # noqa: E402


def build(preset: str, tmp: Path):
    from transformers import LlamaForCausalLM

    args = herd.ModelArgs.from_name(preset)
    model = herd.Transformer(args)
    model.init_weights(seed=0)
    herd.save_model(model, tmp / "m")
    hf = LlamaForCausalLM.from_pretrained(tmp / "m", attn_implementation="sdpa", dtype=torch.float32)
    return args, model, hf


def step_fns(model, hf, tokens):
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def herd_step():
        loss = F.cross_entropy(model(inputs).flatten(0, 1).float(), targets.flatten())
        loss.backward()
        model.zero_grad(set_to_none=True)

    def hf_step():
        logits = hf(input_ids=inputs).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        loss.backward()
        hf.zero_grad(set_to_none=True)

    return {"herd": herd_step, "transformers": hf_step}


def memory_child(which: str, preset: str, batch: int, seq: int) -> None:
    """Build only one model (random init, no files), then measure the high-water mark of one training step."""
    import psutil

    args = herd.ModelArgs.from_name(preset)
    if which == "herd":
        model, hf = herd.Transformer(args), None
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        from herd.checkpoint.hf import config_from_args

        cfg = LlamaConfig(**config_from_args(args, torch.float32, None, None))
        model, hf = None, LlamaForCausalLM(cfg)
    tokens = torch.randint(0, args.vocab_size, (batch, seq + 1))
    before = psutil.Process().memory_info().rss / 2**20
    step_fns(model, hf, tokens)[which]()
    print(json.dumps({"peak_rss_mb": peak_rss_mb(), "before_step_mb": before}))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="small-100m")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.memory_child:
        return memory_child(a.memory_child, a.preset, a.batch, a.seq)

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        args, model, hf = build(a.preset, Path(tmp))
    tokens = torch.randint(0, args.vocab_size, (a.batch, a.seq + 1))
    times = alternate(step_fns(model, hf, tokens), a.repeats)
    ntok = a.batch * a.seq
    print(f"hardware: {hardware()}")
    print(f"model: {a.preset} ({sum(p.numel() for p in model.parameters()):,} params), batch {a.batch} x seq {a.seq}, "
          f"fp32, forward+backward, {a.repeats} alternating repeats")
    for name, ts in times.items():
        tps = ntok / median(ts)
        gflops = train_flops_per_token(args, a.seq) * tps / 1e9
        print(f"  {name:<13} median {median(ts) * 1000:8.1f} ms/step  {tps:8.0f} tok/s  {gflops:6.1f} GFLOP/s  "
              f"(min {min(ts) * 1000:.1f}, max {max(ts) * 1000:.1f})")
    ratio = median(times["herd"]) / median(times["transformers"])
    print(f"  ratio herd / transformers time: {ratio:.3f}x (goal <= 0.8x)")
    for which in ("herd", "transformers"):
        out = subprocess.run([sys.executable, __file__, "--memory-child", which, "--preset", a.preset,
                              "--batch", str(a.batch), "--seq", str(a.seq)], capture_output=True, text=True)
        if out.returncode != 0:
            print(f"  memory ({which}): failed: {out.stderr[-500:]}")
            continue
        m = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"  peak RSS ({which}): {m['peak_rss_mb']:.0f} MB "
              f"(step adds {m['peak_rss_mb'] - m['before_step_mb']:.0f} MB)")


if __name__ == "__main__":
    main()
