"""GSM8K test (1,319), Meta's setting: the 8-shot chain-of-thought prompt of Wei et al. (the fixed exemplars that
lm-eval's ``gsm8k_cot`` also uses), greedy, maj@1, up to 512 new tokens. ``exact_match`` reads the answer with the
strict "The answer is N." rule, ``exact_match_flexible`` with the last number in the completion; with several
samples per item, ``maj@n`` is a plurality vote over the n normalised strict answers, as lm-eval's
``majority_vote`` filter (``Counter.most_common``): an unreadable answer votes as "[invalid]", and a tie goes to the
answer that appears first in sample order."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from herd.eval import metrics
from herd.eval.tasks.base import (
    Generation,
    Item,
    TaskOptions,
    TaskSpec,
    few_shot_prompt,
    fields,
    read_jsonl,
    shots,
    take,
)

# Wei et al. 2022, Table 20 (GSM8K): the eight exemplars, verbatim.
EXEMPLARS = [
    ("There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, there "
     "will be 21 trees. How many trees did the grove workers plant today?",
     "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must have been "
     "21 - 15 = 6. The answer is 6."),
    ("If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
     "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5."),
    ("Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
     "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After eating 35, "
     "they had 74 - 35 = 39. The answer is 39."),
    ("Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops did "
     "Jason give to Denny?",
     "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = 8. "
     "The answer is 8."),
    ("Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he have "
     "now?",
     "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. 5 + 4 = 9. "
     "The answer is 9."),
    ("There were nine computers in the server room. Five more computers were installed each day, from monday to "
     "thursday. How many computers are now in the server room?",
     "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 computers "
     "were added. 9 + 20 is 29. The answer is 29."),
    ("Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many golf "
     "balls did he have at the end of wednesday?",
     "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 more, he "
     "had 35 - 2 = 33 golf balls. The answer is 33."),
    ("Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
     "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 dollars "
     "left. 23 - 15 is 8. The answer is 8."),
]
STOP = ("Q:", "</s>", "<|im_end|>")  # lm-eval gsm8k_cot


def load(data_dir: Path, split: str = "test") -> list[dict]:
    path = data_dir / "gsm8k" / ("test.jsonl" if split == "test" else "train.jsonl.gz")
    rows = read_jsonl(path)
    for i, row in enumerate(rows):
        fields(row, ("question", "answer"), f"{path}:{i + 1}")
    return rows


def build(data_dir: Path, options: TaskOptions) -> TaskSpec:
    k = shots(options, 8, len(EXEMPLARS), "gsm8k")
    items = []
    for i, row in enumerate(load(data_dir)):
        gold = metrics.gsm8k_gold(row["answer"])
        prompt = few_shot_prompt(EXEMPLARS[:k], row["question"], options.chat, "Q: {}", "\nA:")
        items.append(Item(str(i), prompt, gold))

    def score(item: Item, completions: list[str]) -> dict[str, float]:
        out = {"exact_match": float(metrics.gsm8k_correct(completions[0], item.gold, "strict")),
               "exact_match_flexible": float(metrics.gsm8k_correct(completions[0], item.gold, "flexible"))}
        if len(completions) > 1:
            votes = Counter(metrics.gsm8k_normalize(metrics.gsm8k_extract(c)) for c in completions)
            out[f"maj@{len(completions)}"] = float(votes.most_common(1)[0][0] == metrics.gsm8k_normalize(item.gold))
        return out

    return TaskSpec("gsm8k", take(items, options.limit), score,
                    {"shots": k, "prompt": "Wei et al. 8-shot CoT", "extraction": "strict 'The answer is N.'",
                     "max_new_tokens": 512},
                    Generation(max_new_tokens=512, stop=STOP if not options.chat else ()), headline="exact_match")
