"""``herd scaling sweep``: the plan (shapes, tokens from the FLOPs count), ordinary run directories, skip on rerun,
task scoring by log-likelihood, and the fit on the sweep's own points."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch

pytest.importorskip("scipy")

from herd.cli import main  # noqa: E402
from herd.config import load_config  # noqa: E402
from herd.data.shards import tokenize_to_shards  # noqa: E402
from herd.model import flops  # noqa: E402
from herd.model.args import ModelArgs  # noqa: E402
from herd.scaling.sweep import load_sweep_config, plan  # noqa: E402
from herd.scaling.tasks import choice_nlls, cloze_task, score_task  # noqa: E402

from .corpus import MULTILINGUAL  # noqa: E402
from .helpers import random_model  # noqa: E402

SWEEP_TOML = """
[model]
preset = "tiny"
multiple_of = 16

[data]
path = "{shards}"
seq_len = 32
batch_size = 4
val_fraction = 0.1

[train]
lr = 3e-3
device = "cpu"
dtype = "fp32"
val_batches = 2
peak_flops = 1e11  # the MFU denominator: given, so no run spends seconds measuring the CPU

[log]
progress = false
tensorboard = false

[scaling]
budgets = "8e8,1.6e9,3.2e9"
depths = "1,2,3"
aspect_ratio = 16
head_dim = 16
sizes = 3
min_steps = 4
tasks = "{task}"
"""


@pytest.fixture(scope="module")
def sweep_inputs(tmp_path_factory, small_tokenizer):
    _, tok_dir = small_tokenizer
    d = tmp_path_factory.mktemp("sweep")
    rng = random.Random(0)
    docs = [" ".join(rng.choice(MULTILINGUAL) for _ in range(rng.randint(1, 6))) for _ in range(150)]
    (d / "docs.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in docs), encoding="utf-8")
    tokenize_to_shards([d / "docs.jsonl"], tok_dir, d / "shards", workers=1, progress=False)
    items = cloze_task(["\n".join(MULTILINGUAL * 2)], n_items=8, n_choices=4)
    (d / "cloze.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    config = d / "sweep.toml"
    config.write_text(SWEEP_TOML.format(shards=d / "shards", task=d / "cloze.jsonl"))
    return d, config


def test_plan_counts_tokens_with_herds_flops(sweep_inputs):
    _, config = sweep_inputs
    cfg = load_sweep_config(config)
    points = plan(cfg, vocab_size=1256)
    assert len(points) == 9 and sorted({p.budget for p in points}) == [8e8, 1.6e9, 3.2e9]
    for p in points:
        args = ModelArgs.from_name("tiny", dim=16 * p.n_layers, n_layers=p.n_layers, n_heads=p.n_layers,
                                   n_kv_heads=p.n_layers, vocab_size=1256, multiple_of=16)
        assert p.N == flops.matmul_params(args)
        assert p.flops_per_token == flops.train_flops_per_token(args, 32)  # 6N + attention, at seq_len 32
        assert p.D == p.steps * 4 * 32 and p.C == pytest.approx(p.flops_per_token * p.D)
        assert abs(p.C / p.budget - 1) < 0.5 / p.steps + 1e-9  # whole steps: within half a step of the budget


@pytest.mark.parametrize("args, message", [
    (["--budgets", "1e9,2e9"], "scaling.budgets has 2 budget(s); the power laws need at least 3"),
    (["--sizes", "2"], "scaling.sizes = 2: a parabola per budget needs at least 3 sizes"),
    (["--budgets", "1e5,2e5,4e5"], "raise the budget or lower data.batch_size"),
    (["--budgets", "1e9,x,3e9"], "scaling.budgets: expected comma-separated numbers"),
])
def test_sweep_rejects_bad_plans_before_training(sweep_inputs, tmp_path, capsys, args, message):
    _, config = sweep_inputs
    assert main(["scaling", "sweep", "--config", str(config), "--out", str(tmp_path / "s"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "s" / "runs").exists()


@pytest.mark.slow
def test_sweep_trains_scores_skips_and_fits(sweep_inputs, tmp_path, capsys):
    _, config = sweep_inputs
    out = tmp_path / "sweep"
    assert main(["scaling", "sweep", "--config", str(config), "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "points.jsonl").read_text().splitlines()]
    assert len(rows) == 9
    for row in rows:
        for key in ("N", "D", "C", "budget", "loss", "nll/cloze", "acc/cloze", "chance/cloze"):
            assert key in row, key
        assert row["chance/cloze"] == 0.25 and 0 <= row["acc/cloze"] <= 1 and row["nll/cloze"] > 0
        run = out / "runs" / row["name"]
        cfg = load_config(run / "config.toml")  # an ordinary run directory: its config loads as a pretraining one
        assert cfg.model.n_layers == row["n_layers"] and cfg.train.steps == row["steps"]
        assert (run / "model" / "config.json").exists()
    # The losses are real: every model beat the uniform distribution over the vocabulary (ln 1256 = 7.1).
    assert max(r["loss"] for r in rows) < 7.0

    # Rerun: every point is skipped, nothing retrains.
    stamps = {r["name"]: (out / "runs" / r["name"] / "metrics.jsonl").stat().st_mtime_ns for r in rows}
    capsys.readouterr()
    assert main(["scaling", "sweep", "--config", str(config), "--out", str(out)]) == 0
    assert capsys.readouterr().out.count("done already") == 9
    assert stamps == {r["name"]: (out / "runs" / r["name"] / "metrics.jsonl").stat().st_mtime_ns for r in rows}
    # A point whose record is lost (killed after training) is recovered from its finished run, same loss.
    (out / "runs" / rows[0]["name"] / "point.json").unlink()
    assert main(["scaling", "sweep", "--config", str(config), "--out", str(out)]) == 0
    again = [json.loads(line) for line in (out / "points.jsonl").read_text().splitlines()]
    assert {r["name"]: r["loss"] for r in again} == {r["name"]: r["loss"] for r in rows}
    # Points retrained two at a time in `herd pretrain` child processes (scaling.jobs=2) give the same points.
    # Tolerance: the children run one torch thread where this process runs two, so reductions sum in another order.
    for row in rows[:2]:
        shutil.rmtree(out / "runs" / row["name"])
    assert main(["scaling", "sweep", "--config", str(config), "--out", str(out), "--scaling.jobs=2"]) == 0
    parallel = [json.loads(line) for line in (out / "points.jsonl").read_text().splitlines()]
    assert [r["name"] for r in parallel] == [r["name"] for r in rows]
    for got, want in zip(parallel, rows):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-3), got["name"]
    assert (out / "runs" / rows[0]["name"] / "train.log").exists()

    assert main(["scaling", "fit", str(out), "--bootstrap", "20"]) == 0
    fit = json.loads((out / "fit.json").read_text())
    assert len(fit["isoflop"]["budgets"]) == 3 and "cloze" in fit["downstream"]
    assert (out / "isoflop.png").exists() and (out / "downstream.png").exists()


def test_choice_scores_match_one_sequence_at_a_time(small_tokenizer):
    """The batched, right-padded scorer against a plain per-sequence sum of log-probabilities."""
    tok, _ = small_tokenizer
    model = random_model(vocab_size=tok.n_words, max_seq_len=1024)
    items = cloze_task(["\n".join(MULTILINGUAL * 2)], n_items=5, n_choices=3)
    assert max(len(tok.encode(i["context"] + c)) for i in items for c in i["choices"]) < 1000  # nothing truncated
    batched = choice_nlls(model, tok, items, batch_size=4)
    for item, nlls in zip(items, batched):
        context = tok.encode(item["context"], bos=True)
        for choice, got in zip(item["choices"], nlls):
            cont = tok.encode(choice)
            ids = torch.tensor([context + cont])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).float(), -1)[0]
            want = -sum(logp[len(context) + i - 1, t].item() for i, t in enumerate(cont))
            assert got == pytest.approx(want, rel=1e-4, abs=1e-4)
    scores = score_task(model, tok, items)
    per_char = [[n / len(c) for n, c in zip(nlls, it["choices"])] for it, nlls in zip(items, batched)]
    assert scores["acc"] == sum(min(range(3), key=pc.__getitem__) == it["answer"]
                                for pc, it in zip(per_char, items)) / 5
    assert scores["nll"] == pytest.approx(sum(pc[it["answer"]] for pc, it in zip(per_char, items)) / 5)
    assert scores["chance"] == pytest.approx(1 / 3)
