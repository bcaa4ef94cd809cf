"""What checkpoint checksums cost: the time ``write_checksums`` (CRC-32 of every file and of every DCP item, one
read of what was just written, from the page cache) adds to a synchronous save, and the verification a resume does
first, on a tiny and a bigger checkpoint, in one process.

    python benchmarks/bench_reliability_train.py [--repeats 3]

"Whole save" is ``Checkpointer.save`` (DCP write, trainer state, checksums, fsync, rename); "checksums" is the part
of it that computes and writes ``checksums.json``, timed on its own; "verify" reads every file once more and
compares, which a resume pays once. Medians over the repeats.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import alternate, hardware, median  # noqa: E402

import herd  # noqa: E402
from herd.config import TrainConfig  # noqa: E402
from herd.train import checkpointing  # noqa: E402
from herd.train.optim import build_optimizer  # noqa: E402

SIZES = {"tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=1256),
         "bigger": dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=4, vocab_size=32000)}


def bench(name: str, root: Path, repeats: int) -> None:
    model = herd.Transformer(herd.ModelArgs(**SIZES[name]))
    model.init_weights(seed=0)
    opt = build_optimizer(model, TrainConfig())
    ids = torch.randint(0, model.args.vocab_size, (1, 17))
    F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()).backward()
    opt.step()  # the AdamW moments exist: the state has a real checkpoint's size
    step = root / "c" / "step-1"

    def save() -> None:
        shutil.rmtree(root / "c", ignore_errors=True)
        checkpointing.Checkpointer(root / "c", keep=1).save(1, model, opt, {"loader": {}})

    save_s = median(alternate({"save": save}, repeats)["save"])
    size = sum(p.stat().st_size for p in step.iterdir())
    times = alternate({"checksums": lambda: checkpointing.write_checksums(step),
                       "verify": lambda: checkpointing.verify_checkpoint(step)}, repeats)
    sums, verify = median(times["checksums"]), median(times["verify"])
    n = sum(p.numel() for p in model.parameters())
    print(f"{name:>6}: {n:>11,} parameters, checkpoint {size / 2**20:7.1f} MiB | whole save {save_s:6.3f} s, of which "
          f"checksums {sums:6.3f} s ({size / 2**30 / sums:4.2f} GiB/s) | verify {verify:6.3f} s "
          f"({size / 2**30 / verify:4.2f} GiB/s)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    print(f"hardware: {hardware()}")
    data = bytes(64 << 20)
    t0 = time.perf_counter()
    zlib.crc32(data)
    print(f"zlib.crc32 alone: {len(data) / 2**30 / (time.perf_counter() - t0):.2f} GiB/s on one core")
    root = Path(tempfile.mkdtemp(prefix="herd-bench-reliability-", dir=Path.cwd()))
    try:
        for name in SIZES:
            bench(name, root, a.repeats)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
