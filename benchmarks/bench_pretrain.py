"""Training throughput on CPU: herd's training step vs an equivalent transformers LlamaForCausalLM loop, and the
cost of document masking.

    python benchmarks/bench_pretrain.py [--presets tiny small-100m --batch 4 --seq 512 --repeats 5]

Both sides run the same weights, batch, sequence length and optimizer (torch AdamW, fused), fp32: forward, loss,
backward, clip, step. Runs alternate; medians are compared. MFU uses the 6N + attention FLOPs per token over the
measured fp32 matmul peak of this CPU. The masking comparison runs herd on packed documents (mean length seq/4)
with the dense block-diagonal mask (the CPU path) against plain causal attention.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import alternate, hardware, median  # noqa: E402

import herd  # noqa: E402
from herd.model import flops  # noqa: E402
from herd.model.masks import document_causal_mask  # noqa: E402


def make_step(forward, params, targets):
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)

    def step():
        loss = F.cross_entropy(forward().flatten(0, 1).float(), targets.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def bench(preset: str, batch: int, seq: int, repeats: int, peak: float) -> None:
    from transformers import LlamaForCausalLM

    args = herd.ModelArgs.from_name(preset)
    model = herd.Transformer(args)
    model.init_weights(seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        herd.save_model(model, Path(tmp) / "m")
        hf = LlamaForCausalLM.from_pretrained(Path(tmp) / "m", attn_implementation="sdpa", dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab_size, (batch, seq + 1), generator=gen)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    doc_len = max(1, seq // 4)
    doc_ids = (torch.arange(seq) // doc_len).expand(batch, seq)
    mask = document_causal_mask(doc_ids)
    fns = {
        "herd": make_step(lambda: model(inputs), list(model.parameters()), targets),
        "transformers": make_step(lambda: hf(input_ids=inputs).logits, list(hf.parameters()), targets),
        "herd+docmask": make_step(lambda: model(inputs, mask=mask), list(model.parameters()), targets),
    }
    times = alternate(fns, repeats)
    fpt = flops.train_flops_per_token(args, seq)
    print(f"{preset}: {flops.count_params(args):,} params, batch {batch} x seq {seq}, fp32, AdamW, "
          f"{repeats} alternating repeats")
    for name, ts in times.items():
        tps = batch * seq / median(ts)
        print(f"  {name:<14} {median(ts) * 1000:8.1f} ms/step  {tps:8.0f} tok/s  MFU {100 * fpt * tps / peak:5.1f}%")
    print(f"  herd / transformers step time: {median(times['herd']) / median(times['transformers']):.3f}x")
    masking = median(times["herd+docmask"]) / median(times["herd"])
    print(f"  document masking cost (dense mask / causal): {masking:.3f}x")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--presets", nargs="+", default=["tiny", "small-100m"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    peak = flops.measure_peak_flops("cpu", torch.float32)
    print(f"hardware: {hardware()}; measured fp32 matmul peak {peak / 1e9:.0f} GFLOP/s")
    for preset in a.presets:
        bench(preset, a.batch, a.seq, a.repeats, peak)


if __name__ == "__main__":
    main()
