"""AGIEval English prompts against the repository's own loader (ruixiangcui/AGIEval ``src/dataset_loader.py``,
setting ``few-shot``), re-derived here from its definition and applied to the real data files:

- ``combine_prompt``: the exemplars are the ``sample N`` rows of ``few_shot_prompts.csv`` read with pandas
  (``skiprows`` keeping rows 0, 1, 3, 5, 7, 9; ``keep_default_na=False``; empty cells skipped; sat-en's column and no
  passages for ``sat-en-without-passage``); each is ``"Problem i.   " + passage + " " + question + "\\n" +
  "Choose from the following options:    " + " ".join(options) + "\\n" + "The answer is therefore " + label + "\\n"``
  (the cloze exam: no passage, no options line, the ``answer``);
- ``concat_prompt``: ``"Here are the answers for the problems in the exam.\\n"`` then each exemplar followed by
  ``end_of_example`` (its default ``"\\n"``); herd keeps every exemplar (Meta's 3-5 shot), where the loader would
  also stop adding exemplars past ``max_tokens`` GPT-4 tokens (not reproducible offline: no tiktoken data);
- ``convert_few_shot``: the item as ``"Problem k+1.   " + passage + " " + question + "\\n" + options line``.

The loader's prompt ends there and the model writes "The answer is therefore X"; herd's base-model prompt is the
loader's prompt plus that cue, and the continuations are the letters. ``--chat`` equals the loader's chat mode
(``concat_prompt_chat_mode`` + ``convert_few_shot(chat_mode=True)``)."""

import ast
import functools
import json

import pytest

from herd.eval import metrics
from herd.eval.tasks import TaskOptions, build_task
from herd.eval.tasks.agieval import CLOZE, MULTIPLE_CHOICE

from .conftest import ROOT

DATA = ROOT.parent / "shared" / "benchmarks"
pytestmark = pytest.mark.skipif(not DATA.exists(), reason=f"benchmarks not found at {DATA}")
EXAMS = MULTIPLE_CHOICE + CLOZE


@functools.cache
def official_demos(exam: str) -> list[tuple[str, str]]:
    """(question_input, question_output) of each exemplar, as the loader's ``combine_prompt`` builds them."""
    import pandas as pd

    skip_passage = exam == "sat-en-without-passage"
    column = "sat-en" if skip_passage else exam
    table = pd.read_csv(DATA / "agieval" / "data" / "few_shot_prompts.csv", header=0,
                        skiprows=lambda x: x not in [0, 1, 3, 5, 7, 9], keep_default_na=False)
    demos = []
    for i, cell in enumerate(c for c in table[column] if c):
        con = ast.literal_eval(cell)
        passage = con["passage"] if con["passage"] is not None and not skip_passage else ""
        if exam in CLOZE:
            question_input = f"Problem {i + 1}.   " + con["question"] + "\n"
            answer = con["answer"] if con.get("answer") is not None else ""
        else:
            question_input = (f"Problem {i + 1}.   " + passage + " " + con["question"] + "\n"
                              + "Choose from the following options:    " + " ".join(con["options"]) + "\n")
            answer = con["label"] if con["label"] is not None else ""
        demos.append((question_input, f"The answer is therefore {answer}"))
    return demos


def official_item(exam: str, line: dict, n_shot: int) -> str:
    passage = line["passage"] if line["passage"] is not None else ""
    if exam in CLOZE:
        return f"Problem {n_shot + 1}.   " + line["question"] + "\n"
    return (f"Problem {n_shot + 1}.   " + passage + " " + line["question"] + "\n"
            + "Choose from the following options:    " + " ".join(line["options"]) + "\n")


def official_prompt(exam: str, line: dict) -> str:
    demos = official_demos(exam)
    text = "Here are the answers for the problems in the exam.\n"
    for question_input, question_output in demos:
        text += question_input + question_output + "\n" + "\n"
    return text + official_item(exam, line, len(demos))


def official_chat(exam: str, line: dict) -> list[dict]:
    demos = official_demos(exam)
    messages = []
    for question_input, question_output in demos:
        messages += [{"role": "user", "content": question_input}, {"role": "assistant", "content": question_output}]
    return messages + [{"role": "user", "content": official_item(exam, line, len(demos))}]


def rows(exam: str) -> list[dict]:
    path = DATA / "agieval" / "data" / "v1" / f"{exam}.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def base_task():
    return {it.id: it for it in build_task("agieval_en", DATA).items}


def test_base_prompts_are_the_loaders_few_shot_prompt_plus_the_answer_cue(base_task):
    counts = {}
    for exam in EXAMS:
        data = rows(exam)
        counts[exam] = len(data)
        for i in sorted({0, 1, 2, len(data) // 2, len(data) - 1}):
            item = base_task[f"{exam}/{i}"]
            assert item.prompt == official_prompt(exam, data[i]) + "The answer is therefore", (exam, i)
            if exam in CLOZE:
                assert item.continuations is None and item.gold == data[i]["answer"]
            else:
                assert item.continuations == [f" {c}" for c in "ABCDE"[: len(data[i]["options"])]]
                assert item.gold == data[i]["label"]
    assert counts == {"lsat-ar": 230, "lsat-lr": 510, "lsat-rc": 269, "logiqa-en": 651, "sat-math": 220,
                      "sat-en": 206, "sat-en-without-passage": 206, "aqua-rat": 254, "math": 1000}
    assert len(base_task) == 3546


def test_shot_counts_are_the_repositorys_exemplars():
    spec = build_task("agieval_en", DATA, TaskOptions(limit=1))
    assert spec.settings["shots"] == {"lsat-ar": 3, "lsat-lr": 3, "lsat-rc": 3, "logiqa-en": 3, "sat-math": 5,
                                      "sat-en": 3, "sat-en-without-passage": 3, "aqua-rat": 5, "math": 4}
    assert all(len(official_demos(e)) == k for e, k in spec.settings["shots"].items())
    fewer = build_task("agieval_en", DATA, TaskOptions(limit=1, num_fewshot=1))
    item = next(it for it in fewer.items if it.subset == "aqua-rat")
    assert "Problem 1." in item.prompt and "Problem 2." in item.prompt and "Problem 3." not in item.prompt


def test_chat_prompts_are_the_loaders_chat_mode():
    spec = build_task("agieval_en", DATA, TaskOptions(limit=2, chat=True))
    assert len(spec.items) == 2 * len(EXAMS)
    for item in spec.items:
        exam, i = item.id.split("/")
        assert item.prompt == official_chat(exam, rows(exam)[int(i)])
    # the reply is read as the exemplars answer
    mc = next(it for it in spec.items if it.subset == "lsat-ar")
    assert spec.score(mc, [f"The answer is therefore {mc.gold}"])["acc"] == 1.0
    assert spec.score(mc, ["The answer is therefore " + ("A" if mc.gold != "A" else "B")])["acc"] == 0.0
    cloze = next(it for it in spec.items if it.subset == "math")
    assert spec.score(cloze, [f"The answer is therefore {cloze.gold}\nmore"])["acc"] == 1.0


def test_cloze_answers_are_read_up_to_the_end_of_the_line_and_compared_by_equivalence(base_task):
    spec = build_task("agieval_en", DATA, TaskOptions(subsets=("math",), limit=2))
    for item in spec.items:
        assert spec.score(item, [f" {item.gold}\n\nProblem 6."])["acc"] == 1.0
        assert spec.score(item, [" 123456789\n"])["acc"] == 0.0
    assert metrics.math_equal("\\frac{26}{3}", "26/3")
