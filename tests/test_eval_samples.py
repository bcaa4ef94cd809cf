"""Scoring several samples per item and the DROP official format, through ``herd eval score``:

- DROP: an official-format ``drop_dataset_dev.json`` (and ``drop_dataset_train.json`` for the shots) written here
  in the release's structure (passage, qa_pairs with query_id, answer {number, date, spans}, validated_answers);
  the golds, the shots (from train: Meta's setting) and EM/F1 as the official evaluator's ``evaluate_json`` defines
  them (``answer_json_to_strings``, max over the non-empty golds of ``get_metrics``; lm-eval's port of it), and
  lm-eval's own ``drop`` task functions (``get_answers``, ``process_results``) on the same questions.
- maj@k for GSM8K (lm-eval's ``majority_vote`` rule) and MATH (votes over equivalence classes), ties as documented.
- pass@k for HumanEval with n samples against 1 - C(n-c, k) / C(n, k) (Chen et al. 2021) computed here.
"""

import json
import math

import pytest

from herd.cli import main
from herd.eval import metrics
from herd.eval.tasks import TaskOptions, build_task
from herd.eval.tasks.math import majority

from .conftest import ROOT

DATA = ROOT.parent / "shared" / "benchmarks"
needs_data = pytest.mark.skipif(not DATA.exists(), reason=f"benchmarks not found at {DATA}")


def _qa(qid, question, answer, validated=()):
    blank = {"number": "", "date": {"day": "", "month": "", "year": ""}, "spans": []}
    return {"question": question, "query_id": qid, "answer": {**blank, **answer},
            "validated_answers": [{**blank, **v} for v in validated]}


DEV = {
    "nfl_1": {"passage": "The Patriots beat the Jets 24-17. Smith scored twice; Jones kicked a 32-yard field goal.",
              "qa_pairs": [
                  _qa("q1", "How many points did the Patriots score?", {"number": "24"}, [{"number": "24"}]),
                  _qa("q2", "Who scored?", {"spans": ["Smith", "Jones"]}, [{"spans": ["Jones", "Smith"]}]),
                  _qa("q3", "When was the game?", {"date": {"day": "", "month": "May", "year": "1990"}},
                      [{"date": {"day": "3", "month": "May", "year": "1990"}}])]},
    "history_2": {"passage": "In 1996 the treaty was signed by three nations.",
                  "qa_pairs": [_qa("q4", "Which year was the treaty signed?", {"spans": ["1996"]},
                                   [{"number": "1996"}, {"spans": [""]}])]},
}
TRAIN = {f"train_{i}": {"passage": f"Train passage {i}.",
                        "qa_pairs": [_qa(f"t{i}", f"Train question {i}?", {"spans": [f"answer {i}"]})]}
         for i in range(5)}


def official_answer_strings(answer: dict) -> tuple[str, ...]:
    """drop_eval.py ``answer_json_to_strings``."""
    if answer.get("number"):
        return (str(answer["number"]),)
    if answer.get("spans"):
        return tuple(answer["spans"])
    d = answer["date"]
    return (f"{d['day']} {d['month']} {d['year']}".strip(),)


def official_scores(prediction: str, qa: dict) -> tuple[float, float]:
    """drop_eval.py ``evaluate_json`` for one question: max EM and F1 over the non-empty golds."""
    from lm_eval.tasks.drop.utils import get_metrics  # lm-eval's port of the official get_metrics

    em, f1 = 0.0, 0.0
    for answer in [qa["answer"]] + qa["validated_answers"]:
        gold = official_answer_strings(answer)
        e, f = get_metrics(prediction, gold)
        if gold[0].strip() != "":
            em, f1 = max(em, e), max(f1, f)
    return em, f1


def test_drop_official_json_golds_shots_and_scores(tmp_path):
    (tmp_path / "drop").mkdir()
    (tmp_path / "drop" / "drop_dataset_dev.json").write_text(json.dumps(DEV))
    from herd.data.readers import DataError

    with pytest.raises(DataError, match="3 shots needed for question q1, but only 1 questions about other passages"):
        build_task("drop", tmp_path)  # no train file: shots from other dev passages, too few here
    spec = build_task("drop", tmp_path, TaskOptions(num_fewshot=1))
    assert spec.settings["data_format"] == "official"
    assert "deviates from Meta" in spec.settings["shots_from"]
    assert spec.items[0].prompt.startswith("Passage: In 1996")  # q1's one shot is about the other passage
    (tmp_path / "drop" / "drop_dataset_train.json").write_text(json.dumps(TRAIN))
    spec = build_task("drop", tmp_path)
    assert spec.settings["shots_from"] == "train (Meta's setting)" and spec.settings["shots"] == 3
    items = {it.id: it for it in spec.items}
    assert list(items) == ["q1", "q2", "q3", "q4"]
    assert items["q1"].gold == [["24"]]  # the validated answer repeats the answer: kept once
    assert items["q2"].gold == [["Smith", "Jones"], ["Jones", "Smith"]]
    assert items["q3"].gold == [["May 1990"], ["3 May 1990"]]
    assert items["q4"].gold == [["1996"], [""]]
    for item in items.values():  # three train shots, then the question
        blocks = item.prompt.split("\n\n")
        assert len(blocks) == 4 and all(b.startswith("Passage: Train passage ") for b in blocks[:3])
        assert blocks[3].endswith("\nAnswer:") and blocks[3].startswith("Passage: ")
    qas = {qa["query_id"]: qa for entry in DEV.values() for qa in entry["qa_pairs"]}
    predictions = ["24", "24 points", "twenty-four", "Smith", "Jones and Smith", "Smith, Jones", "May 1990",
                   "3 May 1990", "May", "1996", "the 1996", "", "1,996"]
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps({"id": qid, "completion": " " + p}) + "\n"
                               for p in predictions for qid in qas))
    from lm_eval.tasks.drop.utils import get_answers, process_results

    for qid, qa in qas.items():
        # lm-eval's drop task on the same question (EleutherAI/drop's columnar validated_answers)
        columns = {k: [v[k] for v in qa["validated_answers"]] for k in ("number", "date", "spans")}
        lm_doc = {"answers": get_answers({"answer": qa["answer"], "validated_answers": columns})}
        assert [list(a) for a in lm_doc["answers"]] == items[qid].gold
        for p in predictions:
            got = spec.score(items[qid], [" " + p])
            assert (got["em"], got["f1"]) == official_scores(p, qa), (qid, p)
            theirs = process_results(lm_doc, [p])
            assert (got["em"], got["f1"]) == (theirs["em"], theirs["f1"]), (qid, p)
    # `herd eval score` on the same files reads the official format too (first sample per item)
    out = tmp_path / "scored.json"
    one = tmp_path / "one.jsonl"
    one.write_text("".join(json.dumps({"id": q, "completion": p}) + "\n"
                           for q, p in (("q1", "24"), ("q2", "Smith"), ("q3", "May 1990"), ("q4", "1997"))))
    assert main(["eval", "score", "--task", "drop", "--samples", str(one), "--data-dir", str(tmp_path),
                 "--out", str(out)]) == 0
    res = json.loads(out.read_text())["results"]["drop"]
    want = [official_scores(p, qas[q]) for q, p in (("q1", "24"), ("q2", "Smith"), ("q3", "May 1990"),
                                                     ("q4", "1997"))]
    assert res["em"] == pytest.approx(sum(w[0] for w in want) / 4)
    assert res["f1"] == pytest.approx(sum(w[1] for w in want) / 4) and res["n"] == 4


def test_drop_official_json_errors_name_the_file(tmp_path):
    (tmp_path / "drop").mkdir()
    bad = tmp_path / "drop" / "drop_dataset_dev.json"
    bad.write_text("{not json")
    from herd.data.readers import DataError

    with pytest.raises(DataError, match="drop_dataset_dev.json: not valid JSON"):
        build_task("drop", tmp_path)


# --- maj@k --------------------------------------------------------------------------------------------------------
@needs_data
def test_gsm8k_maj_at_k_is_lm_evals_majority_vote_with_first_seen_ties(tmp_path):
    from lm_eval.filters.selection import MajorityVoteFilter

    spec = build_task("gsm8k", DATA, TaskOptions(limit=4))
    golds = [it.gold for it in spec.items]
    ans = lambda x: f"Some steps. The answer is {x}."  # noqa: E731
    per_item = [
        [ans(golds[0]), ans(7), ans(golds[0]), ans(8), ans(7)],  # 2-2-1 tie: the gold came first -> right
        [ans(7), ans(golds[1]), ans(golds[1]), ans(7), "no answer"],  # 2-2 tie: 7 came first -> wrong
        ["x", "y", "z", ans(golds[2]), ans(golds[2])],  # "[invalid]" has 3 votes -> wrong (lm-eval's rule)
        [ans(7), ans(f"{golds[3]}.0"), ans(golds[3]), ans(golds[3]), ans(9)],  # plurality -> right
    ]
    samples = tmp_path / "gsm.jsonl"
    samples.write_text("".join(json.dumps({"index": i, "completion": c}) + "\n"
                               for i, cs in enumerate(per_item) for c in cs))
    out = tmp_path / "scored.json"
    assert main(["eval", "score", "--task", "gsm8k", "--samples", str(samples), "--data-dir", str(DATA),
                 "--out", str(out)]) == 0
    res = json.loads(out.read_text())["results"]["gsm8k"]
    assert res["maj@5"] == pytest.approx(2 / 4)
    assert res["exact_match"] == pytest.approx(1 / 4)  # the first sample of each item
    votes = [[metrics.gsm8k_normalize(metrics.gsm8k_extract(c)) for c in cs] for cs in per_item]
    theirs = [v[0] for v in MajorityVoteFilter().apply(votes, [{}] * 4)]
    assert [float(t == metrics.gsm8k_normalize(g)) for t, g in zip(theirs, golds)] == [1.0, 0.0, 0.0, 1.0]


def test_math_majority_votes_over_equivalence_classes():
    inv = metrics.INVALID
    assert majority(["\\frac{1}{2}", "1/3", "0.5", "\\frac13", "\\dfrac{1}{2}"]) == "\\frac{1}{2}"  # 3 vs 2
    assert majority(["1/3", "\\frac{1}{2}", "0.5", "\\frac13"]) == "1/3"  # 2-2 tie: first class seen
    assert majority([inv, inv, inv, "2"]) == "2"  # unreadable answers do not vote
    assert majority([inv, inv]) == inv


@needs_data
def test_math_maj_at_k_through_eval_score(tmp_path):
    spec = build_task("math500", DATA, TaskOptions(limit=3))
    final = lambda x: f"Work.\nFinal Answer: The final answer is ${x}$. I hope it is correct."  # noqa: E731
    per_item = [[final("123456789"), final(it.gold), "no final answer", final(it.gold), final("123456789"),
                 final(it.gold)] for it in spec.items[:3]]  # 3 right vs 2 wrong: right
    per_item[1] = ["none", "none", "none", "none", final("123456789"), final(spec.items[1].gold)]  # 1-1: wrong first
    per_item[2] = ["none", "none", "none", "none", "none", final(spec.items[2].gold)]  # one readable answer: right
    samples = tmp_path / "math.jsonl"
    samples.write_text("".join(json.dumps({"id": it.id, "completion": c}) + "\n"
                               for it, cs in zip(spec.items, per_item) for c in cs))
    out = tmp_path / "scored.json"
    assert main(["eval", "score", "--task", "math500", "--samples", str(samples), "--data-dir", str(DATA),
                 "--out", str(out)]) == 0
    res = json.loads(out.read_text())["results"]["math500"]
    assert res["n"] == 3 and res["maj@6"] == pytest.approx(2 / 3) and res["exact_match"] == 0.0


# --- pass@k -------------------------------------------------------------------------------------------------------
@needs_data
def test_humaneval_pass_at_k_with_n_samples_is_the_papers_estimator(tmp_path):
    from herd.eval.tasks.humaneval import load

    problems = load(DATA)[:2]
    n, correct = 12, [3, 11]
    lines = []
    for p, c in zip(problems, correct):
        for j in range(n):
            lines.append({"task_id": p["task_id"],
                          "completion": p["canonical_solution"] if j < c else "    return None\n"})
    samples = tmp_path / "he.jsonl"
    samples.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "scored.json"
    assert main(["eval", "score", "--task", "humaneval", "--samples", str(samples), "--data-dir", str(DATA),
                 "--out", str(out)]) == 0
    res = json.loads(out.read_text())["results"]["humaneval"]

    def paper(n, c, k):  # Chen et al. 2021, eq. 1, per problem; averaged over problems
        return 1.0 - math.comb(n - c, k) / math.comb(n, k)

    for k in (1, 10):
        assert res[f"pass@{k}"] == pytest.approx(sum(paper(n, c, k) for c in correct) / 2, abs=1e-12)
    assert "pass@100" not in res  # k > n is not estimated


# --- a trained model, end to end ----------------------------------------------------------------------------------
@needs_data
@pytest.mark.slow
def test_herd_eval_scores_a_model_trained_with_herd_pretrain(tmp_path, small_tokenizer):
    """``herd pretrain`` (the CPU demo config, shrunk) writes run/model; ``herd eval --limit`` scores it on a
    log-likelihood task and a generation task, and the scores are the per-item records' means."""
    import random
    import subprocess
    import sys

    from herd.data.shards import tokenize_to_shards

    from .corpus import MULTILINGUAL

    _, tok_dir = small_tokenizer
    rng = random.Random(0)
    docs = [" ".join(rng.choice(MULTILINGUAL) for _ in range(rng.randint(1, 6))) for _ in range(100)]
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in docs), encoding="utf-8")
    tokenize_to_shards([tmp_path / "docs.jsonl"], tok_dir, tmp_path / "shards", workers=1, progress=False)
    run = tmp_path / "run"
    train = subprocess.run(
        [sys.executable, "-m", "herd", "pretrain", "--config", str(ROOT / "configs" / "tiny-cpu.toml"),
         "--run-dir", str(run), f"--data.path={tmp_path / 'shards'}", "--model.dim=64", "--model.n_layers=2",
         "--model.n_heads=4", "--model.n_kv_heads=2", "--data.seq_len=64", "--data.batch_size=4", "--train.steps=6",
         "--train.warmup_steps=2", "--train.val_interval=3", "--train.val_batches=1", "--checkpoint.interval=6",
         "--log.progress=false", "--log.tensorboard=false"], capture_output=True, text=True)
    assert train.returncode == 0, train.stderr[-2000:]
    assert (run / "model" / "config.json").exists()
    out, records = tmp_path / "results.json", tmp_path / "records.jsonl"
    assert main(["eval", "--model", str(run / "model"), "--tasks", "arc_challenge,gsm8k", "--data-dir", str(DATA),
                 "--limit", "3", "--num-fewshot", "2", "--max-new-tokens", "16", "--quiet", "--out", str(out),
                 "--samples-out", str(records)]) == 0
    res = json.loads(out.read_text())["results"]
    lines = [json.loads(x) for x in records.read_text().splitlines()]
    for task, metric in (("arc_challenge", "acc"), ("gsm8k", "exact_match")):
        mine = [r["metrics"][metric] for r in lines if r["task"] == task]
        assert res[task]["n"] == len(mine) == 3
        assert res[task][metric] == pytest.approx(sum(mine) / 3)
    arc = [r for r in lines if r["task"] == "arc_challenge"]
    assert all(len(r["response"]) >= 3 and all(x < 0 for x in r["response"]) for r in arc)  # log-probs of letters
