"""How long a checkpoint stops training: herd's asynchronous checkpoints (``dcp.async_save`` behind
``checkpoint.async_save = true``) against a synchronous ``dcp.save`` of the same state, in one process.

    python benchmarks/bench_checkpoint.py [--preset small-100m --repeats 5]

The state is a model and its AdamW moments (fp32, about 3x the parameter bytes after one step). "Blocked" is the
time the training loop waits in ``save()`` (for async: the copy to host memory); "total" adds the background write
until the checkpoint directory is final. Nothing trains meanwhile here; in a run the background write shares the
CPU (not the GPU) with the training steps. Each timed save goes to a fresh directory in a temporary folder under
the current directory; runs alternate and medians are compared.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import hardware, median  # noqa: E402

import herd  # noqa: E402
from herd.train.checkpointing import Checkpointer  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small-100m")
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()

    model = herd.Transformer(herd.ModelArgs.from_name(a.preset))
    model.init_weights(seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, model.args.vocab_size, (1, 64))
    F.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten()).backward()
    opt.step()  # the moments exist now: the state is the size a real checkpoint has
    state_bytes = sum(t.numel() * t.element_size() for t in model.parameters()) + sum(
        v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    print(f"hardware: {hardware()}")
    print(f"state: {a.preset}, {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{state_bytes / 2**20:,.0f} MiB with optimizer moments; {a.repeats} alternating repeats (median)")

    root = Path(tempfile.mkdtemp(prefix="herd-bench-ckpt-", dir=Path.cwd()))
    times = {"sync": ([], []), "async": ([], [])}
    try:
        for i in range(a.repeats + 1):  # the first round warms up (thread pools, page cache)
            for mode in ("sync", "async"):
                ckpt = Checkpointer(root / f"{mode}-{i}", keep=1, async_save=mode == "async")
                t0 = time.perf_counter()
                ckpt.save(1, model, opt, {"note": "bench"})
                blocked = time.perf_counter() - t0
                ckpt.wait()
                total = time.perf_counter() - t0
                assert (root / f"{mode}-{i}" / "step-1" / ".metadata").exists()
                if i:
                    times[mode][0].append(blocked)
                    times[mode][1].append(total)
                shutil.rmtree(root / f"{mode}-{i}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    sync_blocked, sync_total = median(times["sync"][0]), median(times["sync"][1])
    async_blocked, async_total = median(times["async"][0]), median(times["async"][1])
    print(f"synchronous  (dcp.save):        blocked {sync_blocked:6.2f} s   total {sync_total:6.2f} s")
    print(f"asynchronous (dcp.async_save):  blocked {async_blocked:6.2f} s   total {async_total:6.2f} s")
    print(f"training blocked by a checkpoint: async / sync = {async_blocked / sync_blocked:.3f}x "
          f"({state_bytes / 2**20 / sync_blocked:,.0f} MiB/s sync)")


if __name__ == "__main__":
    main()
