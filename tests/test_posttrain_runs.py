"""``herd sft | reward | dpo`` end to end through the one training loop: a run writes metrics.jsonl and an HF-layout
model (the reward model as LlamaForSequenceClassification), resumes bit-identically after SIGKILL (DPO without
recomputing its stored reference log-probs), and reproduces its single-process losses at dp_shard=2 under torchrun
(1e-5 relative: the same global batch, only the order of fp32 sums differs)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from .conftest import ROOT
from .helpers import kill_after_steps
from .test_posttrain_data import posttrain_model, write_dialogs, write_preferences  # noqa: F401

VERBS = {
    "sft": ["--data.seq_len=128", "--data.batch_size=4", "--data.val_fraction=0.2", "--train.val_batches=1"],
    "reward": ["--data.seq_len=64", "--data.batch_size=4", "--data.val_fraction=0.2", "--train.val_batches=1"],
    "dpo": ["--data.seq_len=64", "--data.batch_size=4"],
}
STEPS = ["--train.steps=4", "--checkpoint.interval=2", "--train.val_interval=2", "--log.progress=false",
         "--log.tensorboard=false", "--train.warmup_steps=1", "--train.lr=1e-3"]


def _data(verb, tmp_path):
    if verb == "sft":
        return write_dialogs(tmp_path / "dialogs.jsonl", n=20)
    return write_preferences(tmp_path / "prefs.jsonl", n=20, edited_every=3 if verb == "reward" else 0)


def _cmd(verb, run_dir, model, data, *extra, nproc=0):
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), "-m",
                 "herd"] if nproc else [sys.executable, "-m", "herd"])
    return [*launcher, verb, "--config", str(ROOT / "configs" / f"{verb}-tiny-cpu.toml"), "--run-dir", str(run_dir),
            f"--model.init_from={model}", f"--data.path={data}", *VERBS[verb], *STEPS, *extra]


def _run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _weights(run_dir):
    from safetensors.torch import load_file

    return {k: v for f in sorted((run_dir / "model").glob("*.safetensors")) for k, v in load_file(str(f)).items()}


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("verb", list(VERBS))
def test_run_resume_after_sigkill_and_dp_shard(tmp_path, posttrain_model, verb):  # noqa: F811
    policy, _ = posttrain_model
    data = _data(verb, tmp_path)
    single = tmp_path / "single"
    out = _run(_cmd(verb, single, policy, data)).stdout
    records = _metrics(single)
    losses = [r["loss"] for r in records]
    assert [r["step"] for r in records] == [1, 2, 3, 4] and all(np.isfinite(losses))
    assert losses[-1] < losses[0]  # it learns (lr 1e-3 on 20 rows)
    if verb == "reward":
        assert "val_accuracy" in records[1] and 0 <= records[-1]["val_accuracy"] <= 1
        config = json.loads((single / "model" / "config.json").read_text())
        assert config["architectures"] == ["LlamaForSequenceClassification"]
    else:
        from herd import load_model

        load_model(single / "model")  # a plain Llama directory
    if verb == "dpo":
        assert "reference pass" in out

    # SIGKILL after step 3 (the last checkpoint is step 2), then the same command resumes.
    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_cmd(verb, killed, policy, data), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    kill_after_steps(proc, killed, 3)
    resumed = _run(_cmd(verb, killed, policy, data))
    assert "resumed from" in resumed.stdout
    if verb == "dpo":
        assert "reference pass" not in resumed.stdout  # read back from RUN_DIR/dpo_reference.pt
    assert [r["loss"] for r in _metrics(killed)] == losses  # bit-identical
    a, b = _weights(single), _weights(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # FSDP2 over two processes: the same global batches, the same losses.
    sharded = tmp_path / "dp_shard"
    _run(_cmd(verb, sharded, policy, data, "--parallel.dp_shard=2", nproc=2))
    assert np.allclose([r["loss"] for r in _metrics(sharded)], losses, rtol=1e-5, atol=0)
    # Weights after 4 Adam steps at lr 1e-3: an element whose gradient is at fp32 noise level moves by up to ~lr times
    # that noise's sign; seen up to 7e-6.
    a, b = _weights(single), _weights(sharded)
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=2e-5) for k in a)


def test_sft_with_lora_trains_adapters_and_exports_merged_and_peft(tmp_path, posttrain_model):  # noqa: F811
    from herd import load_model
    from herd.config import load_config
    from herd.posttrain.config import SFTRunConfig
    from herd.posttrain.sft import sft

    policy, _ = posttrain_model
    cfg = load_config(ROOT / "configs" / "sft-tiny-cpu.toml",
                      [f"--model.init_from={policy}", f"--data.path={write_dialogs(tmp_path / 'd.jsonl', n=8)}",
                       "--data.seq_len=128", "--data.batch_size=2", "--data.val_fraction=0", "--train.steps=2",
                       "--log.progress=false", "--log.tensorboard=false", "--lora.rank=4", "--lora.dropout=0",
                       "--lora.target_modules=wq,wv,w2", "--train.lr=1e-2"], cls=SFTRunConfig)
    sft(cfg, tmp_path / "run")
    base, tuned = load_model(policy).state_dict(), load_model(tmp_path / "run" / "model").state_dict()
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    # Only the adapted projections move (merged into their weights); everything else stays the base's.
    assert changed == {f"layers.{i}.{m}.weight" for i in range(2)
                       for m in ("attention.wq", "attention.wv", "feed_forward.w2")}
    adapter = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and set(adapter["target_modules"]) == {"q_proj", "v_proj", "down_proj"}


def test_metrics_count_the_real_tokens_of_padded_rows_and_resume_the_count(tmp_path, posttrain_model):  # noqa: F811
    """``tokens_seen`` / ``tokens_per_s`` of a stage that pads its rows count the dialogs' tokens, not
    ``batch_size x seq_len``: over one epoch without packing, exactly the tokens of every dialog (``ids[:-1]``); a
    resumed run carries the count on from its checkpoint."""
    from herd.config import load_config
    from herd.posttrain.config import SFTRunConfig
    from herd.posttrain.data import Skips
    from herd.posttrain.sft import encode_sft_examples, open_tokenizer, sft

    policy, _ = posttrain_model

    def cfg(steps):
        return load_config(ROOT / "configs" / "sft-tiny-cpu.toml",
                           [f"--model.init_from={policy}", f"--data.path={write_dialogs(tmp_path / 'd.jsonl', n=12)}",
                            "--data.seq_len=128", "--data.batch_size=4", "--data.val_fraction=0",
                            "--data.packing=false", f"--train.steps={steps}", "--checkpoint.interval=2",
                            "--log.progress=false", "--log.tensorboard=false"], cls=SFTRunConfig)

    c = cfg(3)
    real = sum(len(x) for x, _ in encode_sft_examples(c, open_tokenizer(c), Skips(False)))
    records = sft(c, tmp_path / "run")
    assert records[-1]["tokens_seen"] == real < 3 * c.data.batch_size * c.data.seq_len
    seen = [0] + [r["tokens_seen"] for r in records]
    for r, before in zip(records, seen):
        assert r["tokens_per_s"] * r["step_time_s"] == pytest.approx(r["tokens_seen"] - before)
    again = sft(cfg(4), tmp_path / "run")  # resumes from the checkpoint of step 3 for one more step
    assert [r["step"] for r in again] == [4]
    step4 = again[0]["tokens_per_s"] * again[0]["step_time_s"]
    assert 0 < step4 <= c.data.batch_size * c.data.seq_len and again[0]["tokens_seen"] == pytest.approx(real + step4)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("verb", ["reward", "dpo"])
def test_tensor_parallel_reproduces_the_single_process_run(tmp_path, posttrain_model, verb):  # noqa: F811
    """``parallel.tp=2`` (Megatron-style with sequence parallelism; rows padded to a multiple of 2): DPO's loss runs on
    vocabulary-sharded logits (``loss_parallel``), the reward model's score head is replicated. Same losses as one
    process to 1e-5 relative, and final weights as close as the dp_shard run's."""
    policy, _ = posttrain_model
    data = _data(verb, tmp_path)
    single, split = tmp_path / "single", tmp_path / "tp"
    _run(_cmd(verb, single, policy, data))
    _run(_cmd(verb, split, policy, data, "--parallel.tp=2", nproc=2))
    losses = [r["loss"] for r in _metrics(single)]
    assert len(losses) == 4 and np.allclose([r["loss"] for r in _metrics(split)], losses, rtol=1e-5, atol=0)
    # Adam moves an element whose gradient is at fp32 noise level by up to lr per step, in either direction: the
    # bound is 4 steps x lr 1e-3 (the reward run's score-head gradients are summed over sequence shards).
    a, b = _weights(single), _weights(split)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=4e-3) for k in a)
