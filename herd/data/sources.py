"""Input records for ``herd data run``: every supported file becomes a stream of ``{"id", "text", ...}`` dicts.

Formats: JSONL (``text`` field; ``id``/``url``/``date`` kept when present; ``.jsonl.zst`` too), Parquet, HTML pages,
WARC files (``.warc``/``.warc.gz``: Common Crawl's format, read with warcio; HTML responses only) and any other text
file as one document. HTML stays raw here (``content_type`` says so); the ``extract`` stage turns it into text.

A big JSONL file (uncompressed) or Parquet file can be read in pieces, so that several workers share it and memory
stays bounded by a piece: ``pieces(path, split_bytes)`` cuts a JSONL file at line starts about every ``split_bytes``
bytes (and a Parquet file at row-group boundaries), each piece knowing the number of its first line (row), so
document ids are the same however the file is cut.

Bad input never stops the run: an unreadable file, a line that is not JSON or a broken WARC record becomes a record
``{"id", "error": reason}`` that the pipeline counts and logs in ``removed/`` (``strict = true`` raises instead).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

HTML_SUFFIXES = (".html", ".htm", ".xhtml")


def file_kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith((".warc", ".warc.gz")):
        return "warc"
    if name.endswith((".jsonl", ".json", ".jsonl.zst")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(HTML_SUFFIXES):
        return "html"
    return "text"


def is_single_document(path: Path) -> bool:
    return file_kind(path) in ("html", "text")


def is_splittable(path: Path) -> bool:
    return (file_kind(path) == "jsonl" and not path.name.lower().endswith(".zst")) or file_kind(path) == "parquet"


Piece = tuple[int, int, int]  # (start, end, number of the first line or row): bytes for JSONL, row groups for Parquet


def pieces(path: Path, split_bytes: int) -> list[Piece]:
    """The pieces of a splittable file: one per ~``split_bytes`` bytes, cut where a line (row group) starts. A file
    that cannot be read is one piece: its task then logs it in removed/ like any unreadable file."""
    try:
        size = path.stat().st_size
        if split_bytes <= 0 or size <= split_bytes or not is_splittable(path):
            return [(0, -1, 1)]  # the whole file
        if file_kind(path) == "parquet":
            return _parquet_pieces(path, split_bytes)
        return _jsonl_pieces(path, size, split_bytes)
    except (OSError, ValueError):  # unreadable, or not valid Parquet (ArrowInvalid): the task's reader reports it
        return [(0, -1, 1)]


def _jsonl_pieces(path: Path, size: int, split_bytes: int) -> list[Piece]:
    starts = [0]
    with open(path, "rb") as f:
        target = split_bytes
        while target < size:
            f.seek(target - 1)
            f.readline()  # the rest of the line holding byte target-1: the next line starts at or after target
            start = f.tell()
            if start >= size:
                break
            starts.append(start)
            target = start + split_bytes
        firsts, pos, newlines = [], 0, 0  # line numbers: count the newlines before each cut, in one sequential read
        f.seek(0)
        for start in starts:
            while pos < start:
                chunk = f.read(min(1 << 24, start - pos))
                newlines += chunk.count(b"\n")
                pos += len(chunk)
            firsts.append(newlines + 1)
    ends = starts[1:] + [size]
    return list(zip(starts, ends, firsts))


def _parquet_pieces(path: Path, split_bytes: int) -> list[Piece]:
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    out, start, row, first, size = [], 0, 0, 1, 0
    for g in range(meta.num_row_groups):
        size += meta.row_group(g).total_byte_size
        row += meta.row_group(g).num_rows
        if size >= split_bytes or g == meta.num_row_groups - 1:
            out.append((start, g + 1, first))
            start, first, size = g + 1, row + 1, 0
    return out


def iter_records(path: Path, doc_id: str, text_field: str = "text", piece: Piece = (0, -1, 1)) -> Iterator[dict]:
    """Records of one file (or of one piece of it); ``doc_id`` names the file (its path relative to the input
    root)."""
    kind = file_kind(path)
    try:
        if kind == "jsonl":
            yield from _jsonl(path, doc_id, text_field, piece)
        elif kind == "parquet":
            yield from _parquet(path, doc_id, text_field, piece)
        elif kind == "warc":
            yield from _warc(path, doc_id)
        else:
            data = path.read_bytes()
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as e:
                yield {"id": doc_id, "error": f"invalid UTF-8 at byte {e.start}", "bytes": len(data)}
                return
            record = {"id": doc_id, "text": text}
            if kind == "html":
                record["content_type"] = "text/html"
            yield record
    except OSError as e:
        yield {"id": doc_id, "error": f"unreadable file ({e.strerror or e})"}


def _line_range(path: Path, start: int, end: int) -> Iterator[bytes]:
    """The lines of ``path`` that start in [start, end) (end -1: to the end); ``start`` is a line start."""
    with open(path, "rb") as f:
        f.seek(start)
        pos = start
        for line in f:
            if 0 <= end <= pos:
                break
            yield line
            pos += len(line)


def _jsonl(path: Path, doc_id: str, text_field: str, piece: Piece) -> Iterator[dict]:
    start, end, first_line = piece
    if path.name.endswith(".zst"):
        import zstandard

        f = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"))
        lines = iter(f.read().splitlines(keepends=True))
        f.close()
    else:
        lines = _line_range(path, start, end)
    try:
        for lineno, raw in enumerate(lines, first_line):
            if not raw.strip():
                continue
            rid = f"{doc_id}:{lineno}"
            try:
                record = json.loads(raw)
            except UnicodeDecodeError:
                yield {"id": rid, "error": "invalid UTF-8", "bytes": len(raw)}
                continue
            except json.JSONDecodeError as e:
                yield {"id": rid, "error": f"invalid JSON ({e.msg})", "bytes": len(raw)}
                continue
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                yield {"id": rid, "error": f"no string field '{text_field}'", "bytes": len(raw)}
                continue
            out = {"id": str(record.get("id", rid)), "text": record[text_field]}
            for key, value in record.items():  # keep the metadata the source has (url, date, ...)
                if key not in ("id", text_field) and key not in out:
                    out[key] = value
            yield out
    finally:
        if hasattr(lines, "close"):
            lines.close()


def _parquet(path: Path, doc_id: str, text_field: str, piece: Piece) -> Iterator[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except pa.ArrowInvalid as e:
        yield {"id": doc_id, "error": f"not a Parquet file ({str(e)[:100]})", "bytes": path.stat().st_size}
        return
    if text_field not in pf.schema_arrow.names:
        if piece[0] == 0:  # reported once, by the first piece
            yield {"id": doc_id, "error": f"no column '{text_field}'"}
        return
    start, end, first_row = piece
    groups = list(range(start, pf.metadata.num_row_groups if end < 0 else end))
    row = first_row - 1
    for batch in pf.iter_batches(batch_size=1024, row_groups=groups):
        for record in batch.to_pylist():
            row += 1
            text = record.pop(text_field)
            if not isinstance(text, str):
                yield {"id": f"{doc_id}:{row}", "error": f"no string field '{text_field}'"}
                continue
            out = {"id": str(record.pop("id", f"{doc_id}:{row}")), "text": text}
            out.update({k: v for k, v in record.items() if isinstance(v, (str, int, float, bool))})
            yield out


def _warc(path: Path, doc_id: str) -> Iterator[dict]:
    from warcio.archiveiterator import ArchiveIterator

    n = 0
    with open(path, "rb") as f:
        try:
            for record in ArchiveIterator(f):
                if record.rec_type != "response":
                    continue
                n += 1
                rid = record.rec_headers.get_header("WARC-Record-ID") or f"{doc_id}:{n}"
                url = record.rec_headers.get_header("WARC-Target-URI") or ""
                date = record.rec_headers.get_header("WARC-Date") or ""
                ctype = (record.http_headers.get_header("Content-Type") or "") if record.http_headers else ""
                if "html" not in ctype.lower():
                    continue
                try:
                    payload = record.content_stream().read()
                except Exception as e:  # a truncated or corrupt record: keep going with the next one
                    yield {"id": rid, "error": f"broken WARC record ({type(e).__name__})", "url": url}
                    continue
                try:
                    html = payload.decode("utf-8")
                except UnicodeDecodeError:
                    from resiliparse.parse.encoding import bytes_to_str, detect_encoding

                    html = bytes_to_str(payload, detect_encoding(payload))
                yield {"id": rid, "text": html, "url": url, "date": date, "content_type": "text/html"}
        except Exception as e:  # warcio raises many types on a corrupt file; it is bad input, not a bug here
            yield {"id": f"{doc_id}:{n + 1}", "error": f"broken WARC file after record {n} ({type(e).__name__}: {e})"}
