"""Compression figures: bytes per token and tokens per word, per file and overall, for several tokenizers.

With ``spm_vocab`` a Llama-2-style SentencePiece BPE (byte fallback, digits split, no normalisation) is trained on the
same input and measured alongside, to check the claim that Llama 3's 128K vocabulary needs up to 15% fewer tokens than
Llama 2's 32K one.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from herd.data.readers import expand_inputs, read_documents
from herd.tokenizer.tokenizer import Tokenizer


def _train_sentencepiece(files: list[Path], vocab_size: int, workdir: Path) -> Callable[[str], int]:
    import sentencepiece as spm

    corpus = workdir / "corpus.txt"
    with open(corpus, "w", encoding="utf-8") as f:
        for path in files:
            for doc in read_documents(path):
                f.write(doc.replace("\r", "") + "\n")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(workdir / "spm"), model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, split_digits=True, normalization_rule_name="identity", allow_whitespace_only_pieces=True,
        character_coverage=0.99995, hard_vocab_limit=False, max_sentence_length=1 << 16, minloglevel=2,
        train_extremely_large_corpus=False,
    )
    sp = spm.SentencePieceProcessor(model_file=str(workdir / "spm.model"))
    return lambda text: len(sp.encode(text))


def run_stats(tokenizers: Sequence[str], inputs: Sequence[str], spm_vocab: int | None = None,
              out_json: str | None = None, spm_train: Sequence[str] | None = None) -> dict:
    """Figures per file of ``inputs``. The SentencePiece baseline is trained on ``spm_train`` (default: the inputs
    themselves, which flatters it: it then compresses text it has memorised)."""
    files = expand_inputs(inputs)
    counters: dict[str, Callable[[str], int]] = {}
    for path in tokenizers:
        tok = Tokenizer(path)
        counters[f"{Path(path).name} ({tok.n_words})"] = lambda text, tok=tok: len(tok.encode(text))
    with tempfile.TemporaryDirectory() as tmp:
        if spm_vocab:
            train_files = expand_inputs(spm_train) if spm_train else files
            counters[f"sentencepiece-bpe ({spm_vocab})"] = _train_sentencepiece(train_files, spm_vocab, Path(tmp))
        rows = []
        totals = {name: 0 for name in counters}
        total_bytes = total_words = 0
        for path in files:
            text_bytes = words = 0
            counts = {name: 0 for name in counters}
            for doc in read_documents(path):
                text_bytes += len(doc.encode("utf-8"))
                words += len(doc.split())
                for name, count in counters.items():
                    counts[name] += count(doc)
            rows.append({"file": str(path), "bytes": text_bytes, "words": words, "tokens": counts})
            total_bytes += text_bytes
            total_words += words
            for name in counters:
                totals[name] += counts[name]
    report = {"files": rows, "total": {"bytes": total_bytes, "words": total_words, "tokens": totals}}
    _print(report, list(counters))
    if out_json:
        Path(out_json).write_text(json.dumps(report, indent=2))
    return report


def _print(report: dict, names: list[str]) -> None:
    header = f"{'file':<40} {'tokenizer':<36} {'tokens':>10} {'bytes/tok':>9} {'tok/word':>8}"
    print(header)
    print("-" * len(header))
    for row in report["files"] + [{"file": "TOTAL", **report["total"]}]:
        for name in names:
            n = row["tokens"][name]
            bpt = row["bytes"] / n if n else float("nan")
            tpw = n / row["words"] if row["words"] else float("nan")
            print(f"{Path(row['file']).name[:40]:<40} {name[:36]:<36} {n:>10,} {bpt:>9.3f} {tpw:>8.3f}")
    if len(names) > 1:
        base = names[-1]
        for name in names[:-1]:
            a, b = report["total"]["tokens"][name], report["total"]["tokens"][base]
            if b:
                print(f"{name} uses {100 * (1 - a / b):+.1f}% fewer tokens than {base} overall")
