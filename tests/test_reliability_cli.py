"""CLI and files under bad input and faults (issue 12, defects 11-17): one line naming the file, key or flag, exit 2.

Every test drives the public interface: ``herd.cli.main(argv)`` in-process (the exit code and stderr of ``python -m
herd``, without a Python start-up per case) or ``python -m herd`` in a subprocess where a separate process is the point
(permissions, kills, another working directory).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch

import herd
from herd.cli import main
from herd.io import atomic_directory

from .conftest import LLAMA3_TOKENIZER

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def herd_cli(capsys, *argv) -> tuple[int, str]:
    """Exit code and stderr of ``herd ARGV`` (argument errors exit through SystemExit, as in the real CLI)."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("herd: warning: ")]
    assert len(lines) == 1 and lines[0].startswith("herd: error: ") and "Traceback" not in err, err
    return lines[0]


def run_herd(*argv, cwd=None, prefix=(), timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, sys.executable, "-m", "herd", *map(str, argv)], capture_output=True, text=True,
                          cwd=cwd, env=ENV, timeout=timeout)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, small_tokenizer):
    """A tiny HF-layout model directory with its tokenizer (vocabulary = the tokenizer's ids)."""
    tok, _ = small_tokenizer
    model = herd.Transformer(herd.ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=tok.n_words,
                                            multiple_of=32, max_seq_len=128))
    model.init_weights(seed=0)
    path = tmp_path_factory.mktemp("model") / "m"
    herd.save_model(model, path, tokenizer=tok)
    return path


def copy_model(model_dir: Path, dst: Path) -> Path:
    shutil.copytree(model_dir, dst)
    return dst


# --- 11: the tokenizer is checked against the model directory --------------------------------------------------------
def test_tokenizer_model_cut_at_a_line_boundary_is_refused(capsys, model_dir, tmp_path):
    bad = copy_model(model_dir, tmp_path / "m")
    lines = (model_dir / "tokenizer.model").read_bytes().splitlines(keepends=True)
    (bad / "tokenizer.model").write_bytes(b"".join(lines[:-5]))  # still a valid rank file, 5 ranks short
    for argv in (["generate", "--model", bad, "--prompt", "hi", "--max-new-tokens", "1"],
                 ["convert", bad, tmp_path / "out", "--to", "meta"]):
        code, err = herd_cli(capsys, *argv)
        line = one_line_error(err)
        assert code == 2 and f"{bad / 'tokenizer.model'} has {len(lines) - 5} BPE ranks" in line, line
        assert "bos_token_id is" in line and "config.json" in line, line
    assert not (tmp_path / "out").exists()
    # Without the ids in config.json, tokenizer.json's added tokens still give it away.
    for name in ("config.json", "generation_config.json"):
        cfg = json.loads((bad / name).read_text())
        cfg.pop("bos_token_id"), cfg.pop("eos_token_id")
        (bad / name).write_text(json.dumps(cfg))
    code, err = herd_cli(capsys, "generate", "--model", bad, "--prompt", "hi", "--max-new-tokens", "1")
    assert code == 2 and "tokenizer.json: declares <|begin_of_text|> as id" in one_line_error(err)
    # The intact directory still works.
    code, err = herd_cli(capsys, "generate", "--model", model_dir, "--prompt", "hi", "--max-new-tokens", "1")
    assert code == 0, err


def _llama3_meta_dir(path: Path, rank_lines: list[bytes]) -> Path:
    """A Meta-layout directory with Llama 3's vocabulary (128,256) and the given rank file (tiny otherwise)."""
    model = herd.Transformer(herd.ModelArgs(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=128256,
                                            multiple_of=16, max_seq_len=64, tie_embeddings=True))
    model.init_weights(seed=0)
    herd.save_model(model, path, format="meta")
    (path / "tokenizer.model").write_bytes(b"".join(rank_lines))
    return path


def test_truncated_llama3_tokenizer_model(capsys, tmp_path):
    if not LLAMA3_TOKENIZER.exists():
        pytest.skip(f"Meta's tokenizer.model not found at {LLAMA3_TOKENIZER}")
    lines = LLAMA3_TOKENIZER.read_bytes().splitlines(keepends=True)
    assert len(lines) == 128000
    bad = _llama3_meta_dir(tmp_path / "cut", lines[:-10])
    code, err = herd_cli(capsys, "generate", "--model", bad, "--prompt", "hi", "--max-new-tokens", "1")
    line = one_line_error(err)
    assert code == 2 and "vocab_size 128,256 is Llama 3's" in line and "127,990 BPE ranks" in line, line
    # Cut inside a line: the rank file itself is malformed, and the error names its line.
    cut = tmp_path / "mid.model"
    cut.write_bytes(b"".join(lines[:-1]) + lines[-1][:6])
    code, err = herd_cli(capsys, "data", "tokenize", "--input", cut, "--tokenizer", cut, "--out", tmp_path / "s")
    assert code == 2 and f"{cut}:128000:" in one_line_error(err), err
    # Meta's file as shipped loads and generates.
    good = _llama3_meta_dir(tmp_path / "good", lines)
    code, err = herd_cli(capsys, "generate", "--model", good, "--prompt", "hi", "--max-new-tokens", "1")
    assert code == 0, err


# --- 12: OS errors: the path and the OS's reason, for reads and writes -----------------------------------------------
def _unprivileged() -> tuple[str, ...]:
    """A command prefix under which file permissions apply: none for an ordinary user; for root, util-linux's setpriv
    dropping the capabilities that bypass them (root's owner bits then apply like anyone's)."""
    if os.geteuid() != 0:
        return ()
    prefix = ("setpriv", "--inh-caps=-dac_override,-dac_read_search", "--bounding-set=-dac_override,-dac_read_search")
    if shutil.which("setpriv") is None or subprocess.run([*prefix, "true"], capture_output=True).returncode != 0:
        pytest.skip("running as root without setpriv: permissions cannot be made to apply")
    return prefix


def test_permission_denied_reads_and_writes_name_the_path(model_dir, tmp_path):
    prefix = _unprivileged()
    model = copy_model(model_dir, tmp_path / "m")
    (model / "model.safetensors").chmod(0)  # unreadable weights were reported as "No such file or directory"
    r = run_herd("convert", model, tmp_path / "out", "--to", "meta", prefix=prefix)
    assert r.returncode == 2 and one_line_error(r.stderr) == (
        f"herd: error: {model / 'model.safetensors'}: Permission denied"), r.stderr
    (model / "model.safetensors").chmod(0o644)
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)  # the output's parent is not writable: the output path is named, not a temporary
    r = run_herd("convert", model, locked / "out", "--to", "hf", prefix=prefix)
    assert r.returncode == 2 and one_line_error(r.stderr) == f"herd: error: {locked / 'out'}: Permission denied"


def test_read_only_file_system_names_the_output(capsys, model_dir, tmp_path, monkeypatch):
    """EROFS where the output directory is created (simulated: mounting a file system needs privileges)."""
    import errno

    def read_only(prefix="", suffix="", dir=None):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.path.join(dir, prefix + "x"))

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    code, err = herd_cli(capsys, "convert", model_dir, tmp_path / "out", "--to", "hf")
    assert code == 2 and one_line_error(err) == f"herd: error: {tmp_path / 'out'}: Read-only file system"


def test_disk_full_while_converting_is_one_line(capsys, model_dir, tmp_path, monkeypatch):
    """torch.save reports a full disk as 'unexpected pos A vs B', safetensors as '(os error 28)': both become the
    OS's ENOSPC naming the output, and no temporary is left (a real small tmpfs is used where it can be mounted)."""
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)],
                             capture_output=True).returncode == 0 if os.geteuid() == 0 else False
    try:
        if not mounted:  # the failure torch.save gives on a full disk, injected
            def full(*args, **kwargs):
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 2496 vs 2390")
            monkeypatch.setattr(torch, "save", full)
        for fmt in ("meta", "hf"):
            code, err = herd_cli(capsys, "convert", model_dir, small / "out", "--to", fmt)
            assert code == 2 and one_line_error(err) == (
                f"herd: error: {small / 'out'}: No space left on device"), err
            assert os.listdir(small) == []
            if not mounted:
                break
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(small)], check=True)  # lazy: even while a failed write holds it


# --- 13: config.json / params.json with wrong types --------------------------------------------------------------------
@pytest.mark.parametrize("edit,key", [
    (lambda c: c.update(hidden_size="64"), "'hidden_size' must be a positive integer, got '64'"),
    (lambda c: [c], "expected a JSON object of model settings, got a list"),
    (lambda c: c.update(num_attention_heads=0), "'num_attention_heads' must be a positive integer, got 0"),
    (lambda c: c.update(rms_norm_eps="1e-5"), "'rms_norm_eps' must be a positive number"),
    (lambda c: c.update(tie_word_embeddings="false"), "'tie_word_embeddings' must be true or false"),
    (lambda c: c.update(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "rope_scaling: missing required key"),
])
def test_bad_config_json_names_the_key(capsys, model_dir, tmp_path, edit, key):
    bad = copy_model(model_dir, tmp_path / "m")
    cfg = json.loads((bad / "config.json").read_text())
    cfg = edit(cfg) or cfg
    (bad / "config.json").write_text(json.dumps(cfg))
    for argv in (["info", bad], ["convert", bad, tmp_path / "out", "--to", "meta"]):
        code, err = herd_cli(capsys, *argv)
        line = one_line_error(err)
        assert code == 2 and line.startswith(f"herd: error: {bad / 'config.json'}: ") and key in line, line


@pytest.mark.parametrize("params,key", [([1, 2], "expected a JSON object"),
                                        ({"dim": 64, "n_layers": 1, "n_heads": 0}, "'n_heads' must be a positive"),
                                        ({"dim": 64, "n_layers": 1, "n_heads": 4, "norm_eps": "x"},
                                         "'norm_eps' must be a positive number")])
def test_bad_params_json_names_the_key(capsys, tmp_path, params, key):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "params.json").write_text(json.dumps(params))
    code, err = herd_cli(capsys, "info", tmp_path / "m")
    line = one_line_error(err)
    assert code == 2 and line.startswith(f"herd: error: {tmp_path / 'm' / 'params.json'}: ") and key in line, line


# --- 14: convert flags; a training checkpoint keeps its tokenizer from any working directory -------------------------
@pytest.mark.parametrize("flag", [["--shards", "-2"], ["--shards", "0"], ["--max-shard-gb", "0"]])
def test_convert_rejects_non_positive_sizes(capsys, model_dir, tmp_path, flag):
    code, err = herd_cli(capsys, "convert", model_dir, tmp_path / "out", "--to", "meta", *flag)
    assert code == 2 and f"argument {flag[0]}: must be" in err, err
    assert not (tmp_path / "out").exists()


def test_convert_training_checkpoint_from_another_directory_keeps_the_tokenizer(capsys, small_tokenizer, tmp_path,
                                                                                monkeypatch):
    from herd.config import PretrainConfig
    from herd.data.shards import tokenize_to_shards
    from herd.train.checkpointing import Checkpointer

    _, tok_dir = small_tokenizer
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "data" / "docs.txt").write_text("a first document\n\nand a second one\n")
    tokenize_to_shards([project / "data" / "docs.txt"], tok_dir, project / "shards", workers=1, progress=False)
    # The run read its shards as "shards", relative to the project directory it was started in.
    cfg = PretrainConfig()
    cfg.data.path = "shards"
    tok = herd.Tokenizer(project / "shards")
    args = herd.ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=tok.n_words, multiple_of=16, max_seq_len=64)
    model = herd.Transformer(args)
    model.init_weights(seed=0)
    Checkpointer(project / "runs" / "r1" / "checkpoints", keep=1).save(
        2, model, torch.optim.AdamW(model.parameters()),
        {"config": dataclasses.asdict(cfg), "model_args": dataclasses.asdict(args)})
    step = project / "runs" / "r1" / "checkpoints" / "step-2"
    monkeypatch.chdir(tmp_path)  # not the project directory
    code, err = herd_cli(capsys, "convert", step.relative_to(tmp_path), "out", "--to", "hf")
    assert code == 0, err
    assert herd.Tokenizer(tmp_path / "out").fingerprint() == tok.fingerprint()
    # Nowhere to be found: an error that says what to pass, never a model directory without a tokenizer.
    shutil.rmtree(project / "shards")
    code, err = herd_cli(capsys, "convert", step, tmp_path / "out2", "--to", "hf")
    assert code == 2 and "pass --tokenizer PATH" in one_line_error(err) and not (tmp_path / "out2").exists()
    code, err = herd_cli(capsys, "convert", step, tmp_path / "out2", "--to", "hf", "--tokenizer", tok_dir)
    assert code == 0 and (tmp_path / "out2" / "tokenizer.model").exists(), err


# --- 15: temporaries of killed runs are removed; a killed tokenize prints no worker tracebacks -----------------------
def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temporaries_of_dead_processes_are_removed(capsys, model_dir, tmp_path):
    host = socket.gethostname()
    dead, alive = _dead_pid(), os.getpid()
    stale = tmp_path / f".out.tmp-{host}-{dead}-abcd1234"
    busy = tmp_path / f".out.tmp-{host}-{alive}-efgh5678"  # a process still writing: left alone
    for d in (stale, busy):
        (d / "sub").mkdir(parents=True)
        (d / "sub" / "weights.bin").write_bytes(b"x" * 1000)
    code, err = herd_cli(capsys, "convert", model_dir, tmp_path / "out", "--to", "meta")
    assert code == 0, err
    assert not stale.exists() and busy.exists()
    # A directory moved aside for an overwrite by a process killed before the second rename is put back.
    from herd.io import remove_stale_temps

    old = tmp_path / f".kept.tmp-{host}-{dead}-old"
    old.mkdir()
    (old / "f").write_text("previous")
    remove_stale_temps(tmp_path / "kept")
    assert (tmp_path / "kept" / "f").read_text() == "previous" and not old.exists()


@pytest.mark.slow
def test_killed_tokenize_leaves_no_temporary_and_no_traceback(small_tokenizer, tmp_path):
    _, tok_dir = small_tokenizer
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": f"document {i} " + "word " * 200}) for i in range(30000)))
    out = tmp_path / "shards"
    for sig, code in ((signal.SIGINT, 130), (signal.SIGTERM, 128 + signal.SIGTERM)):
        p = subprocess.Popen([sys.executable, "-m", "herd", "data", "tokenize", "--input", str(corpus), "--tokenizer",
                              str(tok_dir), "--out", str(out), "--workers", "2"], env=ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
        # Kill once the workers are encoding (the progress bar has counted a document): the workers are then killed
        # by SIGTERM mid-write (a Pool's shared result lock would be lost with them) or ignore SIGINT.
        chunks: list[str] = []
        reader = threading.Thread(target=lambda out, f: out.extend(iter(lambda: f.read(1), "")),
                                  args=(chunks, p.stderr), daemon=True)
        reader.start()
        deadline = time.time() + 120
        while time.time() < deadline and p.poll() is None and not re.search(r"tokenizing: [1-9]\d*doc", "".join(chunks)):
            time.sleep(0.05)
        assert p.poll() is None, "".join(chunks)
        os.killpg(p.pid, sig)  # as Ctrl-C / a job scheduler does: the whole process group
        p.wait(timeout=60)
        reader.join(timeout=10)
        err = "".join(chunks)
        assert p.returncode in (code, -sig), (sig, p.returncode, err)
        assert "Traceback" not in err and "BrokenPipe" not in err, err
        assert [q.name for q in tmp_path.iterdir() if q.name.startswith(".shards")] == [], sig
        assert not out.exists()


# --- 16: outputs get the umask's permissions, not mkstemp's 0600 / mkdtemp's 0700 ------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_follow_the_umask(capsys, model_dir, tmp_path, umask):
    old = os.umask(umask)
    try:
        code, err = herd_cli(capsys, "convert", model_dir, tmp_path / "out", "--to", "hf")
    finally:
        os.umask(old)
    assert code == 0, err
    out = tmp_path / "out"
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    files = list(out.iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.model"} <= {f.name for f in files}
    assert {f.name: oct(stat.S_IMODE(f.stat().st_mode)) for f in files} == {f.name: oct(0o666 & ~umask) for f in files}


def test_atomic_file_overwrite_keeps_the_files_mode(tmp_path):
    from herd.io import atomic_write_text

    f = tmp_path / "notes.txt"
    atomic_write_text(f, "one")
    f.chmod(0o640)  # the user chose who reads it
    atomic_write_text(f, "two")
    assert f.read_text() == "two" and stat.S_IMODE(f.stat().st_mode) == 0o640


def test_failed_atomic_directory_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), atomic_directory(tmp_path / "out") as tmp:
        (tmp / "half").write_text("x")
        raise RuntimeError("the writer failed")
    assert list(tmp_path.iterdir()) == []


# --- 17: the minor ones ---------------------------------------------------------------------------------------------
def test_tokenizer_train_into_non_empty_directory_fails_before_training(capsys, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    corpus = tmp_path / "c.txt"
    corpus.write_text("text " * 10)
    code, err = herd_cli(capsys, "tokenizer", "train", "--input", corpus, "--vocab-size", "300", "--out",
                         tmp_path / "out")
    assert code == 2 and "output exists" in one_line_error(err) and "reading corpus" not in err


def test_empty_corpus_error_names_the_input(capsys, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    code, err = herd_cli(capsys, "tokenizer", "train", "--input", tmp_path / "empty.txt", "--vocab-size", "300",
                         "--out", tmp_path / "tok", "--quiet")
    assert code == 2 and one_line_error(err).startswith(f"herd: error: {tmp_path / 'empty.txt'}: empty corpus")
    assert not (tmp_path / "tok").exists()


@pytest.mark.parametrize("device,message", [("tpu", "--device 'tpu': not a device"),
                                            ("cuda:7", "--device 'cuda:7': ")])
def test_bad_device_is_one_line(capsys, model_dir, device, message):
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    code, err = herd_cli(capsys, "generate", "--model", model_dir, "--prompt", "hi", "--device", device)
    assert code == 2 and message in one_line_error(err), err


@pytest.mark.parametrize("value", ["-5", "0", "abc"])
def test_info_seq_len_must_be_positive(capsys, value):
    code, err = herd_cli(capsys, "info", "tiny", "--seq-len", value)
    assert code == 2 and "argument --seq-len" in err and "-5.00" not in err


def test_failed_pretrain_leaves_no_empty_run_directory(capsys, small_tokenizer, tmp_path):
    from herd.data.shards import tokenize_to_shards

    _, tok_dir = small_tokenizer
    (tmp_path / "one.txt").write_text("a single short document")
    tokenize_to_shards([tmp_path / "one.txt"], tok_dir, tmp_path / "shards", workers=1, progress=False)
    run = tmp_path / "run"
    code, err = herd_cli(capsys, "pretrain", "--config", ROOT / "configs" / "tiny-cpu.toml", "--run-dir", run,
                         f"--data.path={tmp_path / 'shards'}", "--train.dtype=fp64")
    assert code == 2 and "train.dtype" in one_line_error(err)
    assert not run.exists()
