"""``herd eval``: run tasks on a backend, keep every finished item on disk, score, and report.

Reading order: ``evaluate`` builds every task first (so a missing data file fails before any model work), then for
each task sends the items not yet in the progress file to the backend — log-likelihood items in chunks of one
subset (so the chunk's few-shot prefix is shared), generation items all at once through the continuous-batching
engine — appending each finished item's raw response to ``OUT.partial.jsonl`` (flushed and fsynced). A killed run
started again with the same command skips those items. Scoring runs on the saved responses (``score_records``, the
same code ``herd eval score`` uses), then ``OUT`` is written atomically and the progress file removed.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from herd.errors import UserError
from herd.eval.tasks import TaskOptions, TaskSpec, build_task
from herd.eval.tasks.base import Item, iter_chunks
from herd.io import atomic_write_json, atomic_write_text

CHUNK_ITEMS = 64  # log-likelihood items per backend call (and per progress-file flush)


@dataclass
class EvalConfig:
    tasks: list[str]
    data_dir: str
    out: str
    limit: int | None = None
    num_fewshot: int | None = None
    chat: bool = False
    samples: int = 1
    temperature: float | None = None
    seed: int = 1234
    samples_out: str | None = None
    max_new_tokens: int | None = None  # None: each task's own budget (Meta's); set: a cap for quick runs
    subsets: tuple[str, ...] | None = None  # only these subsets of the tasks (e.g. MMLU subjects)

    def options(self) -> TaskOptions:
        return TaskOptions(chat=self.chat, num_fewshot=self.num_fewshot, limit=self.limit, samples=self.samples,
                           temperature=self.temperature, seed=self.seed, subsets=self.subsets)


# --- the progress file --------------------------------------------------------------------------------------------
class ProgressFile:
    """``OUT.partial.jsonl``: a header line (what produced it), then one line per finished item."""

    def __init__(self, path: Path, header: dict):
        self.path = path
        self.done: dict[tuple[str, str], Any] = {}
        if path.exists():
            self._load(header)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"herd_eval_progress": header}) + "\n", encoding="utf-8")
        self.file = open(path, "a", encoding="utf-8")

    def _load(self, header: dict) -> None:
        raw = self.path.read_bytes()
        good = raw[: raw.rfind(b"\n") + 1]  # a line cut by a kill is dropped
        lines = good.decode("utf-8").splitlines()
        try:
            found = json.loads(lines[0])["herd_eval_progress"] if lines else None
        except (json.JSONDecodeError, KeyError, TypeError):
            found = None
        if found != header:
            raise UserError(f"{self.path}: progress file of a different run (model or settings differ); "
                            "delete it or choose another --out")
        for line in lines[1:]:
            rec = json.loads(line)
            self.done[(rec["task"], rec["id"])] = rec["response"]
        if len(good) != len(raw):
            with open(self.path, "r+b") as f:
                f.truncate(len(good))

    def add(self, records: Sequence[dict]) -> None:
        for rec in records:
            self.done[(rec["task"], rec["id"])] = rec["response"]
            self.file.write(json.dumps(rec) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())
        # fault injection for tests: ``HERD_FAULT=kill-after-items:N`` dies (SIGKILL) once N items are on disk
        if os.environ.get("HERD_FAULT", "").startswith("kill-after-items:"):
            if len(self.done) >= int(os.environ["HERD_FAULT"].split(":")[1]):
                os.kill(os.getpid(), signal.SIGKILL)

    def close(self, remove: bool = False) -> None:
        self.file.close()
        if remove:
            self.path.unlink(missing_ok=True)


# --- running ------------------------------------------------------------------------------------------------------
def run_task(backend, spec: TaskSpec, progress: ProgressFile, seed: int, show_progress: bool = True) -> None:
    from tqdm import tqdm

    todo = [it for it in spec.items if (spec.name, it.id) not in progress.done]
    bar = tqdm(total=len(spec.items), initial=len(spec.items) - len(todo), desc=spec.name, unit="item",
               disable=not show_progress, dynamic_ncols=True, file=sys.stderr)
    try:
        by_subset: dict[str, list[Item]] = defaultdict(list)
        for it in todo:
            if it.continuations is not None:
                by_subset[it.subset].append(it)
        for items in by_subset.values():
            for chunk in iter_chunks(items, CHUNK_ITEMS):
                requests = [(it.prompt, c) for it in chunk for c in it.continuations]
                scores = iter(backend.loglikelihood(requests))
                progress.add([{"task": spec.name, "id": it.id,
                               "response": [next(scores)[0] for _ in it.continuations]} for it in chunk])
                bar.update(len(chunk))
        gen_items = [it for it in todo if it.continuations is None]
        if gen_items:
            def done(i: int, texts: list[str]) -> None:
                progress.add([{"task": spec.name, "id": gen_items[i].id, "response": texts}])
                bar.update(1)

            backend.generate([it.prompt for it in gen_items], [it.id for it in gen_items], spec.generation, seed,
                             done)
    finally:
        bar.close()


def score_records(spec: TaskSpec, responses: dict[str, Any]) -> tuple[dict, list[dict]]:
    """(summary, per-item records) of the items of ``spec`` that have a response."""
    items = [it for it in spec.items if it.id in responses]
    per_item = spec.score_all(items, [responses[it.id] for it in items])
    records = [{"task": spec.name, "id": it.id, "subset": it.subset, "gold": it.gold, "response": responses[it.id],
                "metrics": m} for it, m in zip(items, per_item)]
    return summarize(spec, items, per_item), records


def summarize(spec: TaskSpec, items: Sequence[Item], per_item: Sequence[dict[str, float]]) -> dict:
    names = sorted({k for m in per_item for k in m})
    subsets: dict[str, list[dict]] = defaultdict(list)
    for it, m in zip(items, per_item):
        subsets[it.subset].append(m)
    out: dict[str, Any] = {}
    for name in names:
        values = [m[name] for m in per_item if name in m]
        micro = sum(values) / len(values)
        if len(subsets) > 1 and spec.macro:
            means = [sum(m[name] for m in ms) / len(ms) for ms in subsets.values()]
            out[name] = sum(means) / len(means)
            out[f"{name}_micro"] = micro
        else:
            out[name] = micro
        if name == spec.headline and len(values) > 1:
            var = sum((v - micro) ** 2 for v in values) / (len(values) - 1)
            out[f"{name}_stderr"] = math.sqrt(var / len(values))
    out["n"] = len(per_item)
    out["headline"] = spec.headline
    if len(subsets) > 1:
        out["subsets"] = {s: {**{n: sum(m[n] for m in ms) / len(ms) for n in names if all(n in m for m in ms)},
                              "n": len(ms)} for s, ms in subsets.items()}
    settings = dict(spec.settings)
    if spec.generation is not None and any(it.continuations is None for it in spec.items):
        settings["generation"] = asdict(spec.generation)
    out["settings"] = settings
    return out


def _apply_sampling(spec: TaskSpec, cfg: EvalConfig) -> None:
    """--samples / --temperature / --max-new-tokens on a task's generation settings. Several samples without a
    temperature sample at Llama's default (0.6, top-p 0.9) unless the task has its own (HumanEval: 0.2, 0.95)."""
    gen = spec.generation
    if gen is None:
        return
    gen.n = cfg.samples
    if cfg.temperature is not None:
        gen.temperature = cfg.temperature
    elif cfg.samples > 1 and gen.temperature == 0:
        gen.temperature, gen.top_p = 0.6, 0.9
    if cfg.max_new_tokens is not None:
        gen.max_new_tokens = cfg.max_new_tokens


def evaluate(backend, cfg: EvalConfig, show_progress: bool = True) -> dict:
    """Run ``cfg.tasks`` on ``backend``; write ``cfg.out`` (and ``cfg.samples_out``); return the results."""
    options = cfg.options()
    specs = [build_task(name, cfg.data_dir, options) for name in cfg.tasks]
    for spec in specs:
        _apply_sampling(spec, cfg)
    out = Path(cfg.out)
    header = {"model": backend.name, "chat": cfg.chat, "num_fewshot": cfg.num_fewshot, "samples": cfg.samples,
              "temperature": cfg.temperature, "seed": cfg.seed, "max_new_tokens": cfg.max_new_tokens}
    progress = ProgressFile(out.with_name(out.name + ".partial.jsonl"), header)
    results, all_records, started = {}, [], time.time()
    try:
        for spec in specs:
            t0 = time.time()
            run_task(backend, spec, progress, cfg.seed, show_progress)
            responses = {i: r for (task, i), r in progress.done.items() if task == spec.name}
            summary, records = score_records(spec, responses)
            summary["seconds"] = round(time.time() - t0, 2)
            results[spec.name] = summary
            all_records += records
    except BaseException:
        progress.close()
        raise
    report = {"model": backend.name, "results": results,
              "config": {**{k: v for k, v in asdict(cfg).items() if k not in ("out", "samples_out")}},
              "seconds": round(time.time() - started, 2)}
    atomic_write_json(out, report)
    if cfg.samples_out:
        atomic_write_text(cfg.samples_out, "".join(json.dumps(r) + "\n" for r in all_records))
    progress.close(remove=True)
    return report


# --- the terminal table -------------------------------------------------------------------------------------------
def format_table(results: dict[str, dict]) -> str:
    """The terminal table: each task's headline metric (percent), its standard error, n and the setting."""
    rows = [("task", "metric", "value", "± stderr", "n", "setting")]
    for task, r in results.items():
        metric = r["headline"]
        s = r.get("settings", {})
        shots = s.get("shots")
        shots_txt = "" if shots is None else (f"{shots}-shot" if isinstance(shots, int) else "few-shot")
        setting = ", ".join(x for x in (shots_txt, s.get("answer") or s.get("prompt") or "") if x)
        err = r.get(f"{metric}_stderr")
        rows.append((task, metric, f"{100 * r[metric]:.1f}", "" if err is None else f"{100 * err:.1f}",
                     str(r["n"]), setting))
        if f"{metric}_micro" in r:
            rows.append(("", f"{metric}_micro", f"{100 * r[metric + '_micro']:.1f}", "", "", "average over items"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i in (0, 1, 5) else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)

