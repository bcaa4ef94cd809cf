"""Load time and peak memory of herd.load_model vs transformers' from_pretrained on a multi-GB checkpoint.

    python benchmarks/bench_load.py [--preset llama3.2-1b --dtype bf16 --repeats 3]

A random-weight checkpoint of the preset is written once (HF safetensors, and Meta .pth with 2 shards); each load
runs in a fresh subprocess so its peak RSS (max resident set, including memory-mapped pages it touched) is its own.
The goal is a peak RSS of at most ~1.2x the checkpoint size: loading never holds two copies of the weights.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import hardware, median  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def make_checkpoint(preset: str, dtype: torch.dtype, out: Path) -> None:
    import herd

    args = herd.ModelArgs.from_name(preset)
    with torch.device("meta"):
        model = herd.Transformer(args)
    model = model.to_empty(device="cpu").to(dtype)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02, generator=gen)
    herd.save_model(model, out / "hf")
    herd.save_model(model, out / "meta", format="meta", shards=2)


def child(which: str, path: str) -> None:
    import resource

    t0 = time.perf_counter()
    if which == "transformers":
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM.from_pretrained(path)
    else:
        import herd

        model = herd.load_model(path)
    elapsed = time.perf_counter() - t0
    # Touch every weight so lazily mapped pages count (a model that is used reads them all).
    # (in 1M-element chunks, so the check itself adds no big temporary).
    total = sum(float(c.float().sum()) for p in model.parameters() for c in p.detach().flatten().split(1 << 20))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": elapsed, "peak_rss_mb": rss, "checksum": total}))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="llama3.2-1b")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    p.add_argument("--make", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(*a.child)
    if a.make:
        return make_checkpoint(a.preset, DTYPES[a.dtype], Path(a.make))
    # Everything heavy runs in subprocesses: on Linux a forked child starts with its parent's max-RSS mark.
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        subprocess.run([sys.executable, __file__, "--make", tmp, "--preset", a.preset, "--dtype", a.dtype],
                       check=True, capture_output=True)
        size_mb = sum(f.stat().st_size for f in (out / "hf").glob("*.safetensors")) / 2**20
        baseline = json.loads(subprocess.run([sys.executable, "-c", (
            "import resource, json, torch, herd, transformers;"
            "print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))")],
            capture_output=True, text=True, check=True).stdout)
        print(f"hardware: {hardware()}")
        print(f"checkpoint: {a.preset} {a.dtype}, {size_mb:.0f} MB of safetensors; interpreter + imports alone: "
              f"{baseline:.0f} MB RSS")
        runs = {"herd (hf)": ("herd", out / "hf"), "herd (meta, 2 shards)": ("herd", out / "meta"),
                "transformers (hf)": ("transformers", out / "hf")}
        results: dict[str, list[dict]] = {name: [] for name in runs}
        for _ in range(a.repeats):
            for name, (which, path) in runs.items():
                r = subprocess.run([sys.executable, __file__, "--child", which, str(path)], capture_output=True,
                                   text=True)
                if r.returncode != 0:
                    raise SystemExit(f"{name} failed:\n{r.stderr[-2000:]}")
                results[name].append(json.loads(r.stdout.strip().splitlines()[-1]))
        for name, rs in results.items():
            secs = median([r["seconds"] for r in rs])
            rss = median([r["peak_rss_mb"] for r in rs])
            print(f"  {name:<22} load {secs:6.2f} s  peak RSS {rss:7.0f} MB = {rss / size_mb:.2f}x checkpoint "
                  f"({(rss - baseline) / size_mb:.2f}x above the bare interpreter)")
        ratio = median([r["seconds"] for r in results["herd (hf)"]]) / median(
            [r["seconds"] for r in results["transformers (hf)"]])
        print(f"  load time ratio herd / transformers (hf): {ratio:.2f}x")


if __name__ == "__main__":
    main()
