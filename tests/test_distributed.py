"""Distributed pretraining under torchrun on CPU (gloo, 2 processes): FSDP2, HSDP, tensor parallelism and pipeline
parallelism (GPipe, 1F1B, interleaved 1F1B) reproduce the single-process losses of the same global batch; checkpoints
saved at one layout resume at another; a killed rank makes torchrun restart the job from its last checkpoint with the
same losses; replicas that drift apart (silent data corruption) are caught; asynchronous checkpoints resume exactly."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from .test_pretrain import ROOT, TINY, _losses, _pretrain, shards_dir  # noqa: F401  (shards_dir is a fixture)

pytestmark = pytest.mark.distributed


def _torchrun(run_dir, shards, *extra, env=None, restarts=0, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           f"--max-restarts={restarts}", "-m", "herd", "pretrain", "--config", str(ROOT / "configs" / "tiny-cpu.toml"),
           "--run-dir", str(run_dir), f"--data.path={shards}", *TINY, *extra]
    return subprocess.run(cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=300)


def _single_process_losses(run, shards, *extra):
    r = _pretrain(run, shards, "--train.steps=6", *extra)
    assert r.returncode == 0, r.stderr
    return _losses(run)


@pytest.fixture(scope="module")
def single(tmp_path_factory, shards_dir):  # noqa: F811
    return _single_process_losses(tmp_path_factory.mktemp("single"), shards_dir, "--checkpoint.interval=3")


@pytest.fixture(scope="module")
def single_4_layers(tmp_path_factory, shards_dir):  # noqa: F811
    return _single_process_losses(tmp_path_factory.mktemp("single4"), shards_dir, "--model.n_layers=4")


def _weights(run_dir):
    from safetensors.torch import load_file

    return load_file(str(next((run_dir / "model").glob("*.safetensors"))))


# Tolerance: every layout computes the same global batch; it differs from one process only in the order of sums
# (gradients reduce-scattered over ranks, matmuls split over heads and reduced, micro-batch gradients accumulated),
# i.e. fp32 rounding. 1e-5 relative over 6 steps (seen: ~1e-7), ten times tighter than the 1e-4.
LAYOUTS = {"dp_shard": ["--parallel.dp_shard=2"], "hsdp": ["--parallel.dp_replicate=2"], "tp": ["--parallel.tp=2"],
           "pp_1f1b": ["--parallel.pp=2"], "pp_gpipe": ["--parallel.pp=2", "--parallel.pp_schedule=gpipe"]}


@pytest.mark.parametrize("layout", LAYOUTS, ids=list(LAYOUTS))
def test_layout_matches_single_process(tmp_path, shards_dir, single, layout):  # noqa: F811
    r = _torchrun(tmp_path / "run", shards_dir, "--train.steps=6", *LAYOUTS[layout])
    assert r.returncode == 0, r.stderr[-3000:]
    assert np.allclose(_losses(tmp_path / "run"), single, rtol=1e-5, atol=0)
    # The full weights are gathered from every shard / stage and exported by rank 0 under the usual names.
    assert (tmp_path / "run" / "model" / "config.json").exists()
    exported = _weights(tmp_path / "run")
    assert "model.layers.1.mlp.down_proj.weight" in exported and "model.embed_tokens.weight" in exported


# Two dimensions at once (4 processes on 2 cores): FSDP2 over a tensor-parallel model, and pipeline stages that are
# tensor parallel (where the tied embedding's gradient crosses between the first and last stage shard by shard).
@pytest.mark.parametrize("layout", [["--parallel.dp_shard=2", "--parallel.tp=2"], ["--parallel.pp=2", "--parallel.tp=2"]],
                         ids=["dp_shard x tp", "pp x tp"])
def test_composed_layouts_match_single_process(tmp_path, shards_dir, single, layout):  # noqa: F811
    r = _torchrun(tmp_path / "run", shards_dir, "--train.steps=6", *layout, nproc=4)
    assert r.returncode == 0, r.stderr[-3000:]
    assert np.allclose(_losses(tmp_path / "run"), single, rtol=1e-5, atol=0)


def test_interleaved_pipeline_matches_single_process(tmp_path, shards_dir, single_4_layers):  # noqa: F811
    # Interleaved 1F1B runs two stages per rank (4 stages of one layer: stage s on rank s mod 2).
    r = _torchrun(tmp_path / "run", shards_dir, "--train.steps=6", "--model.n_layers=4", "--parallel.pp=2",
                  "--parallel.pp_schedule=interleaved")
    assert r.returncode == 0, r.stderr[-3000:]
    assert np.allclose(_losses(tmp_path / "run"), single_4_layers, rtol=1e-5, atol=0)
    assert len({k for k in _weights(tmp_path / "run") if ".layers." in k and k.endswith("q_proj.weight")}) == 4


@pytest.mark.parametrize("layout", ["dp_shard", "tp", "pp_1f1b"])
def test_checkpoint_resumes_at_another_layout(tmp_path, shards_dir, single, layout):  # noqa: F811
    r = _torchrun(tmp_path / "run", shards_dir, "--train.steps=3", *LAYOUTS[layout])
    assert r.returncode == 0, r.stderr[-3000:]
    r = _pretrain(tmp_path / "run", shards_dir, "--train.steps=6")  # saved at 2 ranks, resumed in one process
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr
    assert np.allclose(_losses(tmp_path / "run"), single, rtol=1e-5, atol=0)


def test_single_process_checkpoint_resumes_on_a_pipeline(tmp_path, shards_dir, single):  # noqa: F811
    # The other direction, with the tied embedding: the last stage's output head finds its optimizer state saved
    # under the embedding's name.
    r = _pretrain(tmp_path / "run", shards_dir, "--train.steps=3")
    assert r.returncode == 0, r.stderr
    r = _torchrun(tmp_path / "run", shards_dir, "--train.steps=6", "--parallel.pp=2")
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr[-3000:]
    assert np.allclose(_losses(tmp_path / "run"), single, rtol=1e-5, atol=0)


def test_killed_rank_restarts_from_the_last_checkpoint(tmp_path, shards_dir, single):  # noqa: F811
    r = _torchrun(tmp_path / "run", shards_dir, "--train.steps=6", "--checkpoint.interval=3",
                  "--parallel.dp_shard=2", env={"HERD_FAULT": "kill-rank1-at:5"}, restarts=1)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout  # the second attempt picked up step-3
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [rec["step"] for rec in records] == [1, 2, 3, 4, 5, 6]
    assert np.allclose([rec["loss"] for rec in records], single, rtol=1e-5, atol=0)
    report = [line for line in r.stdout.splitlines() if line.startswith("goodput:")]
    assert len(report) == 1 and "restarts 1)" in report[0]  # the count survived the restart in the checkpoint
    assert all(0 < rec["goodput"] <= 1 for rec in records)


def test_corrupted_replica_is_named_and_stops_or_rolls_back(tmp_path, shards_dir, single):  # noqa: F811
    hsdp = ["--parallel.dp_replicate=2", "--parallel.sdc_check_interval=1", "--checkpoint.interval=2"]
    r = _torchrun(tmp_path / "stop", shards_dir, "--train.steps=6", *hsdp, env={"HERD_FAULT": "corrupt-rank1-at:3"})
    assert r.returncode != 0
    assert "step 3: silent data corruption" in r.stderr and "rank(s) [1] disagree with rank 0" in r.stderr
    assert [rec["step"] for rec in _records(tmp_path / "stop")] == [1, 2]  # stopped before logging the bad step
    r = _torchrun(tmp_path / "rollback", shards_dir, "--train.steps=6", *hsdp, "--train.on_bad_step=rollback",
                  env={"HERD_FAULT": "corrupt-rank1-at:3"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "rolled back to" in r.stderr and "step-2" in r.stderr
    assert np.allclose(_losses(tmp_path / "rollback"), single, rtol=1e-5, atol=0)  # replayed: nothing skipped


def test_poisoned_step_on_a_pipeline_is_skipped(tmp_path, shards_dir, single):  # noqa: F811
    r = _torchrun(tmp_path / "run", shards_dir, "--train.steps=6", "--parallel.pp=2", env={"HERD_FAULT": "nan-at:3"})
    assert r.returncode == 0, r.stderr[-3000:]
    records = _records(tmp_path / "run")
    assert records[2]["loss"] is None and records[2]["skipped"].startswith("non-finite loss")
    assert np.allclose([rec["loss"] for rec in records[:2]], single[:2], rtol=1e-5, atol=0)
    assert all(np.isfinite(rec["loss"]) for rec in records[3:])
    assert all(torch.isfinite(t).all() for t in _weights(tmp_path / "run").values())


def test_async_checkpoints_resume_exactly(tmp_path, shards_dir, single):  # noqa: F811
    r = _torchrun(tmp_path / "run", shards_dir, "--train.steps=6", "--checkpoint.interval=3",
                  "--checkpoint.async_save=true", "--parallel.dp_shard=2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert np.allclose(_losses(tmp_path / "run"), single, rtol=1e-5, atol=0)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-3", "step-6"]
    # step-3 was written in the background while steps 4-6 changed the weights: it must hold step 3's state.
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-6")
    r = _pretrain(tmp_path / "run", shards_dir, "--train.steps=6", "--checkpoint.async_save=true")
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr
    assert np.allclose(_losses(tmp_path / "run"), single, rtol=1e-5, atol=0)


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_layout_errors_name_the_field(monkeypatch):
    from herd.config import ConfigError, load_config
    from herd.model.args import ModelArgs
    from herd.train.parallelize import check_layout

    args = ModelArgs(dim=64, n_layers=4, n_heads=4, n_kv_heads=1, vocab_size=256, multiple_of=16)

    def error(world_size, *overrides):
        monkeypatch.setenv("WORLD_SIZE", str(world_size))
        cfg = load_config(None, ["--data.batch_size=4", "--data.seq_len=64", *overrides])
        with pytest.raises(ConfigError) as e:
            check_layout(cfg, args)
        return str(e.value)

    assert "parallel.tp=2 does not divide model.n_kv_heads (1)" in error(2, "--parallel.tp=2")
    assert "needs 8 stages, but the model has only 4 layers" in error(
        4, "--parallel.pp=4", "--parallel.pp_schedule=interleaved")
    assert "pp_schedule must be one of gpipe, 1f1b, interleaved" in error(2, "--parallel.pp=2",
                                                                          "--parallel.pp_schedule=zigzag")
    assert "set train.grad_accum=1" in error(2, "--parallel.pp=2", "--train.grad_accum=2")
    with pytest.raises(ConfigError, match=r"train.grad_accum=0 is out of range: allowed >= 1"):
        load_config(None, ["--train.grad_accum=0"])  # the config's own range check, before any layout
    assert "over train.grad_accum=3 micro-batches" in error(1, "--train.grad_accum=3")
    assert "pp_microbatches=3 does not divide the per-rank batch of 4" in error(
        2, "--parallel.pp=2", "--parallel.pp_microbatches=3")
    assert "needs parallel.pp_microbatches >= parallel.pp=4" in error(
        4, "--parallel.pp=4", "--parallel.pp_microbatches=2", "--parallel.pp_schedule=1f1b")
    assert "needs parallel.dp_replicate >= 2" in error(2, "--parallel.dp_shard=2", "--parallel.sdc_check_interval=5")
    assert "= 4, but 2 process(es) were started" in error(2, "--parallel.tp=2", "--parallel.pp=2")
    assert "train.compile=true with parallel.tp > 1 is not supported" in error(2, "--parallel.tp=2",
                                                                                "--train.compile=true")


def test_bad_layouts_fail_before_any_process_group(tmp_path, shards_dir):  # noqa: F811
    r = _pretrain(tmp_path / "a", shards_dir, "--parallel.dp_shard=2")
    assert r.returncode == 2 and "torchrun --nproc-per-node 2" in r.stderr
    r = _torchrun(tmp_path / "b", shards_dir, "--parallel.dp_shard=2", "--data.batch_size=3")
    assert r.returncode != 0 and "must split evenly over 2 data-parallel ranks" in r.stderr
    r = _pretrain(tmp_path / "c", shards_dir, "--parallel.dp_shard=0")
    assert r.returncode == 2 and "parallel.dp_shard" in r.stderr
