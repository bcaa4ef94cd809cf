"""Agreement with lm-evaluation-harness (its HF backend) on the same tiny model and the same local data, where the
settings coincide: MMLU letter log-likelihood (5-shot from dev, first_n), ARC-Challenge as MMLU-style letters (25
shots from train, first_n), GSM8K 8-shot CoT strict match (lm-eval's own ``gsm8k_cot`` config), three AGIEval
English multiple-choice exams in the AGIEval loader's 3-5-shot layout (rendered by lm-eval from the data fields: the
prompt text is identical too), and BBH 3-shot CoT (lm-eval's own ``bbh_cot_fewshot`` configs; herd run with
lm-eval's trailing newline and "Q" stop). The per-item decisions must be identical, so the scores are identical; the
log-likelihoods agree to 1e-3 (herd computes the shared few-shot prefix once and the rest in a batch, lm-eval the
whole sequence: float32 rounding differs)."""

import json
from pathlib import Path

import pytest
import torch

import herd
from herd.eval.backends import LocalBackend
from herd.eval.harness import ProgressFile, run_task, score_records
from herd.eval.lm_eval_tasks import write_tasks
from herd.eval.tasks import TaskOptions, build_task

from .conftest import ROOT
from .test_eval_harness import tiny_model

DATA = ROOT.parent / "shared" / "benchmarks"
pytestmark = pytest.mark.slow
MMLU_SUBJECTS = ["abstract_algebra", "high_school_biology"]
AGIEVAL = ("lsat-ar", "sat-en-without-passage", "aqua-rat")  # a passage, the passage-less variant, 5 options
BBH = ("boolean_expressions", "date_understanding", "multistep_arithmetic_two", "word_sorting")
LIMIT = 4


@pytest.fixture(scope="module")
def model_dir(small_tokenizer, tmp_path_factory):
    if not DATA.exists():
        pytest.skip(f"benchmarks not found at {DATA}")
    tok, _ = small_tokenizer
    path = tmp_path_factory.mktemp("lmeval") / "tiny"
    model = tiny_model(tok.n_words)
    with torch.no_grad():  # special tokens get logit 0 (far below the top ~ +10): greedy text is plain text
        model.output.weight[sorted(tok.special_tokens.values())] = 0
    herd.save_model(model, path, tokenizer=tok)
    return path


@pytest.fixture(scope="module")
def lm_eval_run(model_dir, tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch_module.setenv("HF_HUB_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    tmp = tmp_path_factory.mktemp("lmeval_tasks")
    names = list(write_tasks(DATA, tmp, MMLU_SUBJECTS, gsm8k_max_tokens=24, agieval_exams=AGIEVAL,
                                    bbh_tasks=BBH, bbh_max_tokens=24).values())
    results = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(model_dir), "dtype": "float32", "add_bos_token": True,
                                "max_length": 4096},
        tasks=names, task_manager=TaskManager(include_path=str(tmp)), limit=LIMIT, log_samples=True,
        batch_size=1, device="cpu")
    return results


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def _herd_run(model_dir, task: str, tmp: Path, subsets=None, **spec_changes):
    backend = LocalBackend.from_dir(str(model_dir), batch_size=4)
    spec = build_task(task, DATA, TaskOptions(limit=LIMIT))
    if subsets is not None:
        spec.items = [it for it in spec.items if it.subset in subsets]
    for key, value in spec_changes.items():
        setattr(spec.generation, key, value)
    progress = ProgressFile(tmp / f"{task}.partial.jsonl", {"test": task})
    run_task(backend, spec, progress, seed=0, show_progress=False)
    responses = {i: r for (t, i), r in progress.done.items()}
    progress.close()
    _, records = score_records(spec, responses)
    return {r["id"]: r for r in records}


def test_mmlu_and_arc_letter_loglikelihoods_match_lm_eval(model_dir, lm_eval_run, tmp_path):
    herd_mmlu = _herd_run(model_dir, "mmlu", tmp_path, subsets=MMLU_SUBJECTS)
    herd_arc = _herd_run(model_dir, "arc_challenge", tmp_path)
    checked = 0
    for task, prefix, herd_records in ([(f"herd_mmlu_{s}", f"{s}/test/", herd_mmlu) for s in MMLU_SUBJECTS]
                                       + [("herd_arc_letters", None, herd_arc)]):
        samples = sorted(lm_eval_run["samples"][task], key=lambda s: s["doc_id"])
        assert len(samples) == LIMIT
        arc_ids = [json.loads(line)["id"] for line in (DATA / "arc_challenge" / "ARC-Challenge-Test.jsonl").open()]
        for s in samples:
            key = f"{prefix}{s['doc_id']}" if prefix else arc_ids[s["doc_id"]]
            theirs = [r[0][0] for r in s["resps"]]
            ours = herd_records[key]["response"]
            assert ours == pytest.approx(theirs, abs=1e-3)
            assert herd_records[key]["metrics"]["acc"] == s["acc"]  # the same decision
            checked += 1
    assert checked == LIMIT * 3
    for task, records in (("herd_arc_letters", herd_arc),):
        ours = sum(r["metrics"]["acc"] for r in records.values()) / len(records)
        assert ours == pytest.approx(lm_eval_run["results"][task]["acc,none"])


def test_agieval_prompts_and_letter_loglikelihoods_match_lm_eval(model_dir, lm_eval_run, tmp_path):
    herd_items = {it.id: it for it in build_task("agieval_en", DATA, TaskOptions(limit=LIMIT)).items}
    herd_records = _herd_run(model_dir, "agieval_en", tmp_path, subsets=AGIEVAL)
    for exam in AGIEVAL:
        samples = sorted(lm_eval_run["samples"][f"herd_agieval_{exam.replace('-', '_')}"], key=lambda s: s["doc_id"])
        assert len(samples) == LIMIT
        for s in samples:
            key = f"{exam}/{s['doc_id']}"
            assert {ctx for ctx, _ in s["arguments"]} == {herd_items[key].prompt}  # lm-eval rendered the same text
            assert [cont for _, cont in s["arguments"]] == herd_items[key].continuations
            assert herd_records[key]["response"] == pytest.approx([r[0][0] for r in s["resps"]], abs=1e-3)
            assert herd_records[key]["metrics"]["acc"] == s["acc"]


def _visible(text: str) -> str:
    return text.replace("\ufffd", "")


def test_gsm8k_strict_match_matches_lm_eval(model_dir, lm_eval_run, tmp_path):
    herd_gsm = _herd_run(model_dir, "gsm8k", tmp_path, max_new_tokens=24)
    samples = sorted((s for s in lm_eval_run["samples"]["herd_gsm8k_cot"] if s["filter"] == "strict-match"),
                     key=lambda s: s["doc_id"])
    assert len(samples) == LIMIT
    for s in samples:
        ours = herd_gsm[str(s["doc_id"])]
        # The same greedy completion, cut at the same stop (byte tokens that end mid-character are decoded as
        # U+FFFD by both, possibly a different number of times: compared without them).
        assert _visible(ours["response"][0]) == _visible(s["resps"][0][0])
        assert len(_visible(ours["response"][0])) > 5
        assert ours["metrics"]["exact_match"] == s["exact_match"]
    strict = lm_eval_run["results"]["herd_gsm8k_cot"]["exact_match,strict-match"]
    assert sum(r["metrics"]["exact_match"] for r in herd_gsm.values()) / LIMIT == pytest.approx(strict)


def test_bbh_cot_completions_and_decisions_match_lm_evals_own_bbh_cot_fewshot(model_dir, lm_eval_run, tmp_path):
    """lm-eval's ``bbh_cot_fewshot`` prompt is herd's (the data set's cot-prompts file) plus a newline after "Let's
    think step by step." (for sports_understanding its exemplars also differ; see test_eval_prompts.py), and it
    stops at any "Q": herd run with those two settings generates the same text and makes the same decisions."""
    backend = LocalBackend.from_dir(str(model_dir), batch_size=4)
    spec = build_task("bbh", DATA, TaskOptions(limit=LIMIT, subsets=BBH))
    for item in spec.items:
        item.prompt += "\n"
    spec.generation.stop, spec.generation.max_new_tokens = ("</s>", "Q", "\n\n"), 24
    progress = ProgressFile(tmp_path / "bbh.partial.jsonl", {"test": "bbh"})
    run_task(backend, spec, progress, seed=0, show_progress=False)
    responses = {i: r for (_, i), r in progress.done.items()}
    progress.close()
    _, records = score_records(spec, responses)
    ours = {r["id"]: r for r in records}
    prompts = {it.id: it.prompt for it in spec.items}
    for name in BBH:
        samples = sorted(lm_eval_run["samples"][f"herd_bbh_{name}"], key=lambda s: s["doc_id"])
        assert len(samples) == LIMIT
        for s in samples:
            key = f"{name}/{s['doc_id']}"
            assert s["arguments"][0][0] == prompts[key]
            assert _visible(ours[key]["response"][0]) == _visible(s["resps"][0][0])
            assert ours[key]["metrics"]["exact_match"] == s["exact_match"]
