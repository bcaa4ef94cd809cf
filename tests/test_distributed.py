"""Data-parallel pretraining under torchrun on CPU (gloo, 2 processes): FSDP2 and HSDP reproduce the single-process
losses of the same global batch, a checkpoint saved at dp_shard=2 resumes in one process, and a killed rank makes
torchrun restart the job from its last checkpoint with the same losses."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from .test_pretrain import ROOT, TINY, _losses, _pretrain, shards_dir  # noqa: F401  (shards_dir is a fixture)

pytestmark = pytest.mark.distributed


def _torchrun(run_dir, shards, *extra, env=None, restarts=0):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           f"--max-restarts={restarts}", "-m", "herd", "pretrain", "--config", str(ROOT / "configs" / "tiny-cpu.toml"),
           "--run-dir", str(run_dir), f"--data.path={shards}", *TINY, *extra]
    return subprocess.run(cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def single(tmp_path_factory, shards_dir):  # noqa: F811
    run = tmp_path_factory.mktemp("single")
    r = _pretrain(run, shards_dir, "--train.steps=6", "--checkpoint.interval=3")
    assert r.returncode == 0, r.stderr
    return _losses(run)


# Tolerance: the same global batch split over two ranks differs from one process only in the order of the
# gradient sums (reduce-scatter vs one backward), i.e. fp32 rounding; 1e-5 relative over 6 steps (seen: ~1e-7).
@pytest.mark.parametrize("layout", [["--parallel.dp_shard=2"], ["--parallel.dp_replicate=2"]])
def test_data_parallel_matches_single_process(tmp_path, shards_dir, single, layout):  # noqa: F811
    r = _torchrun(tmp_path / "dp", shards_dir, "--train.steps=6", *layout)
    assert r.returncode == 0, r.stderr[-3000:]
    assert np.allclose(_losses(tmp_path / "dp"), single, rtol=1e-5, atol=0)
    assert (tmp_path / "dp" / "model" / "config.json").exists()  # full weights gathered and exported by rank 0


def test_checkpoint_saved_at_dp2_resumes_in_one_process(tmp_path, shards_dir, single):  # noqa: F811
    r = _torchrun(tmp_path / "run", shards_dir, "--train.steps=3", "--parallel.dp_shard=2")
    assert r.returncode == 0, r.stderr[-3000:]
    r = _pretrain(tmp_path / "run", shards_dir, "--train.steps=6")
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr
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


def test_bad_layouts_fail_before_any_process_group(tmp_path, shards_dir):  # noqa: F811
    r = _pretrain(tmp_path / "a", shards_dir, "--parallel.dp_shard=2")
    assert r.returncode == 2 and "torchrun --nproc-per-node 2" in r.stderr
    r = _torchrun(tmp_path / "b", shards_dir, "--parallel.dp_shard=2", "--data.batch_size=3")
    assert r.returncode != 0 and "must split evenly over 2 data-parallel ranks" in r.stderr
    r = _pretrain(tmp_path / "c", shards_dir, "--parallel.dp_shard=0")
    assert r.returncode == 2 and "parallel.dp_shard" in r.stderr
