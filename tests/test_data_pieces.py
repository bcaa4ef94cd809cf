"""Big input files read in pieces (``[run] split_bytes``): the pieces hold exactly the file's records, with the same
ids, however the file is cut; a run over a split file keeps and removes exactly what the unsplit run does, and writes
the same bytes for any worker count."""

import json
import os
import random
from pathlib import Path

import pytest

pytest.importorskip("resiliparse")

from herd.data.demo import write_demo_corpus  # noqa: E402
from herd.data.executors import LocalExecutor  # noqa: E402
from herd.data.pipeline import DataRunConfig, input_files, input_shards, run_pipeline  # noqa: E402
from herd.data.shardio import read_jsonl_zst  # noqa: E402
from herd.data.sources import iter_records, pieces  # noqa: E402


@pytest.fixture(scope="module")
def messy_jsonl(tmp_path_factory) -> Path:
    """Records of very different lengths, blank lines, broken JSON, invalid UTF-8 and a line with no newline at the
    end: every kind of line a cut could land in."""
    rng = random.Random(0)
    lines = []
    for i in range(300):
        kind = rng.random()
        if kind < 0.05:
            lines.append(b"")
        elif kind < 0.08:
            lines.append(b"{broken")
        elif kind < 0.1:
            lines.append(b'{"text": "caf\xff"}')
        else:
            lines.append(json.dumps({"text": "w" * rng.choice([1, 10, 100, 3000]) + f" {i}"}).encode())
    path = tmp_path_factory.mktemp("pieces") / "messy.jsonl"
    path.write_bytes(b"\n".join(lines))  # the last line has no trailing newline
    return path


@pytest.mark.parametrize("split_bytes", [1, 7, 100, 999, 4096, 50_000, None])
def test_pieces_hold_exactly_the_files_records(messy_jsonl, split_bytes):
    size = messy_jsonl.stat().st_size
    split_bytes = split_bytes or size // 2
    whole = list(iter_records(messy_jsonl, "m.jsonl"))
    cuts = pieces(messy_jsonl, split_bytes)
    assert len(cuts) > 1
    assert cuts[0][0] == 0 and cuts[-1][1] == size
    assert all(a[1] == b[0] for a, b in zip(cuts, cuts[1:]))  # contiguous, no byte read twice
    data = messy_jsonl.read_bytes()
    assert all(data[start - 1:start] == b"\n" for start, _, _ in cuts[1:])  # every cut is at a line start
    parts = [r for piece in cuts for r in iter_records(messy_jsonl, "m.jsonl", "text", piece)]
    assert parts == whole  # same records, same ids (line numbers), same errors
    assert {r["error"] for r in whole if "error" in r} == {"invalid UTF-8", "invalid JSON (Expecting property name "
                                                           "enclosed in double quotes)"}


def test_small_and_compressed_files_are_not_split(messy_jsonl, tmp_path):
    assert pieces(messy_jsonl, 0) == [(0, -1, 1)]
    assert pieces(messy_jsonl, messy_jsonl.stat().st_size) == [(0, -1, 1)]
    txt = tmp_path / "big.txt"  # a text file is one document: never cut
    txt.write_text("word " * 10_000)
    assert pieces(txt, 100) == [(0, -1, 1)]
    bad = tmp_path / "bad.parquet"  # not Parquet: one piece, and the task logs it as unreadable input
    bad.write_bytes(b"not parquet" * 100)
    assert pieces(bad, 10) == [(0, -1, 1)]
    (error,) = iter_records(bad, "bad.parquet")
    assert error["id"] == "bad.parquet" and error["error"].startswith("not a Parquet file")
    assert pieces(tmp_path / "gone.jsonl", 10) == [(0, -1, 1)]


def test_parquet_is_split_by_row_group(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    texts = [f"document {i} " + "x" * (i % 50) for i in range(1000)]
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": texts}), path, row_group_size=100)
    cuts = pieces(path, 2000)
    assert len(cuts) > 2 and cuts[-1][1] == 10
    parts = [r for piece in cuts for r in iter_records(path, "t.parquet", "text", piece)]
    assert parts == list(iter_records(path, "t.parquet")) and [r["text"] for r in parts] == texts
    assert parts[250]["id"] == "t.parquet:251"


def _run(inputs, out, workers, **run_kw):
    cfg = DataRunConfig()
    for key, value in run_kw.items():
        setattr(cfg.run, key, value)
    ex = LocalExecutor(workers)
    try:
        return run_pipeline([str(i) for i in inputs], out, cfg, ex, progress=False)
    finally:
        ex.close()


def test_split_file_runs_like_the_whole_file_for_any_worker_count(tmp_path):
    corpus = write_demo_corpus(tmp_path / "corpus", n_web=150, n_html=0, n_python=0, seed=3)
    web = corpus / "web.jsonl"  # near-duplicates of the first documents sit at the end: dedup must cross pieces
    split = web.stat().st_size // 5
    assert len(input_shards(input_files([str(web)]), 1000, split)) >= 5
    stages = "exact_dedup,minhash_dedup,line_dedup,domain"  # the global stages (the filters are per document)
    whole = _run([web], tmp_path / "whole", 1, stages=stages)
    _run([web], tmp_path / "w1", 1, stages=stages, split_bytes=split)
    split_stats = _run([web], tmp_path / "w2", 2, stages=stages, split_bytes=split)

    def tree(out):
        return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
                if p.is_file() and p.name != "funnel.png"}

    assert tree(tmp_path / "w1") == tree(tmp_path / "w2")

    def records(out, folder):
        return [r for f in sorted((out / folder).glob("*.jsonl.zst")) for r in read_jsonl_zst(f)]

    assert records(tmp_path / "w1", "data") == records(tmp_path / "whole", "data")  # same documents, same order
    key = lambda r: r["id"]  # noqa: E731
    assert sorted(records(tmp_path / "w1", "removed"), key=key) == sorted(records(tmp_path / "whole", "removed"),
                                                                         key=key)
    assert split_stats["stages"] == whole["stages"]
    assert whole["stages"]["minhash_dedup"]["docs_removed"] + whole["stages"]["exact_dedup"]["docs_removed"] > 0


# --- worker processes -------------------------------------------------------------------------------------------
def _square_or_fail(x: int) -> int:
    if x == 13:
        raise ValueError("thirteen")
    if x == -1:
        os._exit(3)  # a worker that dies without answering (as under the OOM killer)
    return x * x


def test_worker_processes_keep_order_raise_worker_errors_and_survive_dead_workers():
    from herd.data.executors import RemoteTraceback, WorkerDiedError, WorkerProcesses

    with WorkerProcesses(2, "fork") as pool:
        assert list(pool.imap(_square_or_fail, range(40, 14, -3))) == [x * x for x in range(40, 14, -3)]
    pool = WorkerProcesses(2, "fork")
    with pytest.raises(ValueError, match="thirteen") as e:
        list(pool.imap(_square_or_fail, [1, 2, 13, 4]))
    assert isinstance(e.value.__cause__, RemoteTraceback) and "_square_or_fail" in str(e.value.__cause__)
    assert pool._procs == []  # an error stops and joins the workers
    pool = WorkerProcesses(2, "fork")
    with pytest.raises(WorkerDiedError, match=r"worker process \d \(pid \d+\) exited \(3\)"):
        list(pool.imap(_square_or_fail, [1, -1, 2, 3]))
