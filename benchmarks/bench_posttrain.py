"""Post-training throughput on CPU: herd's SFT and DPO steps (through the one training loop) vs TRL's SFTTrainer and
DPOTrainer on the same tiny model, tokenizer and data, in one process.

    python benchmarks/bench_posttrain.py [--dialogs 64 --pairs 32 --repeats 3 --threads 2]

Each side trains one epoch over the same dialogs / preference pairs per repeat, fp32, AdamW. herd: the loop's own
per-step time (``step_time_s`` in metrics.jsonl: next batch, forward, backward, clip, optimizer step), SFT with packed
rows and document masks, DPO with reference log-probs computed once before training. TRL: ``train_runtime`` of
``trainer.train()`` (its steps plus the Trainer's per-step bookkeeping), SFT one dialog per padded row (TRL's packing
needs flash attention), DPO with ``precompute_ref_log_probs=True`` (like herd: the reference pass happens before
training) and with its default (a reference forward every step). Throughput counts real tokens (no padding): the
epoch's prompt + response tokens divided by the epoch's time. Runs alternate; medians are compared. Peak memory:
each side's epoch again in a fresh subprocess, its peak RSS.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # herd from this checkout
from common import hardware, median  # noqa: E402

warnings.filterwarnings("ignore")


def make_assets(d: Path, n_dialogs: int, n_pairs: int) -> None:
    """A BPE tokenizer, the tiny model (herd's ``tiny`` preset, 4 layers, dim 256) and arithmetic data in ``d``."""
    import herd
    from herd.tokenizer.train import train_bpe

    rng = random.Random(0)
    words = ["plus", "minus", "times", "answer", "number", "the", "is", "what", "of", "and", "sum", "result"]
    corpus = d / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(words) + str(rng.randint(0, 999)) for _ in range(20))
                                for _ in range(3000)))
    tok = train_bpe([corpus], vocab_size=1000, progress=False)
    model = herd.Transformer(herd.ModelArgs.from_name("tiny", vocab_size=tok.n_words, max_seq_len=1024))
    model.init_weights(seed=0)
    herd.save_model(model, d / "model", tokenizer=tok)
    dialogs, pairs = [], []
    for _ in range(max(n_dialogs, n_pairs)):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        q = f"What is {a} plus {b}? Explain the steps of the sum before giving the number."
        good = f"We add {a} and {b}: the ones, then the tens, then the hundreds. The result is {a + b}."
        bad = f"Adding {a} and {b} gives {a + b + rng.randint(1, 50)}, I believe, but I did not check the steps."
        dialogs.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": good}]})
        pairs.append({"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": good}],
                      "rejected": [{"role": "assistant", "content": bad}]})
    (d / "sft.jsonl").write_text("".join(json.dumps(x) + "\n" for x in dialogs[:n_dialogs]))
    (d / "dpo.jsonl").write_text("".join(json.dumps(x) + "\n" for x in pairs[:n_pairs]))


# --- herd -----------------------------------------------------------------------------------------------------------
def herd_epoch(kind: str, d: Path, batch: int, run: Path, packing: bool = True) -> tuple[float, int]:
    """One epoch through ``herd.train.loop.train``: (summed step seconds, real tokens)."""
    from herd.config import load_config
    from herd.posttrain.config import DPORunConfig, SFTRunConfig
    from herd.posttrain.data import Skips, encode_preferences, read_preferences
    from herd.posttrain.dpo import dpo
    from herd.posttrain.sft import encode_sft_examples, open_tokenizer, pack, sft
    from herd.tokenizer import ChatFormat

    common = [f"--model.init_from={d / 'model'}", "--checkpoint.enabled=false", "--checkpoint.export_hf=false",
              "--log.progress=false", "--log.tensorboard=false", "--train.peak_flops=1", "--train.warmup_steps=0",
              "--train.dtype=fp32", "--data.val_fraction=0", "--train.device=cpu"]
    if kind == "sft":
        cfg = load_config(None, [*common, f"--data.path={d / 'sft.jsonl'}", "--data.seq_len=512",
                                 f"--data.packing={packing}"], cls=SFTRunConfig)
        examples = encode_sft_examples(cfg, open_tokenizer(cfg), Skips(False))
        rows = len(pack([len(x) for x, _ in examples], 512, 0, packing))
        steps = -(-len(examples) // batch)  # TRL's steps for the same dialogs
        cfg.data.batch_size = max(1, round(rows / steps))  # packed rows per step
        cfg.train.steps = rows // cfg.data.batch_size
        # Real tokens of the rows trained (on average: which rows fall in the epoch's last partial batch varies).
        tokens = round(sum(len(x) for x, _ in examples) * cfg.train.steps * cfg.data.batch_size / rows)
        records = sft(cfg, run)
    else:
        cfg = load_config(None, [*common, f"--data.path={d / 'dpo.jsonl'}", "--data.seq_len=512",
                                 f"--data.batch_size={batch}", "--dpo.ref_batch_size=8"], cls=DPORunConfig)
        tok = open_tokenizer(cfg)
        examples = encode_preferences(ChatFormat(tok), read_preferences(cfg.data.path), 512, Skips(False))
        cfg.train.steps = len(examples) // batch
        tokens = sum(2 * len(e.prompt) + len(e.chosen) + len(e.rejected) for e in examples[:cfg.train.steps * batch])
        records = dpo(cfg, run)
    return sum(r["step_time_s"] for r in records), tokens


# --- TRL ------------------------------------------------------------------------------------------------------------
def trl_trainer(kind: str, d: Path, batch: int, out: Path, precompute: bool = True):
    from datasets import Dataset
    from transformers import AutoTokenizer, LlamaForCausalLM
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    common = dict(output_dir=str(out), report_to=[], use_cpu=True, bf16=False, per_device_train_batch_size=batch,
                  num_train_epochs=1, learning_rate=1e-5, lr_scheduler_type="constant", save_strategy="no",
                  logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0, max_length=None)
    tok = AutoTokenizer.from_pretrained(d / "model")
    rows = [json.loads(line) for line in (d / f"{kind}.jsonl").read_text().splitlines()]
    model = LlamaForCausalLM.from_pretrained(d / "model", attn_implementation="sdpa")
    if kind == "sft":
        data = Dataset.from_list([{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows])
        return SFTTrainer(model=model, processing_class=tok, train_dataset=data,
                          args=SFTConfig(**common, completion_only_loss=True))
    ref = None if precompute else LlamaForCausalLM.from_pretrained(d / "model", attn_implementation="sdpa")
    return DPOTrainer(model=model, ref_model=ref, processing_class=tok, train_dataset=Dataset.from_list(rows),
                      args=DPOConfig(**common, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.2], beta=0.1,
                                     precompute_ref_log_probs=precompute, precompute_ref_batch_size=8))


def trl_epoch(trainer) -> float:
    return trainer.train().metrics["train_runtime"]


# --- one side in a fresh process, for its peak memory -------------------------------------------------------------
CHILD = {"herd": "herd", "herd (no packing)": "herd-unpacked", "trl": "trl", "trl (ref each step)": "trl-ref"}


def child(side: str, kind: str, d: Path, batch: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        if side.startswith("herd"):
            herd_epoch(kind, d, batch, Path(tmp) / "run", packing=side == "herd")
        else:
            trl_epoch(trl_trainer(kind, d, batch, Path(tmp), precompute=side == "trl"))
    # VmHWM (this process image's peak RSS), not ru_maxrss: Linux carries ru_maxrss over from the forking parent.
    hwm = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM"))
    print(json.dumps({"peak_rss_mb": int(hwm.split()[1]) / 1024}))


def peak_memory(side: str, kind: str, d: Path, batch: int, threads: int) -> float:
    r = subprocess.run([sys.executable, __file__, "--child", side, kind, str(d), str(batch), "--threads",
                        str(threads)], capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dialogs", type=int, default=64)
    p.add_argument("--pairs", type=int, default=32)
    p.add_argument("--batch", type=int, default=8, help="dialogs (SFT) or pairs (DPO) per step")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--child", nargs=4, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.child:
        side, kind, d, batch = a.child
        child(side, kind, Path(d), int(batch))
        return
    print(hardware())
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        make_assets(d, a.dialogs, a.pairs)
        for kind in ("sft", "dpo"):
            sides = {"herd": None, "trl": trl_trainer(kind, d, a.batch, d / f"trl-{kind}")}
            if kind == "sft":
                sides = {"herd": None, "herd (no packing)": None, "trl": sides["trl"]}
            if kind == "dpo":
                sides["trl (ref each step)"] = trl_trainer(kind, d, a.batch, d / "trl-dpo-ref", precompute=False)
            times: dict[str, list[float]] = {s: [] for s in sides}
            tokens: dict[str, int] = {}
            for rep in range(a.repeats + 1):  # the first round warms up
                for side, trainer in sides.items():
                    if side.startswith("herd"):
                        run = d / f"{CHILD[side]}-{kind}-{rep}"
                        seconds, tokens[side] = herd_epoch(kind, d, a.batch, run, packing=side == "herd")
                    else:
                        seconds = trl_epoch(trainer)
                    if rep:
                        times[side].append(seconds)
            every = tokens.get("herd (no packing)", tokens["herd"])  # TRL trains every dialog / pair of the epoch
            what = f"{a.dialogs} dialogs" if kind == "sft" else f"{a.pairs} pairs"
            print(f"\n{kind.upper()}: {what}, {every:,} real tokens per epoch, {a.batch} per step, "
                  f"{a.repeats} repeats (median)")
            tps = {side: tokens.get(side, every) / median(ts) for side, ts in times.items()}
            for side, ts in times.items():
                memory = "" if a.no_memory else \
                    f", peak RSS {peak_memory(CHILD[side], kind, d, a.batch, a.threads):,.0f} MB"
                print(f"  {side:22s} {tps[side]:10,.0f} tokens/s  epoch {median(ts):.2f} s{memory}", flush=True)
            for herd_side in (s for s in tps if s.startswith("herd")):
                for trl_side in (s for s in tps if s.startswith("trl")):
                    print(f"  {herd_side} / {trl_side}: {tps[herd_side] / tps[trl_side]:.2f}x")

if __name__ == "__main__":
    main()
