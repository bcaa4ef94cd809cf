"""``herd scaling sweep``: train a family of models at several compute budgets, each an ordinary pretraining run.

The config is a pretraining config (``[model] [data] [train] ...``, the settings every point shares) plus a
``[scaling]`` section:

* the family: one aspect-ratio rule, ``dim = aspect_ratio * n_layers``, ``n_heads = dim / head_dim`` (multi-head
  attention), for ``n_layers`` in ``depths``;
* at each budget C, ``sizes`` consecutive members of the family, the window whose geometric-mean tokens per
  parameter is closest to ``tokens_per_param`` (Llama 3 trains "a subset of sizes per budget");
* each member trains for the tokens the budget allows: D = C / F, where F = ``herd.model.flops.
  train_flops_per_token`` = 6 N + 12 n_layers n_heads head_dim seq_len (PaLM's count, attention included; N = the
  matmul parameters, output head included, input-embedding lookup excluded), rounded to whole optimizer steps. The
  recorded C is F x D of the run actually made; the cosine schedule spans each run's own steps.

Each point is a run directory ``DIR/runs/<name>`` made by ``herd.train.pretrain.pretrain`` (so ``herd plot`` and
``herd pretrain --config DIR/runs/<name>/config.toml`` work on it); a point whose ``point.json`` exists is skipped
on rerun, an interrupted one resumes from its checkpoint. ``scaling.jobs`` > 1 trains that many points at once,
each in its own ``herd pretrain`` process with cores / jobs threads (tiny models leave a core idle otherwise).
``DIR/points.jsonl`` lists the finished points:
N, D, C, budget, loss (final validation loss, nats/token) and, per configured task, ``nll/TASK``, ``acc/TASK``,
``chance/TASK``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from herd.config import ConfigError, PretrainConfig, load_config, to_toml
from herd.errors import UserError
from herd.io import atomic_write_json, atomic_write_text


@dataclass
class ScalingConfig:
    budgets: str = "1.4e12,2.1e12,2.8e12"  # training FLOPs per isoFLOP profile, comma-separated
    depths: str = "1,2,3,4,5,6,7,8"  # n_layers of the family's members
    aspect_ratio: int = 16  # dim = aspect_ratio * n_layers
    head_dim: int = 16  # n_heads = dim / head_dim
    sizes: int = 4  # members trained per budget
    tokens_per_param: float = 20.0  # each budget's window of sizes is centred on this D / N (Chinchilla: ~20)
    warmup_fraction: float = 0.05  # warmup steps = this x the run's steps (a fixed count would not fit every run)
    min_steps: int = 50  # a point with fewer optimizer steps is an error: its loss would say little
    tasks: str = ""  # comma-separated JSONL multiple-choice files, scored after each run (herd.scaling.tasks)
    jobs: int = 1  # points trained at once, each in its own `herd pretrain` process with cores / jobs threads


@dataclass
class SweepConfig(PretrainConfig):
    scaling: ScalingConfig = field(default_factory=ScalingConfig)


@dataclass
class Point:
    budget: float
    n_layers: int
    dim: int
    n_heads: int
    N: int
    flops_per_token: float
    steps: int
    D: int
    C: float

    @property
    def name(self) -> str:
        return f"C{self.budget:.2e}-L{self.n_layers}-d{self.dim}"


def parse_floats(text: str, what: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{what}: expected comma-separated numbers, got {text!r}") from None
    if not values or any(not math.isfinite(v) or v <= 0 for v in values):
        raise ConfigError(f"{what}: expected positive numbers, got {text!r}")
    return values


def load_sweep_config(path: str | Path, overrides: list[str] = (), budgets: str | None = None,
                      sizes: int | None = None) -> SweepConfig:
    cfg = load_config(path, overrides, cls=SweepConfig)
    if budgets is not None:
        cfg.scaling.budgets = budgets
    if sizes is not None:
        cfg.scaling.sizes = sizes
    return cfg


def point_config(cfg: SweepConfig, point: Point) -> PretrainConfig:
    """The ordinary pretraining config of one point: the shared sections with this member's shape and steps."""
    pc = PretrainConfig(**{f.name: copy.deepcopy(getattr(cfg, f.name)) for f in dataclasses.fields(PretrainConfig)})
    pc.model.dim, pc.model.n_layers = point.dim, point.n_layers
    pc.model.n_heads = pc.model.n_kv_heads = point.n_heads
    pc.train.steps = point.steps
    pc.train.warmup_steps = max(1, round(cfg.scaling.warmup_fraction * point.steps))
    pc.train.val_interval = 0  # only the final validation loss enters the fit
    pc.checkpoint.export_hf = True  # the tasks are scored on the exported model
    return pc


def plan(cfg: SweepConfig, vocab_size: int) -> list[Point]:
    """Every (budget, size) point of the sweep, checked before anything trains."""
    from herd.model import flops
    from herd.model.args import ModelArgs

    sc = cfg.scaling
    budgets = parse_floats(sc.budgets, "scaling.budgets")
    depths = [int(d) for d in parse_floats(sc.depths, "scaling.depths")]
    if sc.sizes < 3:
        raise ConfigError(f"scaling.sizes = {sc.sizes}: a parabola per budget needs at least 3 sizes")
    if len(budgets) < 3:
        raise ConfigError(f"scaling.budgets has {len(budgets)} budget(s); the power laws need at least 3")
    if len(depths) < sc.sizes:
        raise ConfigError(f"scaling.depths lists {len(depths)} members, fewer than scaling.sizes = {sc.sizes}")
    if getattr(cfg.model, "init_from", ""):
        raise ConfigError("model.init_from is set: every point of a sweep trains from scratch")
    shape_keys = {f.name for f in dataclasses.fields(ModelArgs)}  # ModelConfig also holds non-shape settings
    base = {k: v for k, v in dataclasses.asdict(cfg.model).items() if k in shape_keys and v is not None}
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    family = []
    for L in sorted(depths):
        dim = sc.aspect_ratio * L
        if dim % sc.head_dim:
            raise ConfigError(f"scaling: dim = {dim} (aspect_ratio x {L} layers) is not a multiple of head_dim")
        shape = {**base, "dim": dim, "n_layers": L, "n_heads": dim // sc.head_dim, "n_kv_heads": dim // sc.head_dim,
                 "vocab_size": base.get("vocab_size", vocab_size)}
        try:
            args = ModelArgs.from_name(cfg.model.preset, **shape)
        except (KeyError, ValueError) as e:
            raise ConfigError(f"scaling: the member with {L} layers: {e}") from None
        family.append((L, dim, args.n_heads, flops.matmul_params(args), flops.train_flops_per_token(args,
                                                                                                  cfg.data.seq_len)))
    points = []
    def ratio_error(window: list, budget: float) -> float:  # distance, in log, of the window's mean D/N from target
        logs = [math.log(budget / f / n) for _, _, _, n, f in window]
        return abs(sum(logs) / len(logs) - math.log(sc.tokens_per_param))

    windows = [family[i:i + sc.sizes] for i in range(len(family) - sc.sizes + 1)]
    for budget in sorted(budgets):
        for L, dim, heads, n, fpt in min(windows, key=lambda w: ratio_error(w, budget)):  # noqa: B023 (used now)
            steps = round(budget / (fpt * tokens_per_step))
            if steps < sc.min_steps:
                raise ConfigError(f"scaling: budget {budget:.3g} FLOPs gives the {L}-layer member (N = {n:,}) only "
                                  f"{steps} steps of {tokens_per_step:,} tokens (scaling.min_steps = "
                                  f"{sc.min_steps}); raise the budget or lower data.batch_size")
            D = steps * tokens_per_step
            points.append(Point(budget, L, dim, heads, n, fpt, steps, D, fpt * D))
    return points


def run_sweep(cfg: SweepConfig, out: str | Path, progress: bool = True) -> list[dict]:
    """Train every point not yet finished, score the tasks, and (re)write ``out/points.jsonl``."""
    import herd
    from herd.checkpoint import read_args
    from herd.data.shards import TokenShards
    from herd.model import flops
    from herd.scaling.tasks import read_task, score_task
    from herd.train.metrics import read_metrics
    from herd.train.pretrain import pretrain

    out = Path(out)
    if not cfg.data.path:
        raise ConfigError("data.path is not set (a directory written by `herd data tokenize`)")
    shards = TokenShards.open(cfg.data.path)
    tasks = {Path(p.strip()).stem: read_task(p.strip()) for p in cfg.scaling.tasks.split(",") if p.strip()}
    points = plan(cfg, shards.manifest["vocab_size"])
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "sweep.toml", to_toml(cfg))
    print(f"{len(points)} points, {sum(p.C for p in points):.3g} FLOPs in all; the corpus has "
          f"{shards.manifest['n_tokens']:,} tokens")
    print(f"{'budget':>9} {'layers':>6} {'dim':>5} {'N':>11} {'steps':>7} {'D':>12} {'D/N':>7} {'C':>10}")
    for p in points:
        print(f"{p.budget:9.3g} {p.n_layers:6d} {p.dim:5d} {p.N:11,} {p.steps:7,} {p.D:12,} {p.D / p.N:7.1f} "
              f"{p.C:10.3g}")
        if p.D > shards.manifest["n_tokens"]:
            print(f"  warning: {p.name} trains on {p.D / shards.manifest['n_tokens']:.1f} epochs of the corpus: "
                  "repeated data bends the laws")
    if cfg.scaling.jobs < 1:
        raise ConfigError(f"scaling.jobs must be at least 1, got {cfg.scaling.jobs}")
    rows: dict[int, dict] = {}
    todo = []
    for i, p in enumerate(points):
        record_path = out / "runs" / p.name / "point.json"
        if record_path.exists():
            rows[i] = json.loads(record_path.read_text())
            print(f"[{i + 1}/{len(points)}] {p.name}: done already, loss {rows[i]['loss']:.4f}")
        else:
            todo.append(i)
    t0 = time.perf_counter()

    def finish(i: int, seconds: float) -> None:
        p, run_dir = points[i], out / "runs" / points[i].name
        val = [r["val_loss"] for r in read_metrics(run_dir) if r.get("val_loss") is not None]
        if not val:
            raise ConfigError(f"{run_dir}: no validation loss was logged (data.val_fraction and train.val_batches "
                              "must be > 0 for a sweep)")
        trained = flops.matmul_params(read_args(run_dir / "model"))
        if trained != p.N:  # the plan's shape must be the one the trainer built
            raise RuntimeError(f"{run_dir}: planned N = {p.N:,} but the trained model has {trained:,}")
        row = {"name": p.name, "N": p.N, "D": p.D, "C": p.C, "budget": p.budget, "loss": val[-1],
               "n_layers": p.n_layers, "dim": p.dim, "n_heads": p.n_heads, "steps": p.steps,
               "train_seconds": round(seconds, 1)}
        if tasks:
            model = herd.load_model(run_dir / "model").eval()
            tokenizer = herd.Tokenizer(run_dir / "model")
            for name, items in tasks.items():
                scores = score_task(model, tokenizer, items)
                row.update({f"nll/{name}": scores["nll"], f"acc/{name}": scores["acc"],
                            f"chance/{name}": scores["chance"]})
        atomic_write_json(run_dir / "point.json", row)
        rows[i] = row
        _write_points(out, [rows[k] for k in sorted(rows)])
        extra = "".join(f", {k} {v:.3f}" for k, v in row.items() if k.startswith(("nll/", "acc/")))
        print(f"[{i + 1}/{len(points)}] {p.name}: loss {row['loss']:.4f}{extra} ({row['train_seconds']:.0f} s; "
              f"sweep {time.perf_counter() - t0:.0f} s)", flush=True)

    configs = {}
    for i in todo:
        configs[i] = point_config(cfg, points[i])
        configs[i].log.progress = progress and configs[i].log.progress and cfg.scaling.jobs == 1
    if cfg.scaling.jobs == 1:
        for i in todo:
            t_point = time.perf_counter()
            pretrain(configs[i], out / "runs" / points[i].name)
            finish(i, time.perf_counter() - t_point)
    else:
        # Tiny models do not use two cores well; separate processes, one per point, do. Each is an ordinary
        # `herd pretrain` of the point's config, its output in the run directory's train.log.
        from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

        threads = max(1, (os.cpu_count() or 1) // cfg.scaling.jobs)
        with ThreadPoolExecutor(cfg.scaling.jobs) as pool:
            running = {pool.submit(_train_in_process, configs[i], out / "runs" / points[i].name, threads): i
                       for i in todo}
            while running:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    finish(running.pop(future), future.result())
    rows = [rows[k] for k in sorted(rows)]
    _write_points(out, rows)
    return rows


def _train_in_process(cfg: PretrainConfig, run_dir: Path, threads: int) -> float:
    """Train one point with ``python -m herd pretrain`` in a child process; its wall time in seconds."""
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "config.toml"  # the same file the trainer writes there
    atomic_write_text(config_path, to_toml(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t = time.perf_counter()
    with open(run_dir / "train.log", "ab") as log:
        done = subprocess.run([sys.executable, "-m", "herd", "pretrain", "--config", str(config_path),
                               "--run-dir", str(run_dir)], stdout=log, stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0:
        tail = (run_dir / "train.log").read_text(errors="replace").strip().splitlines()[-1:]
        raise UserError(f"{run_dir}: herd pretrain exited {done.returncode}: {tail[0] if tail else ''} "
                        f"(see {run_dir / 'train.log'})")
    return time.perf_counter() - t


def _write_points(out: Path, rows: list[dict]) -> None:
    atomic_write_text(out / "points.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
