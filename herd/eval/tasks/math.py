"""MATH test (5,000; or the MATH-500 subset as ``math500``), Meta's setting for Llama 3: the 4-shot Minerva prompt
(Lewkowycz et al.; the same four worked problems lm-eval's ``minerva_math`` uses), greedy, maj@1. The answer after
"Final Answer: The final answer is" (else the last \\boxed{}) is compared with the gold \\boxed{} answer by
mathematical equivalence (math-verify). With several samples, ``maj@n`` votes over classes of equivalent answers
(Minerva's majority voting: "1/2" and "\\frac{1}{2}" are one vote each for the same answer); unreadable answers do
not vote, and a tie goes to the class whose first member appears first in sample order."""

from __future__ import annotations

from pathlib import Path

from herd.data.readers import DataError
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

# Lewkowycz et al. 2022 (Minerva), appendix D.2: the four-shot prompt, verbatim.
EXEMPLARS = [
    ("Find the domain of the expression  $\\frac{\\sqrt{x-2}}{\\sqrt{5-x}}$.",
     "The expressions inside each square root must be non-negative. Therefore, $x-2 \\ge 0$, so $x\\ge2$, and "
     "$5 - x \\ge 0$, so $x \\le 5$. Also, the denominator cannot be equal to zero, so $5-x>0$, which gives $x<5$. "
     "Therefore, the domain of the expression is $\\boxed{[2,5)}$.\nFinal Answer: The final answer is $[2,5)$. "
     "I hope it is correct."),
    ("If $\\det \\mathbf{A} = 2$ and $\\det \\mathbf{B} = 12,$ then find $\\det (\\mathbf{A} \\mathbf{B}).$",
     "We have that $\\det (\\mathbf{A} \\mathbf{B}) = (\\det \\mathbf{A})(\\det \\mathbf{B}) = (2)(12) = "
     "\\boxed{24}.$\nFinal Answer: The final answer is $24$. I hope it is correct."),
    ("Terrell usually lifts two 20-pound weights 12 times. If he uses two 15-pound weights instead, how many times "
     "must Terrell lift them in order to lift the same total weight?",
     "If Terrell lifts two 20-pound weights 12 times, he lifts a total of $2\\cdot 12\\cdot20=480$ pounds of "
     "weight.  If he lifts two 15-pound weights instead for $n$ times, he will lift a total of $2\\cdot15\\cdot "
     "n=30n$ pounds of weight.  Equating this to 480 pounds, we can solve for $n$:\n\\begin{align*}\n30n&=480\\\\\n"
     "\\Rightarrow\\qquad n&=480/30=\\boxed{16}\n\\end{align*}\nFinal Answer: The final answer is $16$. I hope it "
     "is correct."),
    ("If the system of equations\n\n\\begin{align*}\n6x-4y&=a,\\\\\n6y-9x &=b.\n\\end{align*}has a solution "
     "$(x, y)$ where $x$ and $y$ are both nonzero,\nfind $\\frac{a}{b},$ assuming $b$ is nonzero.",
     "If we multiply the first equation by $-\\frac{3}{2}$, we obtain\n\n$$6y-9x=-\\frac{3}{2}a.$$Since we also "
     "know that $6y-9x=b$, we have\n\n$$-\\frac{3}{2}a=b\\Rightarrow\\frac{a}{b}=\\boxed{-\\frac{2}{3}}.$$\n"
     "Final Answer: The final answer is $-\\frac{2}{3}$. I hope it is correct."),
]


def majority(answers: list[str]) -> str:
    """The first answer of the largest class of equivalent answers (first-seen class on ties; INVALID if none)."""
    classes: list[list[str]] = []
    for answer in answers:
        if answer == metrics.INVALID:
            continue
        home = next((c for c in classes if metrics.math_equal(answer, c[0])), None)
        if home is None:
            classes.append([answer])
        else:
            home.append(answer)
    return max(classes, key=len)[0] if classes else metrics.INVALID  # max keeps the first of equal lengths


def load(data_dir: Path, subset: str = "math") -> list[dict]:
    path = data_dir / "math" / ("test.jsonl.gz" if subset == "math" else "math500_test.jsonl")
    rows = read_jsonl(path)
    for i, row in enumerate(rows):
        fields(row, ("problem", "solution", "unique_id"), f"{path}:{i + 1}")
        if metrics.last_boxed(row["solution"]) is None:
            raise DataError(f"{path}:{i + 1}: solution has no \\boxed{{}} answer")
    return rows


def build(data_dir: Path, options: TaskOptions, subset: str = "math") -> TaskSpec:
    k = shots(options, 4, len(EXEMPLARS), subset)
    items = []
    for row in load(data_dir, subset):
        gold = metrics.last_boxed(row["solution"])
        prompt = few_shot_prompt(EXEMPLARS[:k], row["problem"], options.chat, "Problem:\n{}", "\n\nSolution:")
        items.append(Item(row["unique_id"], prompt, gold, None, row["unique_id"].split("/")[1]))

    def score(item: Item, completions: list[str]) -> dict[str, float]:
        answers = [metrics.minerva_extract(c) for c in completions]
        out = {"exact_match": float(metrics.math_equal(answers[0], item.gold))}
        if len(completions) > 1:
            out[f"maj@{len(completions)}"] = float(metrics.math_equal(majority(answers), item.gold))
        return out

    return TaskSpec(subset, take(items, options.limit), score,
                    {"shots": k, "prompt": "Minerva 4-shot", "equivalence": "math-verify", "max_new_tokens": 512},
                    Generation(max_new_tokens=512, stop=("Problem:",) if not options.chat else ()),
                    headline="exact_match", macro=False)
