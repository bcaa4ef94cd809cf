"""A synthetic task with checkable answers, for the CPU post-training demo and tests: integer addition.

A problem is the user turn ``"13+7="`` (the notation of the base model's corpus) with the answer ``"20"``; everything
is a function of ``seed``. This module
writes every file the post-training verbs read, and measures what they change:

- ``pretraining_text``: plain-text lines ``13+7=20`` (the base model's corpus: it learns the arithmetic, not chat);
- ``sft_dialogs``: ``{"messages": [user question, assistant answer]}`` (``herd sft``);
- ``preference_pairs``: TRL's conversational rows, ``chosen`` the right answer, ``rejected`` a plausible wrong one
  (off by one or ten, digits swapped: the mistakes a small model makes) (``herd dpo`` / ``herd reward``);
- ``prompts``: ``{"messages": [user question]}`` (``herd rejection-sample`` / ``herd ppo``);
- ``reward``: 1.0 for a response that is exactly the right number, else 0.0 (the verifiable reward for PPO);
- ``accuracy``: greedy answers from herd's engine on 200 fixed problems, checked.

    python -m herd.posttrain.demo data --out runs/post/data           # all the files above
    python -m herd.posttrain.demo eval --model runs/post/sft/model    # accuracy on the 200 evaluation problems
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from herd.io import atomic_write_text

MAX_OPERAND = 20  # operands in [0, MAX_OPERAND): 400 problems, answers below 40
EVAL_SEED = 10_000  # the evaluation problems' seed (training files use small seeds)
QUESTION = re.compile(r"^\s*(\d+)\+(\d+)=\s*$")


@dataclass(frozen=True)
class Problem:
    a: int
    b: int

    @property
    def question(self) -> str:
        return f"{self.a}+{self.b}="

    @property
    def answer(self) -> str:
        return str(self.a + self.b)

    def messages(self) -> list[dict]:
        return [{"role": "user", "content": self.question}]


def problems(n: int, seed: int) -> list[Problem]:
    rng = random.Random(seed)
    return [Problem(rng.randrange(MAX_OPERAND), rng.randrange(MAX_OPERAND)) for _ in range(n)]


def eval_problems(n: int = 200) -> list[Problem]:
    """The demo's fixed evaluation set (the same problems at every stage). The space is small (400 problems), so
    these are in-distribution problems the training files also contain: the demo measures what each stage teaches
    (the chat format, then preferring the right answer), not generalisation to unseen sums."""
    return problems(n, EVAL_SEED)


# --- checking -------------------------------------------------------------------------------------------------------
def parse_question(text: str) -> Problem | None:
    m = QUESTION.search(text)
    return Problem(int(m.group(1)), int(m.group(2))) if m else None


def is_correct(problem: Problem, response: str) -> bool:
    """Exactly the number, surrounding whitespace allowed (no partial credit for extra text)."""
    return response.strip() == problem.answer


def reward(prompt_messages: Sequence[dict], response: str) -> float:
    """The verifiable reward: 1.0 when ``response`` answers the last user question of ``prompt_messages``."""
    problem = parse_question(prompt_messages[-1]["content"])
    return float(problem is not None and is_correct(problem, response))


def wrong_answer(problem: Problem, rng: random.Random) -> str:
    """A plausible mistake: off by one or ten (a dropped carry), or the digits swapped."""
    right = problem.a + problem.b
    candidates = {right + 1, right - 1, right + 10, right - 10}
    if right >= 10:
        candidates.add(int(str(right)[::-1]))
    candidates = sorted(c for c in candidates if c >= 0 and c != right)
    return str(rng.choice(candidates))


# --- the files ----------------------------------------------------------------------------------------------------
def pretraining_text(n_docs: int, seed: int, per_doc: int = 32) -> Iterator[str]:
    """Documents of ``per_doc`` lines ``a+b=c``."""
    for doc in range(n_docs):
        yield "\n".join(f"{p.a}+{p.b}={p.answer}" for p in problems(per_doc, seed * 1_000_003 + doc))


def sft_dialogs(n: int, seed: int) -> Iterator[dict]:
    for p in problems(n, seed):
        yield {"messages": p.messages() + [{"role": "assistant", "content": p.answer}]}


def preference_pairs(n: int, seed: int) -> Iterator[dict]:
    rng = random.Random(seed + 1)
    for p in problems(n, seed):
        yield {"prompt": p.messages(), "chosen": [{"role": "assistant", "content": p.answer}],
               "rejected": [{"role": "assistant", "content": wrong_answer(p, rng)}]}


def on_policy_pairs(model, tokenizer, n: int, seed: int, temperature: float = 1.0) -> tuple[list[dict], int]:
    """Preference pairs whose rejected answer is the policy's own mistake where it makes one (sampled at
    ``temperature``; Llama 3 collects its DPO data from the latest models so that it stays close to on-policy), and a
    plausible wrong answer (``wrong_answer``) where the sample is right. Returns the rows and how many hold the
    policy's own mistake."""
    rng = random.Random(seed + 1)
    ps = problems(n, seed)
    samples = answers(model, tokenizer, ps, max_batch=256, temperature=temperature, seed=seed)
    rows, own = [], 0
    for p, text in zip(ps, samples):
        mistake = text.strip()
        own += bool(mistake) and not is_correct(p, mistake)
        rejected = mistake if mistake and not is_correct(p, mistake) else wrong_answer(p, rng)
        rows.append({"prompt": p.messages(), "chosen": [{"role": "assistant", "content": p.answer}],
                     "rejected": [{"role": "assistant", "content": rejected}]})
    return rows, own


def prompts(n: int, seed: int) -> Iterator[dict]:
    for p in problems(n, seed):
        yield {"messages": p.messages()}


def _write_jsonl(path: Path, rows) -> Path:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_demo_data(out: str | Path, n_pretrain_docs: int = 2000, n_sft: int = 4000, n_pairs: int = 2000,
                    n_prompts: int = 256) -> dict[str, Path]:
    """Every file of the demo under ``out``: pretrain.jsonl, sft.jsonl, pairs.jsonl, prompts.jsonl."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return {
        "pretrain": _write_jsonl(out / "pretrain.jsonl", ({"text": t} for t in pretraining_text(n_pretrain_docs, 1))),
        "sft": _write_jsonl(out / "sft.jsonl", sft_dialogs(n_sft, 2)),
        "pairs": _write_jsonl(out / "pairs.jsonl", preference_pairs(n_pairs, 3)),
        "prompts": _write_jsonl(out / "prompts.jsonl", prompts(n_prompts, 4)),
    }


# --- evaluation -----------------------------------------------------------------------------------------------------
def answers(model, tokenizer, problem_list: Sequence[Problem], max_new_tokens: int = 8, max_batch: int = 64,
            temperature: float = 0.0, seed: int = 0) -> list[str]:
    """Chat answers from herd's continuous-batching engine (stopping at the end-of-turn token): greedy, or sampled
    at ``temperature`` with seed ``seed + i`` for problem i."""
    from herd.inference.engine import Engine
    from herd.inference.sampling import SamplingParams
    from herd.tokenizer import ChatFormat

    chat = ChatFormat(tokenizer)
    ids = [chat.encode_dialog_prompt(p.messages()) for p in problem_list]
    engine = Engine(model, tokenizer, max_batch=min(max_batch, len(ids)),
                    max_len=max(len(i) for i in ids) + max_new_tokens + 1, max_waiting=len(ids))
    try:
        seqs = [engine.submit(x, SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed + i,
                                                stop_ids=tuple(tokenizer.stop_tokens)))
                for i, x in enumerate(ids)]
        engine.run()
    finally:
        engine.close()
    return [s.text for s in seqs]


def accuracy(model, tokenizer, problem_list: Sequence[Problem] | None = None) -> float:
    """Fraction of ``problem_list`` (default: the 200 evaluation problems) answered exactly right, greedily."""
    problem_list = list(problem_list) if problem_list is not None else eval_problems()
    outs = answers(model, tokenizer, problem_list)
    return sum(is_correct(p, o) for p, o in zip(problem_list, outs)) / len(problem_list)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m herd.posttrain.demo", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("data", help="write pretrain.jsonl, sft.jsonl, pairs.jsonl, prompts.jsonl")
    s.add_argument("--out", required=True)
    s = sub.add_parser("pairs", help="preference pairs with the policy's own mistakes as the rejected answers")
    s.add_argument("--policy", required=True, help="model directory (e.g. the SFT model)")
    s.add_argument("--out", required=True)
    s.add_argument("--n", type=int, default=2000)
    s.add_argument("--seed", type=int, default=3)
    s = sub.add_parser("eval", help="accuracy of a model directory on the evaluation problems")
    s.add_argument("--model", required=True)
    s.add_argument("--n", type=int, default=200)
    a = p.parse_args(argv)
    if a.cmd == "data":
        for name, path in write_demo_data(a.out).items():
            print(f"{name}: {path}")
        return
    import torch

    import herd

    if a.cmd == "pairs":
        model = herd.load_model(a.policy, dtype=torch.float32).eval()
        rows, own = on_policy_pairs(model, herd.Tokenizer(a.policy), a.n, a.seed)
        _write_jsonl(Path(a.out), rows)
        print(f"wrote {len(rows)} pairs to {a.out} ({own} with the policy's own mistake as rejected)")
    else:
        model = herd.load_model(a.model, dtype=torch.float32).eval()
        acc = accuracy(model, herd.Tokenizer(a.model), eval_problems(a.n))
        print(f"accuracy: {acc:.3f} on {a.n} problems ({a.model})")


if __name__ == "__main__":
    main()
