"""``herd data run``: raw documents in, curated shards out, in passes over input shards that any executor can run.

The configured stages are cut into passes at every global stage (see stage.py). Pass k reads shard i (the input
files for pass 0, pass k-1's output otherwise), applies the previous global stage's plan, runs the doc stages,
scans for the next global stage and writes, atomically, its kept documents, its removed records and a ``.done``
file with its counts. A shard whose ``.done`` exists is never redone, so a killed run resumes where it stopped and
ends with exactly the bytes of an uninterrupted one. Shards are fixed by the inputs and the config alone (one per
multi-document file, or one per ``split_bytes`` piece of a big JSONL/Parquet file; ``shard_files`` single-document
files per shard), never by the number of workers.

Layout of ``--out DIR``::

    data/00000.jsonl.zst ...   kept documents: id, text, then metadata (url, language, scores, domain, ...)
    data/en/00000.jsonl.zst    ... or, with ``route_by = "language"``, one folder per language (per value of the field)
    removed/00000-p0.jsonl.zst one record per removed document: id, stage, reason, bytes
    stats.json                 documents and bytes in, kept and removed per stage (with reasons)
    funnel.png                 the same as a picture
    config.toml, inputs.json   what produced it (a rerun with other settings is refused)
    work/                      pass outputs, scans and plans while running (deleted at the end)
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from herd.config import to_toml
from herd.data.dedup.exact import ExactDedup, ExactDedupConfig, URLDedup, URLDedupConfig
from herd.data.dedup.lines import LineDedup, LineDedupConfig
from herd.data.dedup.minhash import MinHashConfig, MinHashDedup
from herd.data.dedup.semantic import SemanticDedup, SemanticDedupConfig
from herd.data.extract import Extract, ExtractConfig
from herd.data.filters.heuristics import (
    C4Config,
    C4Quality,
    FineWebConfig,
    FineWebQuality,
    GopherQuality,
    GopherQualityConfig,
    GopherRepetition,
    GopherRepetitionConfig,
)
from herd.data.filters.kl import KLFilter, KLFilterConfig
from herd.data.filters.safety import DirtyWords, DirtyWordsConfig, URLFilter, URLFilterConfig
from herd.data.langid import LanguageConfig, LanguageID
from herd.data.mix import DomainConfig, DomainTagger, Mix, MixConfig
from herd.data.quality import QualityConfig, QualityScorer
from herd.data.readers import DataError
from herd.data.shardio import read_jsonl_zst, write_jsonl_zst
from herd.data.sources import is_single_document, iter_records, pieces
from herd.data.stage import load_npz, plan_path, save_npz
from herd.io import atomic_write_json, atomic_write_text, read_json

DEFAULT_STAGES = ("extract,url_filter,url_dedup,language,gopher_quality,gopher_repetition,c4_quality,fineweb_quality,"
                  "dirty_words,exact_dedup,minhash_dedup,semantic_dedup,line_dedup,kl_filter,quality,domain,mix")


@dataclass
class RunConfig:
    stages: str = DEFAULT_STAGES  # the order stages run in; a stage also needs `enabled = true` in its section
    shard_files: int = 1000  # single-document files (txt, html, py, ...) grouped into one input shard
    split_bytes: int = 256_000_000  # an uncompressed JSONL file larger than this is read as several shards (0: never)
    route_by: str = ""  # "language" (or any metadata field): kept documents go to data/<value>/; "" = data/ itself
    text_field: str = "text"  # JSONL field / Parquet column holding the text
    strict: bool = False  # true: unreadable input stops the run with an error instead of a removed/ record
    removed_text: bool = False  # also keep the text of removed documents in removed/ (for inspection)
    keep_work: bool = False  # keep work/ (scans, plans, pass outputs) after a successful run


@dataclass
class DataRunConfig:
    run: RunConfig = field(default_factory=RunConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    url_filter: URLFilterConfig = field(default_factory=URLFilterConfig)
    url_dedup: URLDedupConfig = field(default_factory=URLDedupConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    gopher_quality: GopherQualityConfig = field(default_factory=GopherQualityConfig)
    gopher_repetition: GopherRepetitionConfig = field(default_factory=GopherRepetitionConfig)
    c4_quality: C4Config = field(default_factory=C4Config)
    fineweb_quality: FineWebConfig = field(default_factory=FineWebConfig)
    dirty_words: DirtyWordsConfig = field(default_factory=DirtyWordsConfig)
    exact_dedup: ExactDedupConfig = field(default_factory=ExactDedupConfig)
    minhash_dedup: MinHashConfig = field(default_factory=MinHashConfig)
    semantic_dedup: SemanticDedupConfig = field(default_factory=SemanticDedupConfig)
    line_dedup: LineDedupConfig = field(default_factory=LineDedupConfig)
    kl_filter: KLFilterConfig = field(default_factory=KLFilterConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    domain: DomainConfig = field(default_factory=DomainConfig)
    mix: MixConfig = field(default_factory=MixConfig)


STAGES = {"extract": Extract, "url_filter": URLFilter, "url_dedup": URLDedup, "language": LanguageID,
          "gopher_quality": GopherQuality, "gopher_repetition": GopherRepetition, "c4_quality": C4Quality,
          "fineweb_quality": FineWebQuality, "dirty_words": DirtyWords, "exact_dedup": ExactDedup,
          "minhash_dedup": MinHashDedup, "semantic_dedup": SemanticDedup, "line_dedup": LineDedup,
          "kl_filter": KLFilter, "quality": QualityScorer,
          "domain": DomainTagger, "mix": Mix}
# Doc stages that apply only to some languages (English rules): they pass other languages through untouched.
ENGLISH_ONLY = {"gopher_quality", "gopher_repetition", "c4_quality", "fineweb_quality"}


def enabled_stages(cfg: DataRunConfig) -> list[str]:
    names = [s.strip() for s in cfg.run.stages.split(",") if s.strip()]
    for name in names:
        if name not in STAGES:
            raise DataError(f"[run] stages: unknown stage {name!r} (known: {', '.join(STAGES)})")
    return [n for n in names if getattr(cfg, n).enabled]


def build_stages(cfg: DataRunConfig) -> list:
    return [STAGES[name](getattr(cfg, name)) for name in enabled_stages(cfg)]


def is_global(stage) -> bool:
    return hasattr(stage, "scan")


@dataclass
class Pass:
    """apply ``before`` (a global stage's plan), run ``doc_stages``, scan for ``after`` (the next global stage)."""

    before: object | None
    doc_stages: list
    after: object | None


def plan_passes(stages: list) -> list[Pass]:
    passes, current, before = [], [], None
    for stage in stages:
        if is_global(stage):
            passes.append(Pass(before, current, stage))
            before, current = stage, []
        else:
            current.append(stage)
    passes.append(Pass(before, current, None))
    return passes


# --- inputs -----------------------------------------------------------------------------------------------------
SKIP_SUFFIXES = {".pyc", ".pyo", ".so", ".o", ".a", ".dll", ".exe", ".png", ".jpg", ".jpeg", ".gif", ".ico", ".zip",
                 ".xz", ".bz2", ".tar", ".bin", ".npy", ".pt", ".pth", ".safetensors", ".wav", ".pdf"}


def input_files(inputs: list[str]) -> list[tuple[str, str]]:
    """(path, document id prefix) of every input file, sorted within each directory; ids are paths relative to the
    directory named (or the file name)."""
    out = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            for p in sorted(path.rglob("*")):
                rel = p.relative_to(path)
                if p.is_file() and p.suffix.lower() not in SKIP_SUFFIXES and not any(
                        part.startswith(".") or part == "__pycache__" for part in rel.parts):
                    out.append((str(p), rel.as_posix()))
        elif path.is_file():
            out.append((str(path), path.name))
        else:
            raise DataError(f"{path}: no such file or directory")
    if not out:
        raise DataError(f"no input files in {', '.join(inputs)}")
    return out


def input_shards(files: list[tuple[str, str]], shard_files: int, split_bytes: int = 0) -> list[list[tuple]]:
    """Input shards: runs of ``shard_files`` single-document files; each other file alone, or, when it is a JSONL or
    Parquet file over ``split_bytes``, each of its pieces alone as ``(path, prefix, piece)``."""
    shards: list[list[tuple]] = []
    group: list[tuple] = []
    for f in files:
        if is_single_document(Path(f[0])):
            group.append(f)
            if len(group) >= shard_files:
                shards.append(group)
                group = []
        else:
            if group:
                shards.append(group)
                group = []
            cuts = pieces(Path(f[0]), split_bytes)
            shards += [[f]] if len(cuts) == 1 else [[(f[0], f[1], piece)] for piece in cuts]
    if group:
        shards.append(group)
    return shards


# --- one task: pass k over shard i -------------------------------------------------------------------------------
@dataclass
class Task:
    out: str
    cfg: DataRunConfig
    pass_index: int
    shard: int
    inputs: list[tuple]  # pass 0 only: (path, id prefix) or (path, id prefix, piece)


_STAGE_CACHE: dict[str, list] = {}


def _stages_for(cfg: DataRunConfig) -> list:
    key = to_toml(cfg)
    if key not in _STAGE_CACHE:  # models and lists load once per worker process
        _STAGE_CACHE.clear()
        _STAGE_CACHE[key] = build_stages(cfg)
    return _STAGE_CACHE[key]


def _pass_dir(out: Path, k: int, n_passes: int) -> Path:
    return out / "data" if k == n_passes - 1 else out / "work" / f"pass-{k}"


def _done_path(out: Path, k: int, shard: int) -> Path:
    return out / "work" / f"pass-{k}" / f"{shard:05d}.done"


def _nbytes(doc: dict) -> int:
    return len(doc["text"].encode("utf-8", "surrogatepass"))


class _Counter:
    def __init__(self):
        self.stats: dict[str, dict] = {}

    def add(self, stage: str, removed: bool, nbytes: int, reason: str | None = None) -> None:
        s = self.stats.setdefault(stage, {"docs_in": 0, "bytes_in": 0, "docs_removed": 0, "bytes_removed": 0,
                                          "reasons": {}})
        s["docs_in"] += 1
        s["bytes_in"] += nbytes
        if removed:
            s["docs_removed"] += 1
            s["bytes_removed"] += nbytes
            s["reasons"][reason] = s["reasons"].get(reason, 0) + 1


def run_task(task: Task) -> dict:
    """Run one pass over one shard; returns (and stores in the ``.done`` file) its counts."""
    out = Path(task.out)
    done = _done_path(out, task.pass_index, task.shard)
    if done.exists():
        return read_json(done)
    stages = _stages_for(task.cfg)
    passes = plan_passes(stages)
    p = passes[task.pass_index]
    counter, removed, docs = _Counter(), [], []

    def drop(doc: dict, stage: str, reason: str, nbytes: int) -> None:
        rec = {"id": doc["id"], "stage": stage, "reason": reason, "bytes": nbytes}
        if task.cfg.run.removed_text and "text" in doc:
            rec["text"] = doc["text"]
        removed.append(rec)

    if task.pass_index == 0:
        for path, prefix, *piece in task.inputs:
            for rec in iter_records(Path(path), prefix, task.cfg.run.text_field, *piece):
                if "error" in rec:
                    if task.cfg.run.strict:
                        raise DataError(f"{path}: {rec['id']}: {rec['error']}")
                    counter.add("read", True, rec.get("bytes", 0), rec["error"].split(" (")[0])
                    drop(rec, "read", rec["error"], rec.get("bytes", 0))
                else:
                    counter.add("read", False, _nbytes(rec))
                    docs.append(rec)
    else:
        docs = list(read_jsonl_zst(_pass_dir(out, task.pass_index - 1, len(passes)) / f"{task.shard:05d}.jsonl.zst"))

    if p.before is not None:
        plan_dir = out / "work" / f"plan-{p.before.name}"
        shard_plan = plan_path(plan_dir, task.shard)
        plan = load_npz(shard_plan if shard_plan.exists() else plan_dir / "plan.npz")
        sizes = [_nbytes(d) for d in docs]
        reasons = p.before.apply(docs, plan)
        kept = []
        for doc, reason, nbytes in zip(docs, reasons, sizes):
            counter.add(p.before.name, reason is not None, nbytes, reason)
            if reason is None:
                kept.append(doc)
            else:
                drop(doc, p.before.name, reason, nbytes)
        docs = kept

    kept = []
    for doc in docs:
        for stage in p.doc_stages:
            nbytes = _nbytes(doc)
            if stage.name in ENGLISH_ONLY and doc.get("language", "en") != "en":
                counter.add(stage.name, False, nbytes)
                continue
            reason = stage(doc)
            counter.add(stage.name, reason is not None, nbytes, reason)
            if reason is not None:
                drop(doc, stage.name, reason, nbytes)
                break
        else:
            kept.append(doc)

    if p.after is not None:
        save_npz(out / "work" / f"scan-{p.after.name}" / f"{task.shard:05d}.npz", **p.after.scan(kept))
    result = {"stats": counter.stats, "docs_out": len(kept), "bytes_out": sum(_nbytes(d) for d in kept)}
    final = task.pass_index == len(passes) - 1
    if final and task.cfg.run.route_by:
        result["routes"] = write_routed(out / "data", task.shard, kept, task.cfg.run.route_by)
    else:
        write_jsonl_zst(_pass_dir(out, task.pass_index, len(passes)) / f"{task.shard:05d}.jsonl.zst", kept)
    if removed:
        write_jsonl_zst(out / "removed" / f"{task.shard:05d}-p{task.pass_index}.jsonl.zst", removed)
    atomic_write_json(done, result)  # written last: the shard is finished only when this exists
    return result


def route_name(value) -> str:
    """A folder name for a routing value: the value with anything but letters, digits, ``_.-`` replaced."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(value)).lstrip(".") if value not in (None, "") else ""
    return name or "unknown"


def write_routed(data_dir: Path, shard: int, docs: list[dict], field: str) -> dict[str, list[int]]:
    """Write a shard's kept documents to ``data_dir/<value of field>/SHARD.jsonl.zst`` (corpus order kept within
    each folder); returns {folder: [docs, bytes]}."""
    groups: dict[str, list[dict]] = {}
    for doc in docs:
        groups.setdefault(route_name(doc.get(field)), []).append(doc)
    for name in sorted(groups):
        write_jsonl_zst(data_dir / name / f"{shard:05d}.jsonl.zst", groups[name])
    return {name: [len(groups[name]), sum(_nbytes(d) for d in groups[name])] for name in sorted(groups)}


# --- the driver -------------------------------------------------------------------------------------------------
def run_pipeline(inputs: list[str], out: str | Path, cfg: DataRunConfig, executor, progress: bool = True) -> dict:
    """Run (or resume, or report a finished) ``herd data run``; returns stats.json's content."""
    from herd.data.report import aggregate_stats, plot_funnel

    out = Path(out)
    files = input_files(inputs)
    shards = input_shards(files, cfg.run.shard_files, cfg.run.split_bytes)
    _check_or_record_run(out, cfg, files)
    if (out / "stats.json").exists():
        return read_json(out / "stats.json", DataError)
    passes = plan_passes(build_stages(cfg))
    results: list[list[dict]] = []
    for k, p in enumerate(passes):
        names = [s.name for s in ([p.before] if p.before else []) + p.doc_stages + ([p.after] if p.after else [])]
        tasks = [Task(str(out), cfg, k, i, shard if k == 0 else []) for i, shard in enumerate(shards)]
        (out / "work" / f"pass-{k}").mkdir(parents=True, exist_ok=True)
        res = executor.map(run_task, tasks, desc=f"pass {k + 1}/{len(passes)}: {' > '.join(names) or 'write'}",
                           progress=progress, unit="shard")
        results.append(res)
        if p.after is not None:
            plan_dir = out / "work" / f"plan-{p.after.name}"
            if not (plan_dir / "DONE").exists():
                shutil.rmtree(plan_dir, ignore_errors=True)
                plan_dir.mkdir(parents=True)
                scans = [out / "work" / f"scan-{p.after.name}" / f"{i:05d}.npz" for i in range(len(shards))]
                p.after.reduce(scans, plan_dir, executor)
                atomic_write_text(plan_dir / "DONE", "")
    (out / "data").mkdir(exist_ok=True)  # even when nothing was kept (or routed), DIR/data marks a finished run
    stats = aggregate_stats(results, [s.name for s in build_stages(cfg)])
    atomic_write_json(out / "stats.json", stats)
    plot_funnel(stats, out / "funnel.png")
    if not cfg.run.keep_work:
        shutil.rmtree(out / "work", ignore_errors=True)
    return stats


def _check_or_record_run(out: Path, cfg: DataRunConfig, files: list[tuple[str, str]]) -> None:
    record = {"inputs": [f for f, _ in files]}
    toml = to_toml(cfg)
    if (out / "config.toml").exists():
        if (out / "config.toml").read_text(encoding="utf-8") != toml or read_json(out / "inputs.json") != record:
            raise DataError(f"{out}: holds a run with other inputs or settings; choose a new --out (or delete it)")
        return
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out}: exists and is not a `herd data run` output; choose a new --out")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "inputs.json", record)
    atomic_write_text(out / "config.toml", toml)  # written last: marks the directory as this run's
