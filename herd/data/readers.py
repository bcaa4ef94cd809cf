"""Streaming document readers: plain text, JSONL (a ``text`` field per line) and Parquet (a ``text`` column).

A ``.jsonl``/``.json``/``.jsonl.zst`` line or a Parquet row is one document (a directory written by
``herd data run`` stands for its kept shards, ``DIR/data/**/*.jsonl.zst``); any other file (``.txt``, ``.py``, ``.md``
...) is one document. Documents are yielded one at a time, so corpora larger than memory stream through. Bad input
raises ``DataError`` naming the file and line.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from herd.errors import UserError


class DataError(UserError):
    """Unreadable input; the message names the file (and line)."""


# Skipped when a directory is expanded (a file named directly is always read).
BINARY_SUFFIXES = {".pyc", ".pyo", ".so", ".o", ".a", ".dll", ".exe", ".png", ".jpg", ".jpeg", ".gif", ".ico", ".gz",
                   ".zip", ".xz", ".bz2", ".tar", ".bin", ".npy", ".pt", ".pth", ".safetensors", ".wav", ".pdf"}


def expand_inputs(inputs: Iterable[str | Path], suffixes: tuple[str, ...] | None = None) -> list[Path]:
    """Files named directly, plus the files under named directories (recursively, sorted), skipping hidden files,
    ``__pycache__`` and binary suffixes."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir() and (path / "stats.json").is_file() and (path / "data").is_dir():
            files += sorted((path / "data").rglob("*.jsonl.zst"))  # a `herd data run` output: its kept shards
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*")
                           if p.is_file() and p.suffix.lower() not in BINARY_SUFFIXES
                           and not any(part.startswith(".") or part == "__pycache__"
                                       for part in p.relative_to(path).parts))
            files += [p for p in found if suffixes is None or p.suffix in suffixes]
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"{path}: no such file or directory")
    return files


def _utf8(data: bytes, path: Path) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte offset {e.start})") from None


def _open_jsonl(path: Path):
    if path.suffix == ".zst":  # what `herd data run` writes
        import io

        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def read_documents(path: str | Path, text_field: str = "text") -> Iterator[str]:
    path = Path(path)
    if path.suffix in (".jsonl", ".json") or path.name.endswith(".jsonl.zst"):
        with _open_jsonl(path) as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw)
                except UnicodeDecodeError:
                    raise DataError(f"{path}:{lineno}: not valid UTF-8") from None
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                    raise DataError(f"{path}:{lineno}: expected an object with a string field '{text_field}'")
                yield record[text_field]
    elif path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{path}: reading Parquet needs pyarrow (pip install 'herd[parquet]')") from None
        pf = pq.ParquetFile(path)
        if text_field not in pf.schema_arrow.names:
            raise DataError(f"{path}: no column '{text_field}' (columns: {pf.schema_arrow.names})")
        for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
            for text in batch.column(0).to_pylist():
                if text is not None:
                    yield text
    else:
        yield _utf8(path.read_bytes(), path)


def iter_documents(files: Iterable[str | Path], text_field: str = "text") -> Iterator[str]:
    """All documents of all files, in order. Raises ``DataError`` if there are none."""
    count = 0
    for path in files:
        for doc in read_documents(path, text_field):
            if doc:
                count += 1
                yield doc
    if count == 0:
        raise DataError("empty corpus: the input files hold no non-empty document")
