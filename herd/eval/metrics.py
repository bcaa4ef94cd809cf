"""Scoring functions, each as its reference defines it.

- ``pass_at_k``: the unbiased estimator of Chen et al. 2021 (openai/human-eval ``estimate_pass_at_k``).
- GSM8K: the gold is ``answer.split('####')[-1]``; a completion's answer is taken by lm-eval's ``gsm8k_cot``
  strict-match regex (``The answer is N.``, Wei et al.'s exemplars end that way) and, as a second figure, by its
  flexible-extract regex (the last number); both are compared after lm-eval's normalisation (drop ``,``, ``$``, a
  ``#### `` prefix, a trailing ``.``; case-insensitive).
- MATH: the gold is the last ``\\boxed{...}`` of the solution; the Minerva answer is the text after
  ``Final Answer: The final answer is`` (else the last ``\\boxed{}``); answers are compared for mathematical
  equivalence by math-verify (sympy underneath).
- DROP: EM and F1 of the official evaluator (allenai/allennlp-reading-comprehension ``drop_eval.py``): normalised
  bags of tokens per span, spans aligned one-to-one with the Hungarian algorithm, a pair scores 0 when the gold
  has numbers and none of them is predicted, F1 rounded to 2 decimals, the max over gold answers.
- BBH: exact match of the text after the last "the answer is", trailing period removed.
- Paired bootstrap confidence intervals for win rates (pairwise.py).
"""

from __future__ import annotations

import re
import string
import threading
from collections.abc import Sequence

import numpy as np


# --- pass@k -------------------------------------------------------------------------------------------------------
def pass_at_k(n: int, c: int, k: int) -> float:
    """1 - C(n-c, k) / C(n, k), computed as a running product (exact for large n); 1.0 when n - c < k."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


# --- GSM8K --------------------------------------------------------------------------------------------------------
GSM8K_STRICT = re.compile(r"The answer is (\-?[0-9\.\,]+).")  # lm-eval gsm8k_cot strict-match
GSM8K_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")  # lm-eval flexible-extract (last match)
GSM8K_GOLD = re.compile(r"#### (\-?[0-9\.\,]+)")  # openai/grade-school-math ANS_RE
INVALID = "[invalid]"


def gsm8k_gold(answer: str) -> str:
    """The final answer of a GSM8K ``answer`` field (lm-eval's ``answer.split('####')[-1].strip()``)."""
    if "####" not in answer:
        raise ValueError("GSM8K answer has no '####' line")
    return answer.split("####")[-1].strip()


def gsm8k_extract(completion: str, mode: str = "strict") -> str:
    """The answer in a completion: ``strict`` takes the first ``The answer is N``, ``flexible`` the last number."""
    if mode == "strict":
        m = GSM8K_STRICT.search(completion)
        return m.group(1) if m else INVALID
    matches = GSM8K_FLEXIBLE.findall(completion)
    if not matches:
        return INVALID
    groups = matches[-1]
    return next(g for g in groups if g) if any(groups) else INVALID


def gsm8k_normalize(answer: str) -> str:
    """lm-eval's ``exact_match`` preprocessing for gsm8k: regexes ``,``, ``\\$``, ``(?s).*#### ``, ``\\.$`` removed,
    lower-cased, stripped."""
    for pattern in (",", r"\$", r"(?s).*#### ", r"\.$"):
        answer = re.sub(pattern, "", answer)
    return answer.lower().strip()


def gsm8k_correct(completion: str, gold: str, mode: str = "strict") -> bool:
    return gsm8k_normalize(gsm8k_extract(completion, mode)) == gsm8k_normalize(gold)


# --- MATH ---------------------------------------------------------------------------------------------------------
def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, braces balanced; None if absent."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    if text.startswith("\\boxed ", start):  # "\boxed 5" (no braces)
        return text[start + len("\\boxed "):].split("$")[0].strip()
    brace = text.find("{", start)
    if brace < 0:
        return None
    depth = 0
    for i in range(brace, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[brace + 1: i]
    return None


MINERVA_ANSWER = re.compile(r"Final Answer: The final answer is(.*?)\. I hope it is correct\.", re.DOTALL)


def minerva_extract(completion: str) -> str:
    """The answer of a Minerva-format completion; the last ``\\boxed{}`` when the closing sentence is missing."""
    m = MINERVA_ANSWER.search(completion)
    if m:
        return m.group(1).strip()
    boxed = last_boxed(completion)
    return boxed if boxed is not None else INVALID


def _timeout() -> int | None:
    # math-verify's timeouts use SIGALRM, which only the main thread may set.
    return 5 if threading.current_thread() is threading.main_thread() else None


def math_parse(answer: str) -> list:
    """math-verify's parse of an answer (LaTeX, with or without $...$, or a plain expression); [] if unparseable."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    text = answer.strip()
    if not (text.startswith("$") or "\\boxed" in text):
        text = f"${text}$"
    return parse(text, extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
                 parsing_timeout=_timeout())


def math_equal(prediction: str, gold: str) -> bool:
    """Mathematical equivalence of two answers (LaTeX or plain), by math-verify; identical strings are equal."""
    if prediction == INVALID:
        return False
    if prediction.strip() == gold.strip():
        return True
    try:
        from math_verify import verify
    except ImportError:
        raise ImportError("MATH scoring needs math-verify: pip install 'herd[eval]'") from None
    gold_parsed, pred_parsed = math_parse(gold), math_parse(prediction)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=_timeout()))


# --- DROP (official evaluator) ------------------------------------------------------------------------------------
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _normalize_token(token: str) -> str:
    token = token.lower()
    if not _is_number(token):
        token = "".join(ch for ch in token if ch not in _PUNCTUATION)
    if _is_number(token):
        token = str(float(token))
    token = _ARTICLES.sub(" ", token)
    return " ".join(token.split())


def drop_normalize(text: str) -> str:
    parts = [_normalize_token(t) for t in re.split(" |-", text)]
    return " ".join(p for p in parts if p.strip()).strip()


def _bags(answer: str | Sequence[str]) -> tuple[list[str], list[set[str]]]:
    spans = [answer] if isinstance(answer, str) else list(answer)
    normalized = [drop_normalize(s) for s in spans]
    return normalized, [set(s.split()) for s in normalized]


def _bag_f1(predicted: set[str], gold: set[str]) -> float:
    common = len(gold & predicted)
    precision = 1.0 if not predicted else common / len(predicted)
    recall = 1.0 if not gold else common / len(gold)
    return 0.0 if precision == 0 and recall == 0 else 2 * precision * recall / (precision + recall)


def _numbers_match(gold: set[str], predicted: set[str]) -> bool:
    gold_numbers = {w for w in gold if _is_number(w)}
    return not gold_numbers or bool(gold_numbers & {w for w in predicted if _is_number(w)})


def drop_em_f1(predicted: str | Sequence[str], gold: str | Sequence[str]) -> tuple[float, float]:
    """(EM, F1) of one prediction against one gold answer (each a span or a list of spans)."""
    from scipy.optimize import linear_sum_assignment

    pred_spans, pred_bags = _bags(predicted)
    gold_spans, gold_bags = _bags(gold)
    em = float(set(pred_spans) == set(gold_spans) and len(pred_spans) == len(gold_spans))
    scores = np.zeros((len(gold_bags), len(pred_bags)))
    for g, gold_bag in enumerate(gold_bags):
        for p, pred_bag in enumerate(pred_bags):
            if _numbers_match(gold_bag, pred_bag):
                scores[g, p] = _bag_f1(pred_bag, gold_bag)
    rows, cols = linear_sum_assignment(-scores)
    best = np.zeros(max(len(gold_bags), len(pred_bags)))
    for r, c in zip(rows, cols):
        best[r] = max(best[r], scores[r, c])
    return em, round(float(np.mean(best)), 2)


def drop_score(predicted: str, golds: Sequence[str | Sequence[str]]) -> tuple[float, float]:
    """Max EM and max F1 over the accepted gold answers (as the official evaluator and lm-eval do); empty gold
    answers are skipped, as there."""
    pairs = [drop_em_f1(predicted, g) for g in golds if (g if isinstance(g, str) else g[0]).strip()]
    return max((p[0] for p in pairs), default=0.0), max((p[1] for p in pairs), default=0.0)


# --- BBH and letters ----------------------------------------------------------------------------------------------
def bbh_extract(completion: str) -> str:
    """The text after the last "the answer is" up to the end of its line, one trailing period removed."""
    idx = completion.rfind("the answer is ")
    if idx < 0:
        return completion.strip()
    answer = completion[idx + len("the answer is "):].split("\n")[0].strip()
    return answer[:-1] if answer.endswith(".") else answer


def extract_letter(completion: str, letters: str) -> str:
    """The chosen option of a generated multiple-choice answer: "answer is (X)" (or AGIEval's "answer is therefore
    X") if present, else the first letter standing alone."""
    m = re.search(rf"answer is:?\s*(?:therefore\s+)?\(?([{letters}])\b", completion, re.IGNORECASE)
    if m:
        return m.group(1).upper()
    m = re.search(rf"(?<![A-Za-z])\(?([{letters}])\)?(?![A-Za-z])", completion)
    return m.group(1) if m else INVALID


# --- bootstrap ----------------------------------------------------------------------------------------------------
def bootstrap_ci(values: np.ndarray, stat=np.mean, n: int = 2000, alpha: float = 0.05, seed: int = 0
                 ) -> tuple[float, float]:
    """Percentile bootstrap interval of ``stat`` over the rows of ``values``."""
    values = np.asarray(values)
    if len(values) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(n, len(values)))
    stats = np.array([stat(values[i]) for i in idx])
    return float(np.quantile(stats, alpha / 2)), float(np.quantile(stats, 1 - alpha / 2))
