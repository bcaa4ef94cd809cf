"""Decode throughput of herd's engine vs transformers' ``generate``, same weights, greedy, on this machine.

    python benchmarks/bench_generate.py [--preset small-100m --batches 1 8 --prompt 16 --new 128 --repeats 5]

Each run generates exactly ``--new`` tokens for ``batch`` prompts of ``--prompt`` tokens (transformers with
``min_new_tokens`` so neither stops early; herd with no stop ids). Runs alternate between the two; tokens/s is
batch * new / median wall time (the prefill of a 16-token prompt is included, and costs about one decode step).
With --compile herd's decode step is torch.compile'd (worth it on GPU; on CPU it mostly adds compile time).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import alternate, hardware, median  # noqa: E402

import herd  # noqa: E402
from herd.inference.generate import complete  # noqa: E402
from herd.inference.sampling import SamplingParams  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="small-100m")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--compile", action="store_true")
    a = p.parse_args()
    from transformers import LlamaForCausalLM

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    args = herd.ModelArgs.from_name(a.preset)
    model = herd.Transformer(args)
    model.init_weights(seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        herd.save_model(model, Path(tmp) / "m")
        hf = LlamaForCausalLM.from_pretrained(Path(tmp) / "m", attn_implementation="sdpa", dtype=dtype).eval()
    model = model.to(dtype).eval()
    print(f"hardware: {hardware()}")
    print(f"model: {a.preset} ({sum(p.numel() for p in model.parameters()):,} params, {a.dtype}), prompt {a.prompt} "
          f"tokens, {a.new} new tokens, greedy, {a.repeats} alternating repeats")
    gen = torch.Generator().manual_seed(0)
    for batch in a.batches:
        prompts = torch.randint(0, args.vocab_size, (batch, a.prompt), generator=gen)
        outputs: dict[str, list[list[int]]] = {}
        times = alternate(runners(model, hf, prompts, a.new, a.compile, outputs), a.repeats)
        same = outputs["herd"] == outputs["transformers"]
        print(f"batch {batch}:")
        for name, ts in times.items():
            print(f"  {name:<13} median {median(ts):7.2f} s  {batch * a.new / median(ts):8.1f} tok/s  "
                  f"({1000 * median(ts) / a.new:6.1f} ms per step)")
        ratio = median(times["transformers"]) / median(times["herd"])
        print(f"  speed-up herd vs transformers: {ratio:.2f}x (goal >= 3x at batch 1); same greedy tokens: {same}")


def runners(model, hf, prompts: torch.Tensor, new: int, compile: bool, outputs: dict) -> dict:
    params = SamplingParams(max_new_tokens=new)

    def run_herd():
        outputs["herd"] = [s.output for s in complete(model, prompts.tolist(), params, compile=compile)]

    def run_hf():
        with torch.no_grad():
            out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new,
                              min_new_tokens=new, do_sample=False, pad_token_id=0)
        outputs["transformers"] = out[:, prompts.size(1):].tolist()

    return {"herd": run_herd, "transformers": run_hf}

if __name__ == "__main__":
    main()
