"""AGIEval English (ruixiangcui/AGIEval v1 = v1.1 English): nine exams, few-shot with the repository's own prompts
(``few_shot_prompts.csv``, 3-5 exemplars per exam), in the layout of the repository's loader
(``src/dataset_loader.py``, setting ``few-shot``: ``combine_prompt`` without explanations, ``concat_prompt`` with
``end_of_example="\\n"``, ``convert_few_shot``)::

    Here are the answers for the problems in the exam.
    Problem 1.   <passage> <question>
    Choose from the following options:    (A)... (B)...
    The answer is therefore A
    <blank line>
    ...
    Problem k+1.   <passage> <question>
    Choose from the following options:    (A)... (B)...
    The answer is therefore

The loader's prompt ends after the options line and the model writes "The answer is therefore X"; herd appends that
cue (the one every exemplar ends with) so a base model is scored by the likelihood of the letter after it, `` A``,
`` B``... (Meta's letter scoring). The loader also drops exemplars that would take the prompt past 2,048 GPT-4
tokens; herd keeps them all (Meta: "3-5 shot").
The cloze exam ``math`` generates the answer up to the end of the line and compares it by mathematical
equivalence. ``sat-en-without-passage`` uses sat-en's exemplars without their passages, as the loader does.
``--chat`` follows the loader's chat mode: each exemplar a user turn (the problem, without the cue) and an assistant
turn ("The answer is therefore X"), then the problem as the last user turn; the letter (or the cloze answer) is read
from the reply. Reported: accuracy averaged over the exams (``acc``), and over items (``acc_micro``).
"""

from __future__ import annotations

import ast
from pathlib import Path

from herd.data.readers import DataError
from herd.eval import metrics
from herd.eval.tasks.base import (
    Generation,
    Item,
    Question,
    TaskOptions,
    TaskSpec,
    choice_task,
    read_csv_rows,
    read_jsonl,
    take,
)

MULTIPLE_CHOICE = ["lsat-ar", "lsat-lr", "lsat-rc", "logiqa-en", "sat-math", "sat-en", "sat-en-without-passage",
                   "aqua-rat"]
CLOZE = ["math"]
HEADER = "Here are the answers for the problems in the exam.\n"
CUE = "The answer is therefore"


def problem(number: int, row: dict, with_passage: bool = True) -> str:
    """The loader's ``question_input``: the numbered problem (and options), ending with a newline."""
    if row.get("options"):
        passage = (row.get("passage") or "") if with_passage else ""
        return (f"Problem {number}.   {passage} {row['question']}\n"
                f"Choose from the following options:    {' '.join(row['options'])}\n")
    return f"Problem {number}.   {row['question']}\n"


def answer_of(row: dict) -> str:
    return str(row["label"] if row.get("options") else row["answer"])


def exemplars(data_dir: Path, exam: str) -> list[dict]:
    """The exam's few-shot rows of ``few_shot_prompts.csv`` (``sample 1``..``sample 5``, non-empty cells)."""
    path = data_dir / "agieval" / "data" / "few_shot_prompts.csv"
    rows = read_csv_rows(path)
    column = "sat-en" if exam == "sat-en-without-passage" else exam
    if column not in rows[0]:
        raise DataError(f"{path}: no column {column!r}")
    j = rows[0].index(column)
    out = []
    for row in rows[1:]:
        if row[0].startswith("sample") and j < len(row) and row[j].strip():
            try:
                out.append(ast.literal_eval(row[j]))
            except (ValueError, SyntaxError) as e:
                raise DataError(f"{path}: {row[0]}, column {column}: not a Python literal ({e})") from None
    return out


def _chat_messages(demos: list[dict], row: dict, keep_passage: bool) -> list[dict]:
    messages: list[dict] = []
    for i, d in enumerate(demos):
        messages += [{"role": "user", "content": problem(i + 1, d, keep_passage)},
                     {"role": "assistant", "content": f"{CUE} {answer_of(d)}"}]
    return messages + [{"role": "user", "content": problem(len(demos) + 1, row)}]


def build(data_dir: Path, options: TaskOptions) -> TaskSpec:
    questions, shots_by_exam, items, shot_counts = [], {}, [], {}
    for exam in MULTIPLE_CHOICE + CLOZE:
        path = data_dir / "agieval" / "data" / "v1" / f"{exam}.jsonl"
        rows = read_jsonl(path)
        demos = exemplars(data_dir, exam)
        k = len(demos) if options.num_fewshot is None else min(options.num_fewshot, len(demos))
        demos, keep_passage = demos[:k], exam != "sat-en-without-passage"
        shot_counts[exam] = k
        for i, row in enumerate(rows):
            if exam in MULTIPLE_CHOICE and (not row.get("options") or row.get("label") not in list("ABCDE")):
                raise DataError(f"{path}:{i + 1}: no options/label")
            if options.chat:
                items.append(Item(f"{exam}/{i}", _chat_messages(demos, row, keep_passage), answer_of(row), None,
                                  exam))
            elif exam in CLOZE:
                shots_text = "".join(f"{problem(j + 1, d)}{CUE} {d['answer']}\n\n" for j, d in enumerate(demos))
                items.append(Item(f"{exam}/{i}", HEADER + shots_text + problem(k + 1, row) + CUE, str(row["answer"]),
                                  None, exam))
            else:
                questions.append(Question(f"{exam}/{i}", problem(k + 1, row) + CUE, len(row["options"]),
                                          row["label"], exam))
        if not options.chat and exam in MULTIPLE_CHOICE:
            shots_by_exam[exam] = [Question(f"{exam}/shot{j}", problem(j + 1, d, keep_passage) + CUE,
                                            len(d["options"]), d["label"], exam) for j, d in enumerate(demos)]
    settings = {"shots": shot_counts, "shot_source": "AGIEval few_shot_prompts.csv",
                "prompt": "AGIEval loader few-shot layout", "average": "macro over exams (acc)"}
    spec = choice_task("agieval_en", take(questions, options.limit), shots_by_exam, options, settings,
                       header=lambda exam: HEADER)
    choice_score = spec.score

    def score(item: Item, response) -> dict[str, float]:
        if item.subset in CLOZE:
            answer = response[0].split(CUE)[-1].strip().split("\n")[0].strip()
            return {"acc": float(metrics.math_equal(answer, item.gold))}
        if options.chat:
            return {"acc": float(metrics.extract_letter(response[0], "ABCDE") == item.gold)}
        return choice_score(item, response)

    spec.items += take(items, options.limit)
    spec.score = score
    if options.chat:
        spec.settings["answer"] = "generated (chat, the loader's chat mode)"
    spec.generation = Generation(max_new_tokens=512, stop=()) if options.chat else Generation(64, stop=("\n",))
    return spec
