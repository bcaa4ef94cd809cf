"""``herd data run | label | train-classifier``: thin verbs over herd.data.pipeline and herd.data.quality."""

from __future__ import annotations

import argparse


def cmd_run(a: argparse.Namespace, overrides: list[str]) -> None:
    from herd.config import load_config
    from herd.data.executors import make_executor
    from herd.data.pipeline import DataRunConfig, run_pipeline
    from herd.data.report import format_stats

    cfg = load_config(a.config, overrides, cls=DataRunConfig)
    executor = make_executor(a.executor, a.workers, a.ray_address)
    try:
        stats = run_pipeline(a.input, a.out, cfg, executor, progress=not a.quiet)
    finally:
        executor.close()
    print(format_stats(stats))
    print(f"wrote {a.out}/data, {a.out}/removed, {a.out}/stats.json, {a.out}/funnel.png")


def cmd_label(a: argparse.Namespace) -> None:
    import json
    from pathlib import Path

    from herd.data.quality import default_rubric, label_rows, label_with_endpoint, label_with_model
    from herd.data.readers import DataError, expand_inputs, iter_documents
    from herd.io import atomic_write_text

    if bool(a.model) == bool(a.endpoint):
        raise DataError("give exactly one of --model DIR or --endpoint URL")
    labels = tuple(s.strip() for s in a.labels.split(",") if s.strip())
    if len(set(labels)) < 2:
        raise DataError(f"--labels {a.labels!r}: give at least two different labels, comma-separated")
    if a.rubric:
        if not Path(a.rubric).is_file():
            raise DataError(f"--rubric {a.rubric}: no such file")
        rubric = Path(a.rubric).read_text(encoding="utf-8")
        if not rubric.strip():
            raise DataError(f"--rubric {a.rubric}: the file is empty")
    else:
        rubric = default_rubric(labels)
    texts = []
    for text in iter_documents(expand_inputs(a.input)):
        texts.append(text)
        if len(texts) >= a.samples:
            break
    if a.model:
        answers = label_with_model(texts, a.model, rubric, labels=labels)
    else:
        answers = label_with_endpoint(texts, a.endpoint, a.endpoint_model, a.api_key or "none", rubric, labels=labels)
    rows = label_rows(texts, answers, labels)
    atomic_write_text(a.out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    counts = ", ".join(f"{lab} {sum(r['label'] == lab for r in rows)}" for lab in labels)
    unparsable = sum(r["label"] is None for r in rows)
    print(f"labelled {len(rows) - unparsable} of {len(rows)} documents ({counts}); {unparsable} answers named no "
          f"label (label null, skipped by train-classifier) -> {a.out}")


def cmd_train_classifier(a: argparse.Namespace) -> None:
    from herd.data.quality import read_labels, train_classifier

    texts, labels = read_labels(a.labels)
    m = train_classifier(texts, labels, a.out, holdout=a.holdout, seed=a.seed, positive=a.positive)
    auc = f", AUC {m['auc']:.3f}" if "auc" in m else ""
    print(f"held-out accuracy {m['accuracy']:.3f}{auc} on {m['test']} documents (trained on {m['train']}); "
          f"wrote {a.out}")


def register(sub, groups: dict) -> None:
    data = groups["data"]
    s = data.add_parser("run", help="curate raw documents: extract, filter, dedup, score, mix (resumable)",
                        description="Extra --section.key=value arguments override the config file.")
    s.add_argument("--input", nargs="+", required=True,
                   help="files or directories: txt/py/md..., jsonl(.zst), parquet, html, warc(.gz)")
    s.add_argument("--out", required=True, help="output directory (rerun the same command to resume)")
    s.add_argument("--config", default=None, help="TOML file (see configs/data/)")
    s.add_argument("--executor", default="local", choices=["local", "ray"])
    s.add_argument("--workers", type=int, default=1, help="local worker processes (output is the same for any N)")
    s.add_argument("--ray-address", default=None, help="HOST:PORT of a running Ray cluster (default: start one)")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=cmd_run, takes_overrides=True)

    s = data.add_parser("label", help="have a chat model grade documents against a rubric (quality yes/no, domains)")
    s.add_argument("--input", nargs="+", required=True, help="documents (any `herd data tokenize` input)")
    s.add_argument("--out", required=True, help="labels JSONL: text, label (one of --labels, or null), answer")
    s.add_argument("--model", default=None, help="a herd/HF model directory (run by herd's engine)")
    s.add_argument("--endpoint", default=None, help="an OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    s.add_argument("--endpoint-model", default="default", help="model name to send to the endpoint")
    s.add_argument("--api-key", default=None)
    s.add_argument("--labels", default="yes,no",
                   help="the answers to look for, comma-separated: yes,no (quality) or e.g. general,math,code (domain)")
    s.add_argument("--rubric", default=None,
                   help="a text file with the grading instructions (default: built in, for yes,no or for domains)")
    s.add_argument("--samples", type=int, default=1000, help="documents to label (the first N)")
    s.set_defaults(fn=cmd_label)

    s = data.add_parser("train-classifier", help="train a fast n-gram classifier on labels; held-out accuracy/AUC")
    s.add_argument("--labels", required=True, help="JSONL with text and label fields")
    s.add_argument("--out", required=True, help="classifier directory (use as [quality] model or [domain] model)")
    s.add_argument("--holdout", type=float, default=0.2)
    s.add_argument("--positive", default=None, help="the 'good' label of a binary classifier (default: the last)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=cmd_train_classifier)
