"""Token shards: documents tokenized once, stored as memory-mapped uint32 arrays with their boundaries.

Layout of a shard directory (plain ``.npy`` files, so numpy, torch and any other tool can read them):

    manifest.json          format, tokenizer fingerprint, vocabulary size, counts, and the list of shards
    tokens-00000.npy       uint32 token ids of many documents, back to back (BOS ... EOS per document)
    docs-00000.npy         int64 start offset of each document in tokens-00000.npy, plus the end offset
    tokenizer.model/.json  the tokenizer that made them, so the shards are self-contained

uint32 because Llama 3's vocabulary (128,256) does not fit in uint16.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import signal
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from herd.data.executors import WorkerProcesses
from herd.data.readers import DataError, expand_inputs, iter_documents
from herd.io import atomic_directory, atomic_write_json, read_json
from herd.tokenizer import Tokenizer

FORMAT = "herd-token-shards-v1"
MANIFEST = "manifest.json"
DOCS_PER_BATCH = 32  # documents a worker encodes per message: amortises the pipe round trip

_worker_tok: Tokenizer | None = None


def _init_worker(tokenizer_path: str) -> None:
    global _worker_tok
    _worker_tok = Tokenizer(tokenizer_path)


def documents(inputs: Iterable[str | Path], files: list[Path]) -> Iterator[str]:
    """``iter_documents(files)``, with the empty-corpus error naming the inputs it was given."""
    try:
        yield from iter_documents(files)
    except DataError as e:
        if not str(e).startswith("empty corpus"):
            raise
        raise DataError(f"{', '.join(str(i) for i in inputs)}: {e}") from None


@contextlib.contextmanager
def terminate_as_exit() -> Iterator[None]:
    """Turn SIGTERM into ``SystemExit(143)`` while workers run, so that they are stopped and the temporary output
    removed on the way out, instead of the parent vanishing under workers that then fail writing to it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _encode_batch(docs: list[str]) -> list[np.ndarray]:
    return [np.asarray(_worker_tok.encode(doc, bos=True, eos=True), dtype=np.uint32) for doc in docs]


def _batches(docs: Iterable[str], size: int) -> Iterator[list[str]]:
    batch = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def tokenize_to_shards(inputs: Iterable[str | Path], tokenizer_path: str | Path, out: str | Path,
                       workers: int | None = None, shard_tokens: int = 1 << 28, progress: bool = True) -> dict:
    """Tokenize every document (BOS + text + EOS) on ``workers`` processes, in input order, into shards."""
    tok = Tokenizer(tokenizer_path)
    tok_file = _tokenizer_file(Path(tokenizer_path))
    inputs = list(inputs)
    files = expand_inputs(inputs)
    workers = workers or max(1, min(mp.cpu_count(), 8))
    with terminate_as_exit(), atomic_directory(out) as tmp:
        shards, buf, offsets, n_tokens, n_docs = [], [], [0], 0, 0

        def flush() -> None:
            nonlocal buf, offsets
            if len(offsets) == 1:
                return
            i = len(shards)
            np.save(tmp / f"tokens-{i:05d}.npy", np.concatenate(buf))
            np.save(tmp / f"docs-{i:05d}.npy", np.asarray(offsets, dtype=np.int64))
            shards.append({"tokens": f"tokens-{i:05d}.npy", "docs": f"docs-{i:05d}.npy",
                           "n_tokens": int(offsets[-1]), "n_docs": len(offsets) - 1})
            buf, offsets = [], [0]

        bar = tqdm(desc="tokenizing", unit="doc", disable=not progress)
        # spawn: fork is unsafe with threads (tiktoken, torch) already running
        with WorkerProcesses(workers, "spawn", _init_worker, (str(tok_file),)) as pool:
            for batch in pool.imap(_encode_batch, _batches(documents(inputs, files), DOCS_PER_BATCH)):
                for ids in batch:
                    buf.append(ids)
                    offsets.append(offsets[-1] + len(ids))
                    n_tokens += len(ids)
                    n_docs += 1
                    if offsets[-1] >= shard_tokens:
                        flush()
                bar.update(len(batch))
                bar.set_postfix(tokens=f"{n_tokens:,}", refresh=False)
        flush()
        bar.close()
        tok.save(tmp)
        manifest = {"format": FORMAT, "tokenizer": tok.fingerprint(), "vocab_size": tok.n_words,
                    "bos_id": tok.bos_id, "eos_id": tok.eos_id, "n_tokens": n_tokens, "n_docs": n_docs,
                    "dtype": "uint32", "shards": shards}
        atomic_write_json(tmp / MANIFEST, manifest)
    return manifest


def _tokenizer_file(path: Path) -> Path:
    if path.is_dir():
        for name in ("tokenizer.model", "tokenizer.json"):
            if (path / name).exists():
                return path / name
    return path


@dataclass
class TokenShards:
    """All documents of a shard directory, memory-mapped: ``doc(i)`` is a uint32 array."""

    path: Path
    manifest: dict
    tokens: list[np.ndarray]
    doc_shard: np.ndarray  # [n_docs] shard index of each document
    doc_start: np.ndarray  # [n_docs] offset in its shard
    doc_len: np.ndarray  # [n_docs] length in tokens

    @classmethod
    def open(cls, path: str | Path) -> TokenShards:
        path = Path(path)
        mpath = path / MANIFEST
        if not mpath.exists():
            raise DataError(f"{mpath}: not found (is {path} a directory written by `herd data tokenize`?)")
        manifest = read_json(mpath, DataError)
        if manifest.get("format") != FORMAT:
            raise DataError(f"{mpath}: unknown format {manifest.get('format')!r} (expected {FORMAT})")
        tokens, shard_ids, starts, lens = [], [], [], []
        for i, shard in enumerate(manifest["shards"]):
            try:
                t = np.load(path / shard["tokens"], mmap_mode="r")
                d = np.load(path / shard["docs"])
            except (OSError, ValueError) as e:
                raise DataError(f"{path / shard['tokens']}: cannot read shard ({e})") from None
            if t.dtype != np.uint32 or len(t) != shard["n_tokens"] or d[-1] != len(t):
                raise DataError(f"{path / shard['tokens']}: size or dtype disagrees with {MANIFEST}")
            tokens.append(t)
            shard_ids.append(np.full(len(d) - 1, i, dtype=np.int64))
            starts.append(d[:-1])
            lens.append(np.diff(d))
        if not tokens or manifest.get("n_tokens", 0) == 0:
            raise DataError(f"{path}: the shards hold no tokens (empty corpus)")
        return cls(path, manifest, tokens, np.concatenate(shard_ids), np.concatenate(starts), np.concatenate(lens))

    @property
    def n_docs(self) -> int:
        return len(self.doc_len)

    def doc(self, i: int) -> np.ndarray:
        s = self.doc_start[i]
        return self.tokens[self.doc_shard[i]][s:s + self.doc_len[i]]
