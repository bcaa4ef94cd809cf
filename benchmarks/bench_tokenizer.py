"""Encode throughput of herd.Tokenizer vs raw tiktoken (same ranks) vs the transformers fast tokenizer.

    python benchmarks/bench_tokenizer.py [--tokenizer ../shared/llama3/tokenizer.model --mb 8 --repeats 5]

The corpus is the Python standard library's own sources (available on every machine), cut into documents of one
file each. Single-threaded: one call per document. Batched: herd.encode_batch vs tiktoken's
encode_ordinary_batch vs transformers' batch call, all on the machine's threads. The tiktoken reference is built
from the same ranks and pattern, so the ids must agree (checked).
"""

from __future__ import annotations

import argparse
import sys
import sysconfig
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import alternate, hardware, median  # noqa: E402

DEFAULT_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "llama3" / "tokenizer.model"


def corpus(max_mb: float) -> list[str]:
    docs, size = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        docs.append(text)
        size += len(text.encode())
        if size > max_mb * 2**20:
            break
    return docs


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER))
    p.add_argument("--mb", type=float, default=8.0)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()

    import tiktoken
    from transformers import AutoTokenizer

    import herd
    from herd.tokenizer.tokenizer import PATTERN

    tok = herd.Tokenizer(a.tokenizer)
    ref = tiktoken.Encoding("ref", pat_str=PATTERN, mergeable_ranks=tok.ranks, special_tokens={})
    with tempfile.TemporaryDirectory() as tmp:
        tok.save(tmp)
        hf = AutoTokenizer.from_pretrained(tmp)
    docs = corpus(a.mb)
    mb = sum(len(d.encode()) for d in docs) / 2**20
    assert [tok.encode(d) for d in docs[:50]] == [ref.encode_ordinary(d) for d in docs[:50]]

    single = {
        "herd": lambda: [tok.encode(d) for d in docs],
        "tiktoken": lambda: [ref.encode_ordinary(d) for d in docs],
        "transformers": lambda: [hf.encode(d, add_special_tokens=False) for d in docs],
    }
    batched = {
        "herd": lambda: tok.encode_batch(docs),
        "tiktoken": lambda: ref.encode_ordinary_batch(docs),
        "transformers": lambda: hf(docs, add_special_tokens=False)["input_ids"],
    }
    print(f"hardware: {hardware()}")
    print(f"corpus: {len(docs)} stdlib files, {mb:.1f} MB; tokenizer {a.tokenizer} ({tok.n_words} ids); "
          f"median of {a.repeats} alternating repeats")
    for label, fns in (("one call per document", single), ("batched", batched)):
        times = alternate(fns, a.repeats)
        print(f"  {label}:")
        for name, ts in times.items():
            print(f"    {name:<13} {mb / median(ts):7.2f} MB/s")
        vs_tiktoken = median(times["tiktoken"]) / median(times["herd"])
        vs_hf = median(times["transformers"]) / median(times["herd"])
        print(f"    herd / tiktoken throughput: {vs_tiktoken:.3f}x (goal >= 0.95x); herd / transformers: {vs_hf:.2f}x")


if __name__ == "__main__":
    main()
