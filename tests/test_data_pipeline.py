"""`herd data run` end to end: outputs, determinism across worker counts, resume after SIGKILL, bad input."""

import gzip
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("spacy")
pytest.importorskip("resiliparse")

from herd.data.demo import write_demo_corpus  # noqa: E402
from herd.data.executors import LocalExecutor  # noqa: E402
from herd.data.pipeline import DataRunConfig, input_files, input_shards, run_pipeline  # noqa: E402
from herd.data.shardio import read_jsonl_zst  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_demo_corpus(tmp_path_factory.mktemp("corpus"), n_web=160, n_html=8, n_python=4, seed=0)


def tree_bytes(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != "funnel.png"}


def run(inputs, out, workers=1, **overrides):
    cfg = DataRunConfig()
    for dotted, value in overrides.items():
        section, key = dotted.split("__")
        setattr(getattr(cfg, section), key, value)
    ex = LocalExecutor(workers)
    try:
        return run_pipeline([str(i) for i in inputs], out, cfg, ex, progress=False)
    finally:
        ex.close()


def test_run_writes_shards_removed_stats_and_funnel(corpus, tmp_path):
    stats = run([corpus], tmp_path / "out", run__shard_files=4)
    out = tmp_path / "out"
    kept = [r for f in sorted((out / "data").glob("*.jsonl.zst")) for r in read_jsonl_zst(f)]
    removed = [r for f in sorted((out / "removed").glob("*.jsonl.zst")) for r in read_jsonl_zst(f)]
    assert kept and removed and (out / "funnel.png").stat().st_size > 1000
    assert not (out / "work").exists()
    assert stats == json.loads((out / "stats.json").read_text())
    # every input document is either kept or removed exactly once, and the counts agree with stats.json
    assert len(kept) + len(removed) == stats["input"]["docs"] == len({r["id"] for r in kept + removed})
    assert stats["output"]["docs"] == len(kept)
    for name, s in stats["stages"].items():
        assert s["docs_removed"] == sum(r["stage"] == name for r in removed), name
        assert s["docs_removed"] == sum(s["reasons"].values())
    assert all({"id", "stage", "reason"} <= set(r) for r in removed)
    assert all({"id", "text", "language", "language_score"} <= set(r) or r.get("language") == "code" for r in kept)
    # HTML and WARC were extracted: no markup left, the code block kept its indentation
    html_docs = [r for r in kept if r["id"].startswith(("pages/", "<urn:"))]
    assert html_docs and not any("<p>" in r["text"] or "<nav" in r["text"] for r in html_docs)
    assert any(r.get("url", "").startswith("https://news.example/") for r in kept)
    # duplicates of the same text never both survive
    texts = [" ".join(r["text"].lower().split()) for r in kept]
    assert len(texts) == len(set(texts))


def kept_records(out: Path) -> list[dict]:
    return [r for f in sorted((out / "data").rglob("*.jsonl.zst")) for r in read_jsonl_zst(f)]


def test_output_identical_for_any_worker_count_with_language_routing(corpus, tmp_path):
    run([corpus], tmp_path / "plain", workers=1, run__shard_files=3)
    run([corpus], tmp_path / "w1", workers=1, run__shard_files=3, run__route_by="language")
    stats = run([corpus], tmp_path / "w2", workers=2, run__shard_files=3, run__route_by="language")
    a, b = tree_bytes(tmp_path / "w1"), tree_bytes(tmp_path / "w2")
    assert a.keys() == b.keys() and a == b
    assert len([k for k in a if k.startswith("data/")]) > 2
    # routing only regroups: each folder holds exactly the kept documents of its language, in corpus order
    plain = kept_records(tmp_path / "plain")
    folders = sorted(p.name for p in (tmp_path / "w1" / "data").iterdir())
    assert {"en", "code"} <= set(folders) and not list((tmp_path / "w1" / "data").glob("*.jsonl.zst"))
    for lang in folders:
        routed = [r for f in sorted((tmp_path / "w1" / "data" / lang).glob("*.jsonl.zst")) for r in read_jsonl_zst(f)]
        assert routed == [r for r in plain if r["language"] == lang], lang
        assert stats["output"]["routes"][lang]["docs"] == len(routed)
    assert sum(v["docs"] for v in stats["output"]["routes"].values()) == stats["output"]["docs"] == len(plain)
    # `herd data tokenize DIR` (expand_inputs) finds the routed shards
    from herd.data.readers import expand_inputs

    assert len(expand_inputs([tmp_path / "w1"])) == len([k for k in a if k.startswith("data/")])


def test_route_names_are_safe_folder_names():
    from herd.data.pipeline import route_name

    assert [route_name(v) for v in ("en", "zh-Hant", None, "", "../etc", "a b/c", 3)] == [
        "en", "zh-Hant", "unknown", "unknown", "_etc", "a_b_c", "3"]


class CrashingExecutor(LocalExecutor):
    """Runs the first ``budget`` tasks, then dies as a kill would (nothing after that point is written)."""

    def __init__(self, budget):
        super().__init__(1)
        self.budget = budget

    def map(self, fn, tasks, **kw):
        out = []
        for t in tasks:
            if self.budget == 0:
                raise KeyboardInterrupt
            self.budget -= 1
            out.append(fn(t))
        return out


@pytest.mark.parametrize("budget", [11])
def test_interrupted_run_resumes_to_identical_output(corpus, tmp_path, budget):
    run([corpus / "pages", corpus / "src"], tmp_path / "ref", run__shard_files=2)
    cfg = DataRunConfig()
    cfg.run.shard_files = 2
    with pytest.raises(KeyboardInterrupt):
        run_pipeline([str(corpus / "pages"), str(corpus / "src")], tmp_path / "o", cfg, CrashingExecutor(budget),
                     progress=False)
    assert not (tmp_path / "o" / "stats.json").exists()
    run([corpus / "pages", corpus / "src"], tmp_path / "o", run__shard_files=2)
    assert tree_bytes(tmp_path / "o") == tree_bytes(tmp_path / "ref")


@pytest.mark.slow
def test_sigkill_then_rerun_gives_identical_output(corpus, tmp_path):
    run([corpus], tmp_path / "ref", run__shard_files=1)
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "herd", "data", "run", "--input", str(corpus), "--out", str(out), "--quiet",
           "--run.shard_files=1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "work").glob("pass-*/*.done"))) < 8:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "stats.json").exists(), "the run finished before it could be killed"
    done_before = len(list((out / "work").glob("pass-*/*.done")))
    assert done_before >= 8
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert tree_bytes(out) == tree_bytes(tmp_path / "ref")
    # rerunning a finished run is a no-op that reports the same stats
    r2 = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert r2.returncode == 0 and r2.stdout == r.stdout


def test_bad_input_is_counted_and_logged_not_fatal(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    good = "The quality of this paragraph is fine and it has enough words to be a document. " * 12
    (src / "a.jsonl").write_bytes(json.dumps({"text": good}).encode() + b"\n{broken json\n"
                                  + b'{"text": "caf\xff"}\n' + json.dumps({"txt": "no text field"}).encode() + b"\n"
                                  + json.dumps({"text": ""}).encode() + b"\n")
    (src / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 50)
    (src / "huge.txt").write_text("word " * 300_000)
    with gzip.open(src / "bad.warc.gz", "wb") as f:
        f.write(b"WARC/1.0\r\nWARC-Type: response\r\nContent-Length: 99999\r\n\r\ntruncated")
    stats = run([src], tmp_path / "out", extract__max_bytes=1_000_000)
    removed = {r["id"]: r for f in (tmp_path / "out" / "removed").glob("*.jsonl.zst") for r in read_jsonl_zst(f)}
    assert removed["a.jsonl:2"]["reason"].startswith("invalid JSON")
    assert removed["a.jsonl:3"]["reason"] == "invalid UTF-8"
    assert removed["a.jsonl:4"]["reason"] == "no string field 'text'"
    assert removed["a.jsonl:5"] == {"id": "a.jsonl:5", "stage": "extract", "reason": "empty", "bytes": 0}
    assert removed["latin1.txt"]["reason"].startswith("invalid UTF-8")
    assert removed["huge.txt"]["reason"] == "too_large"
    assert any(r["stage"] == "read" and "WARC" in r["reason"] for r in removed.values())
    assert stats["stages"]["read"]["docs_removed"] >= 5


def test_strict_mode_and_bad_config_are_one_line_errors(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("{oops\n")
    r = subprocess.run([sys.executable, "-m", "herd", "data", "run", "--input", str(src), "--out",
                        str(tmp_path / "o"), "--run.strict=true", "--quiet"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "in.jsonl" in r.stderr and "invalid JSON" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "herd", "data", "run", "--input", str(src), "--out",
                        str(tmp_path / "o2"), "--run.stages=extract,nope"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "unknown stage 'nope'" in r.stderr


def test_rerun_with_other_settings_is_refused(corpus, tmp_path):
    run([corpus / "pages"], tmp_path / "o")
    with pytest.raises(Exception, match="other inputs or settings"):
        run([corpus / "pages"], tmp_path / "o", minhash_dedup__num_buckets=7)


def test_shards_depend_on_inputs_only(corpus):
    files = input_files([str(corpus)])
    shards = input_shards(files, 5)
    assert [f for s in shards for f in s] == files
    assert all(len(s) == 1 for s in shards if not s[0][0].endswith((".py", ".html")))


def test_tokenize_accepts_a_run_directory(corpus, tmp_path, small_tokenizer):
    from herd.data.shards import TokenShards

    run([corpus], tmp_path / "run", run__stages="extract,language,exact_dedup")
    n_kept = json.loads((tmp_path / "run" / "stats.json").read_text())["output"]["docs"]
    r = subprocess.run([sys.executable, "-m", "herd", "data", "tokenize", "--input", str(tmp_path / "run"),
                        "--tokenizer", str(small_tokenizer[1]), "--out", str(tmp_path / "tok"), "--quiet",
                        "--workers", "1"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert TokenShards.open(tmp_path / "tok").n_docs == n_kept > 0


@pytest.mark.parametrize("name", ["llama3.toml", "small.toml"])
def test_shipped_configs_load(name):
    from herd.config import load_config
    from herd.data.pipeline import enabled_stages

    cfg = load_config(ROOT / "configs" / "data" / name, [], cls=DataRunConfig)
    assert {"extract", "gopher_quality", "minhash_dedup", "line_dedup"} <= set(enabled_stages(cfg))
    assert cfg.line_dedup.max_occurrences == 6


@pytest.mark.slow  # starting a local Ray instance takes ~30 s on 2 cores
def test_ray_executor_output_identical_to_local(corpus, tmp_path):
    pytest.importorskip("ray")
    from herd.data.executors import RayExecutor

    run([corpus / "pages", corpus / "src", corpus / "crawl.warc.gz"], tmp_path / "local", run__shard_files=3,
        run__route_by="language")
    ex = RayExecutor(workers=2)
    try:
        cfg = DataRunConfig()
        cfg.run.shard_files, cfg.run.route_by = 3, "language"
        run_pipeline([str(corpus / "pages"), str(corpus / "src"), str(corpus / "crawl.warc.gz")], tmp_path / "ray",
                     cfg, ex, progress=False)
    finally:
        ex.close()
    assert tree_bytes(tmp_path / "ray") == tree_bytes(tmp_path / "local")
    assert (tmp_path / "ray" / "data" / "en").is_dir() and (tmp_path / "ray" / "data" / "code").is_dir()
