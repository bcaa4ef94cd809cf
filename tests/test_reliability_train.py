"""Reliability of training (issue 12, defects 7-10): checkpoint checksums, falling back from a damaged checkpoint to
the newest good one with the exact losses of an uninterrupted run, one-line stops, numeric config ranges, and a full
disk during a save.

The corruption matrix runs twice: in-process against ``newest_good_checkpoint`` / ``load_checkpoint`` (every damage
kind, fast), and through ``python -m herd pretrain`` (exit code, stderr, losses) for the cases the issue reproduced.
"""

import dataclasses
import errno
import os
import shlex
import shutil
import subprocess
import sys
import typing
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

import herd
from herd.config import ConfigError, PretrainConfig, check_ranges, load_config, ranged
from herd.train import checkpointing
from herd.train.checkpointing import CheckpointCorrupt, Checkpointer, CheckpointWriteError, newest_good_checkpoint
from herd.train.optim import build_optimizer

from .test_pretrain import TINY, _losses, _pretrain, shards_dir  # noqa: F401  (shards_dir is a fixture)

ROOT = Path(__file__).resolve().parents[1]


# --- 9. numeric config ranges ---------------------------------------------------------------------------------------
ISSUE_VALUES = [("--train.steps=-5", "train.steps=-5", ">= 1"), ("--data.batch_size=0", "data.batch_size=0", ">= 1"),
                ("--data.seq_len=0", "data.seq_len=0", ">= 1"),
                ("--checkpoint.interval=-1", "checkpoint.interval=-1", ">= 0"),
                ("--data.val_fraction=-1", "data.val_fraction=-1.0", "[0, 1)"),
                ("--data.val_fraction=1", "data.val_fraction=1.0", "[0, 1)"),
                ("--train.warmup_steps=-10", "train.warmup_steps=-10", ">= 0"),
                ("--train.grad_clip=-1", "train.grad_clip=-1.0", ">= 0"),
                ("--train.lr=nan", "train.lr=nan", ">= 0"), ("--train.beta2=1", "train.beta2=1.0", "[0, 1)"),
                ("--train.spike_factor=0.5", "train.spike_factor=0.5", "0 (off) or > 1"),
                ("--model.dim=0", "model.dim=0", ">= 1"), ("--parallel.tp=0", "parallel.tp=0", ">= 1")]


@pytest.mark.parametrize("override,key,allowed", ISSUE_VALUES)
def test_out_of_range_values_name_key_value_and_range(override, key, allowed):
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs" / "tiny-cpu.toml", [override])
    assert str(e.value) == f"{key} is out of range: allowed {allowed}"


def test_every_numeric_field_declares_a_range_and_defaults_are_in_it():
    cfg = PretrainConfig()
    for section in dataclasses.fields(cfg):
        sub = getattr(cfg, section.name)
        hints = typing.get_type_hints(type(sub))
        for f in dataclasses.fields(sub):
            numeric = {t for t in typing.get_args(hints[f.name]) or (hints[f.name],)} & {int, float}
            if numeric:
                assert "range" in f.metadata, f"{section.name}.{f.name} has no declared range"
    check_ranges(cfg)
    # Other stages' configs go through the same load_config: their defaults stay valid ...
    from herd.data.pipeline import DataRunConfig
    from herd.scaling.sweep import SweepConfig

    check_ranges(DataRunConfig())
    check_ranges(SweepConfig())
    load_config(ROOT / "configs" / "scaling" / "tiny-cpu.toml", cls=SweepConfig)
    # ... and they declare ranges the same way.

    @dataclass
    class Section:
        temperature: float = ranged(1.0, min=0)
        epochs: int | None = ranged(None, min=1)

    @dataclass
    class StageConfig:
        stage: Section = dataclasses.field(default_factory=Section)

    assert load_config(None, ["--stage.epochs=3"], cls=StageConfig).stage.epochs == 3
    with pytest.raises(ConfigError, match=r"^stage.temperature=-0.5 is out of range: allowed >= 0$"):
        load_config(None, ["--stage.temperature=-0.5"], cls=StageConfig)


def test_cli_rejects_negative_steps_before_training(tmp_path, shards_dir):  # noqa: F811
    r = _pretrain(tmp_path / "run", shards_dir, "--train.steps=-5")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["herd: error: train.steps=-5 is out of range: allowed >= 1"]
    assert not (tmp_path / "run" / "model").exists()


# --- 7, 8. checksums and fallback, in-process ------------------------------------------------------------------------
def _tiny_model_and_optimizer():
    model = herd.Transformer(herd.ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=1024))
    model.init_weights(seed=0)
    cfg = PretrainConfig().train
    return model, build_optimizer(model, cfg)


def _train_step(model, optimizer, seed):
    ids = torch.randint(0, 1024, (2, 17), generator=torch.Generator().manual_seed(seed))
    torch.nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """``checkpoints/step-2`` and ``step-4`` of a tiny model, and the weights each holds."""
    root = tmp_path_factory.mktemp("ckpt") / "checkpoints"
    model, optimizer = _tiny_model_and_optimizer()
    saver = Checkpointer(root, keep=2)
    weights = {}
    for step in (1, 2, 3, 4):
        _train_step(model, optimizer, step)
        if step % 2 == 0:
            saver.save(step, model, optimizer, {"loader": {"position": step}})
            weights[step] = {k: v.clone() for k, v in model.state_dict().items()}
    return root, weights


def _tensor_span(step_dir: Path, fqn: str) -> tuple[str, int, int]:
    """Where DCP stored ``fqn`` (file, offset, length), read from DCP's own metadata."""
    meta = dcp.FileSystemReader(str(step_dir)).read_metadata()
    info = next(v for k, v in meta.storage_data.items() if k.fqn == fqn)
    return info.relative_path, info.offset, info.length


def _overwrite_64k_in_weight(step_dir: Path) -> None:
    name, offset, length = _tensor_span(step_dir, "model.tok_embeddings.weight")
    assert length > 3 * 65536
    with open(step_dir / name, "r+b") as f:
        f.seek(offset + length // 3)
        f.write(os.urandom(65536))


def _truncate(path: Path, keep: float = 0.5) -> None:
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])


def _empty(step_dir: Path) -> None:
    shutil.rmtree(step_dir)
    step_dir.mkdir()


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


# damage -> (kind in the renamed directory, words the reason must contain)
DAMAGE = {
    "overwrite 64 KB in a weight": (_overwrite_64k_in_weight, "checksum", "'model.tok_embeddings.weight'"),
    "truncate .distcp": (lambda d: _truncate(d / "__0_0.distcp"), "truncated", "__0_0.distcp"),
    "truncate .metadata": (lambda d: _truncate(d / ".metadata"), "truncated", ".metadata"),
    "flip a byte of trainer_state.pt": (lambda d: _flip_byte(d / "trainer_state.pt"), "checksum", "trainer_state"),
    "delete .distcp": (lambda d: (d / "__0_0.distcp").unlink(), "missing-file", "__0_0.distcp: file missing"),
    "delete .metadata": (lambda d: (d / ".metadata").unlink(), "missing-file", ".metadata: file missing"),
    "delete trainer_state.pt": (lambda d: (d / "trainer_state.pt").unlink(), "missing-file", "trainer_state.pt"),
    "delete rng file": (lambda d: (d / "rng-rank0.pt").unlink(), "missing-file", "rng-rank0.pt: file missing"),
    "delete checksums.json": (lambda d: (d / "checksums.json").unlink(), "missing-file", "checksums.json"),
    "garbage checksums.json": (lambda d: (d / "checksums.json").write_text("{"), "checksums", "unreadable"),
    "empty directory": (_empty, "empty", "empty directory"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_latest_checkpoint_falls_back_to_the_newest_good_one(damage, two_checkpoints, tmp_path, capsys):
    src, weights = two_checkpoints
    root = tmp_path / "checkpoints"
    shutil.copytree(src, root)
    assert checkpointing.verify_checkpoint(root / "step-4") is True  # undamaged, it verifies
    harm, kind, words = DAMAGE[damage]
    harm(root / "step-4")

    assert newest_good_checkpoint(root) == root / "step-2"
    assert sorted(p.name for p in root.iterdir()) == ["step-2", f"step-4.corrupt-{kind}"]  # kept, not deleted
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("skipping checkpoint step-4: ") and words in err[0], err
    assert err[0].endswith(f"renamed to step-4.corrupt-{kind}")
    # What loads is exactly what step 2 saved.
    model, optimizer = _tiny_model_and_optimizer()
    state = checkpointing.load_checkpoint(root / "step-2", model, optimizer, rank=0)
    assert state["step"] == 2 and state["loader"] == {"position": 2}
    assert all(torch.equal(v, weights[2][k]) for k, v in model.state_dict().items())


def test_no_checkpoint_verifies_stops_with_one_line_and_renames_nothing(two_checkpoints, tmp_path):
    root = tmp_path / "checkpoints"
    shutil.copytree(two_checkpoints[0], root)
    _overwrite_64k_in_weight(root / "step-4")
    (root / "step-2" / "trainer_state.pt").unlink()
    with pytest.raises(CheckpointCorrupt) as e:
        newest_good_checkpoint(root)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"cannot load checkpoint: none in {root} verifies")
    assert "step-4: " in msg and "step-2: " in msg
    assert sorted(p.name for p in root.iterdir()) == ["step-2", "step-4"]  # a rerun says the same, never trains
    assert newest_good_checkpoint(tmp_path / "nothing") is None


def test_checkpoint_without_checksums_loads_with_a_warning(two_checkpoints, tmp_path, capsys):
    """A checkpoint written before checksums existed: its structure is checked, it loads, one warning line."""
    root = tmp_path / "checkpoints"
    shutil.copytree(two_checkpoints[0], root)
    for step in (2, 4):
        d = root / f"step-{step}"
        (d / "checksums.json").unlink()
        state = torch.load(d / "trainer_state.pt", weights_only=False)
        del state["checksums"]
        torch.save(state, d / "trainer_state.pt")
    _truncate(root / "step-4" / "__0_0.distcp", 0.9)  # structure still catches truncation
    assert newest_good_checkpoint(root) == root / "step-2"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "truncated" in err[0] and "step-4.corrupt-truncated" in err[0]
    assert err[1] == f"warning: checkpoint {root / 'step-2'} has no checksums.json (written before checksums): " \
                     "checked its structure only"


def test_loading_a_damaged_checkpoint_outside_the_trainer_names_the_damage(two_checkpoints, tmp_path):
    """init_from and `herd convert` load a single checkpoint: they verify it too."""
    shutil.copytree(two_checkpoints[0] / "step-4", tmp_path / "step-4")
    _overwrite_64k_in_weight(tmp_path / "step-4")
    model, _ = _tiny_model_and_optimizer()
    with pytest.raises(CheckpointCorrupt, match="checksum mismatch in 'model.tok_embeddings.weight'"):
        checkpointing.load_checkpoint(tmp_path / "step-4", model, None)


def test_load_errors_are_one_line(two_checkpoints):
    """DCP's CheckpointException carries a traceback per rank; the error keeps only the cause."""
    model = herd.Transformer(herd.ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=1280))
    with pytest.raises(CheckpointCorrupt) as e:
        checkpointing.load_checkpoint(two_checkpoints[0] / "step-2", model, None)
    assert "\n" not in str(e.value) and "cannot load checkpoint" in str(e.value) and "Traceback" not in str(e.value)


# --- 10. disk full during a save, in-process -------------------------------------------------------------------------
def test_disk_full_during_save_removes_the_temporary_and_says_so(two_checkpoints, tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    shutil.copytree(two_checkpoints[0], root)
    model, optimizer = _tiny_model_and_optimizer()

    def full_disk_save(state, checkpoint_id):  # what torch's zip writer raises when a write hits ENOSPC
        (Path(checkpoint_id) / "__0_0.distcp").write_bytes(b"\0" * 598)
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 704 vs 598")

    monkeypatch.setattr(dcp, "save", full_disk_save)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 << 20, 10 << 20, 4096))
    with pytest.raises(CheckpointWriteError) as e:
        Checkpointer(root, keep=2).save(6, model, optimizer, {"loader": {}})
    assert str(e.value).startswith("no space left on /") and "\n" not in str(e.value)
    assert str(e.value).endswith(f"while writing checkpoint step-6 in {root}; the previous checkpoint step-4 is intact")
    assert sorted(p.name for p in root.iterdir()) == ["step-2", "step-4"]  # no .step-6.tmp left behind
    assert checkpointing.verify_checkpoint(root / "step-4")

    # The same failure with space to spare is a bug, not a full disk: re-raised as it is (temporary still removed).
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(1 << 40, 0, 1 << 40))
    with pytest.raises(RuntimeError, match="unexpected pos"):
        Checkpointer(root, keep=2).save(6, model, optimizer, {"loader": {}})
    assert not (root / ".step-6.tmp").exists()

    def enospc_save(state, checkpoint_id):  # an errno that survives is recognised whatever df says
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(checkpoint_id) / "__0_0.distcp"))

    monkeypatch.setattr(dcp, "save", enospc_save)
    with pytest.raises(CheckpointWriteError, match="the previous checkpoint step-4 is intact"):
        Checkpointer(root, keep=2).save(6, model, optimizer, {"loader": {}})


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_async_checkpoints_carry_checksums_and_fail_cleanly_on_a_full_disk(two_checkpoints, tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    shutil.copytree(two_checkpoints[0], root)
    model, optimizer = _tiny_model_and_optimizer()
    saver = Checkpointer(root, keep=3, async_save=True)
    saver.save(6, model, optimizer, {"loader": {}})
    saver.wait()
    assert checkpointing.verify_checkpoint(root / "step-6") is True  # finalised in the background, with checksums
    monkeypatch.setenv("HERD_FAULT", "disk-full-in-save:8")
    saver.save(8, model, optimizer, {"loader": {}})
    with pytest.raises(CheckpointWriteError, match="writing checkpoint step-8 .*; the previous checkpoint step-6 is"):
        saver.wait()
    assert sorted(p.name for p in root.iterdir()) == ["step-2", "step-4", "step-6"]


# --- the same through `herd pretrain`: exit codes, stderr, exact losses ----------------------------------------------
RUN = ["--train.steps=4", "--checkpoint.interval=2", "--train.val_batches=0", "--checkpoint.export_hf=false"]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, shards_dir):  # noqa: F811
    """An uninterrupted 4-step run with checkpoints at steps 2 and 4."""
    run = tmp_path_factory.mktemp("reference") / "run"
    r = _pretrain(run, shards_dir, *RUN)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2", "step-4"]
    return run


def _resume_after(damage, reference_run, shards, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    harm, kind, words = DAMAGE[damage]
    harm(run / "checkpoints" / "step-4")
    r = _pretrain(run, shards, *RUN)
    assert r.returncode == 0, r.stderr
    skipped = [line for line in r.stderr.splitlines() if line.startswith("skipping checkpoint")]
    assert len(skipped) == 1 and words in skipped[0] and f"renamed to step-4.corrupt-{kind}" in skipped[0], r.stderr
    assert f"resumed from {run / 'checkpoints' / 'step-2'} (step 2)" in r.stdout
    # Steps 3 and 4 are recomputed from step 2: bit-identical to the uninterrupted run.
    assert _losses(run) == _losses(reference_run)
    assert (run / "checkpoints" / f"step-4.corrupt-{kind}").is_dir()


def test_cli_resumes_from_the_newest_good_checkpoint_with_exact_losses(reference_run, shards_dir, tmp_path):  # noqa: F811
    _resume_after("overwrite 64 KB in a weight", reference_run, shards_dir, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncate .distcp", "truncate .metadata", "delete trainer_state.pt",
                                    "delete rng file", "empty directory"])
def test_cli_resumes_after_the_other_damage_kinds(damage, reference_run, shards_dir, tmp_path):  # noqa: F811
    _resume_after(damage, reference_run, shards_dir, tmp_path)


def test_cli_stops_with_one_line_when_no_checkpoint_verifies(reference_run, shards_dir, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    _overwrite_64k_in_weight(run / "checkpoints" / "step-4")
    _empty(run / "checkpoints" / "step-2")
    r = _pretrain(run, shards_dir, *RUN)
    assert r.returncode == 2
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("herd: error: cannot load checkpoint: none in") and "step-2: " in line
    assert _losses(run) == _losses(reference_run)  # nothing trained, nothing logged


def test_cli_disk_full_during_save_then_resume(reference_run, shards_dir, tmp_path):  # noqa: F811
    """HERD_FAULT=disk-full-in-save:4 fails step 4's save with ENOSPC after DCP wrote its files."""
    run = tmp_path / "run"
    r = _pretrain(run, shards_dir, *RUN, env={"HERD_FAULT": "disk-full-in-save:4"})
    assert r.returncode == 2
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("herd: error: no space left on /")
    assert line.endswith("while writing checkpoint step-4 in "
                         f"{run / 'checkpoints'}; the previous checkpoint step-2 is intact")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2"]  # temporary removed
    again = _pretrain(run, shards_dir, *RUN)
    assert again.returncode == 0 and "resumed from" in again.stdout, again.stderr
    assert _losses(run) == _losses(reference_run)


def _can_mount_tmpfs(where: Path) -> bool:
    if not shutil.which("unshare"):
        return False
    where.mkdir()
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {where}"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.slow
def test_cli_real_full_disk_on_a_small_tmpfs(reference_run, shards_dir, tmp_path):  # noqa: F811
    """A 5 MiB tmpfs (private mount namespace): step-2 (3 MB) fits, step-4's temporary does not."""
    disk = tmp_path / "disk"
    if not _can_mount_tmpfs(disk):
        pytest.skip("cannot mount a tmpfs here (no unshare / user namespaces); the simulated ENOSPC tests cover it")
    cmd = [sys.executable, "-m", "herd", "pretrain", "--config", str(ROOT / "configs" / "tiny-cpu.toml"),
           "--run-dir", str(disk / "run"), f"--data.path={shards_dir}", *TINY, *RUN]
    script = (f"mount -t tmpfs -o size=5m tmpfs {disk} && {{ {shlex.join(cmd)} 2>{tmp_path / 'err'}; "
              f"echo $? > {tmp_path / 'rc'}; cp -a {disk / 'run'} {tmp_path / 'run'}; }}")
    subprocess.run(["unshare", "-rm", "sh", "-c", script], check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert (tmp_path / "rc").read_text().strip() == "2"
    (line,) = (tmp_path / "err").read_text().strip().splitlines()
    assert line.startswith(f"herd: error: no space left on {disk} while writing checkpoint step-4"), line
    assert line.endswith("the previous checkpoint step-2 is intact")
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2"]  # temporary removed
    again = _pretrain(run, shards_dir, *RUN)
    assert again.returncode == 0 and "resumed from" in again.stdout, again.stderr
    assert _losses(run) == _losses(reference_run)
