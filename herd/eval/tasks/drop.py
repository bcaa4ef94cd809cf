"""DROP, Meta's setting: 3 shots drawn at random for every item, F1 (headline) and EM of the official evaluator
(metrics.py). Two input formats are read from ``DATA_DIR/drop/``:

- the official release (``drop_dataset_dev.json``, and ``drop_dataset_train.json`` for the shots, Meta's setting);
- OpenAI simple-evals' ``drop_v0_dev.jsonl.gz`` (``context`` = "Passage: ...\\nQuestion: ...\\nAnswer:", gold
  answers joined by "|"); with no train split next to it, the shots are drawn from dev items about *other*
  passages, and the result says ``"shots_from": "dev (other passages) - deviates from Meta (train)"``.

The prompt is the three shots as "Passage: ...\\nQuestion: ...\\nAnswer: <answer>" blocks, then the item's; the
answer is generated up to the end of the line.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

from herd.data.readers import DataError
from herd.eval import metrics
from herd.eval.tasks.base import Generation, Item, TaskOptions, TaskSpec, fields, read_jsonl, require, take


def _official_answer(answer: dict) -> tuple[str, ...]:
    """An official answer object as a tuple of spans (number, or spans, or the date's parts), as lm-eval does."""
    if answer.get("number"):
        return (str(answer["number"]),)
    if answer.get("spans"):
        return tuple(answer["spans"])
    date = answer.get("date") or {}
    return (" ".join(str(date.get(k, "")) for k in ("day", "month", "year")).strip(),)


def read_official(path: Path) -> list[dict]:
    """Records ``{context, passage, answers}`` from an official DROP JSON file."""
    try:
        data = json.loads(require(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg})") from None
    out = []
    for pid, entry in data.items():
        for qa in entry["qa_pairs"]:
            answers = []
            for a in [qa["answer"]] + qa.get("validated_answers", []):
                spans = _official_answer(a)
                if spans not in answers:
                    answers.append(spans)
            out.append({"id": qa["query_id"], "passage": pid,
                        "context": f"Passage: {entry['passage']}\nQuestion: {qa['question']}\nAnswer:",
                        "answers": answers})
    return out


def read_simple_evals(path: Path) -> list[dict]:
    out = []
    for i, row in enumerate(read_jsonl(path)):
        fields(row, ("context", "ref_text"), f"{path}:{i + 1}")
        out.append({"id": str(i), "passage": row["context"].split("\nQuestion:")[0], "context": row["context"],
                    "answers": [(a,) for a in row["ref_text"].split("|")]})
    return out


def build(data_dir: Path, options: TaskOptions) -> TaskSpec:
    folder = data_dir / "drop"
    k = 3 if options.num_fewshot is None else options.num_fewshot
    if (folder / "drop_dataset_dev.json").exists():
        dev, fmt = read_official(folder / "drop_dataset_dev.json"), "official"
    else:
        dev, fmt = read_simple_evals(folder / "drop_v0_dev.jsonl.gz"), "simple-evals"
    if (folder / "drop_dataset_train.json").exists():
        pool, shots_from = read_official(folder / "drop_dataset_train.json"), "train (Meta's setting)"
    else:
        pool, shots_from = dev, "dev (other passages) - deviates from Meta (train)"
    per_passage = Counter(c["passage"] for c in pool)
    items = []
    for row in take([Item(r["id"], r["context"], r) for r in dev], options.limit):
        r = row.gold
        if len(pool) - per_passage[r["passage"]] < k:
            raise DataError(f"{folder}: {k} shots needed for question {r['id']}, but only "
                            f"{len(pool) - per_passage[r['passage']]} questions about other passages to draw from")
        rng = random.Random(f"{options.seed}-{r['id']}")
        picked: list[dict] = []
        while len(picked) < k:  # rejection sampling: shots about other passages, no repeats
            cand = pool[rng.randrange(len(pool))]
            if cand["passage"] != r["passage"] and cand not in picked:
                picked.append(cand)
        shots_text = "".join(f"{s['context']} {s['answers'][0][0]}\n\n" for s in picked)
        prompt = shots_text + r["context"]
        items.append(Item(r["id"], [{"role": "user", "content": prompt}] if options.chat else prompt,
                          [list(a) for a in r["answers"]]))

    def score(item: Item, completions: list[str]) -> dict[str, float]:
        em, f1 = metrics.drop_score(completions[0].strip(), item.gold)
        return {"f1": f1, "em": em}

    return TaskSpec("drop", items, score,
                    {"shots": k, "shots_from": shots_from, "data_format": fmt, "metric": "official DROP F1/EM"},
                    Generation(max_new_tokens=64, stop=("\n",) if not options.chat else ()), headline="f1")
