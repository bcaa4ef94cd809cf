"""Model-based quality (and code / math / domain) classification, the Llama 3 way (§3.1.1):

1. ``label``: a chat model grades a sample of documents against a written rubric (yes/no), as Meta had Llama 2 do;
   the model is a herd/HF model directory run by herd's engine, or any OpenAI-compatible endpoint.
2. ``train_classifier``: a fast fastText-style classifier on those labels: hashed word unigrams + bigrams
   (2^20 features, scikit-learn's HashingVectorizer) and a logistic regression; held-out accuracy and AUC reported.
   The model is two plain files (classifier.json, weights.npz): no pickle.
3. ``QualityScorer``: the ``quality`` stage scores every document (``quality`` field), and drops those under
   ``min_score``. The same classifier type tags domains for the mix (mix.py): ``label --labels general,math,code``
   (with the built-in domain rubric) then ``train-classifier`` gives the ``[domain] model``.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from herd.data.readers import DataError
from herd.data.stage import save_npz
from herd.io import atomic_write_json

RUBRIC = """You are judging web documents for training a language model. A document meets the bar if it is
well-formed, informative prose or code that a careful reader would learn from (the kind of page Wikipedia could cite):
coherent, factual, not spam, not navigation menus or boilerplate, not a list of keywords, not adult content.
Answer with one word: yes or no."""

YES_NO = ("yes", "no")
DOMAIN_RUBRIC = """You are sorting web documents by domain for a language-model pretraining mix (Llama 3 §3.1.2).
Name the one domain the document belongs to:
- general: general knowledge, news, stories, reference and everyday prose;
- math: mathematics, proofs, equations, quantitative or step-by-step reasoning;
- code: source code, programming documentation, shell sessions, configuration files.
Answer with one word: {labels}."""


@dataclass
class QualityConfig:
    enabled: bool = False  # needs a classifier (`herd data train-classifier`)
    model: str = ""  # a directory written by `herd data train-classifier`
    field: str = "quality"  # metadata field for the score (probability of the positive label)
    min_score: float = 0.0  # remove documents scoring below this (0: keep all, score only)


# --- the classifier ---------------------------------------------------------------------------------------------
class TextClassifier:
    """Hashed n-gram features + a linear model: ``predict_proba(texts) -> [n, n_labels]``."""

    def __init__(self, labels: list[str], coef: np.ndarray, intercept: np.ndarray, n_features: int = 1 << 20,
                 ngrams: int = 2, positive: str | None = None):
        self.labels, self.coef, self.intercept = labels, coef, intercept
        self.n_features, self.ngrams, self.positive = n_features, ngrams, positive

    def vectorizer(self):
        if getattr(self, "_vectorizer", None) is None:  # stateless; built once (it compiles its regex on creation)
            from sklearn.feature_extraction.text import HashingVectorizer

            self._vectorizer = HashingVectorizer(n_features=self.n_features, ngram_range=(1, self.ngrams),
                                                 alternate_sign=False, token_pattern=r"(?u)\b\w+\b")
            self._analyzer = self._vectorizer.build_analyzer()  # text -> its 1..n-grams
        return self._vectorizer

    def features(self, texts: list[str]):
        return self.vectorizer().transform(texts)

    def _logits_one(self, text: str) -> np.ndarray:
        """One document's logits without sklearn's per-call overhead: the HashingVectorizer features computed directly
        (signed murmurhash3 of every 1..n-gram, |h| mod n_features, counts summed, L2-normalised), equal to
        ``features([text]) @ coef.T`` to float rounding and 3-4x faster. The stages score one document at a time."""
        from sklearn.utils import murmurhash3_32

        self.vectorizer()
        grams = self._analyzer(text)
        n = self.n_features
        h = np.fromiter((murmurhash3_32(g, seed=0) for g in grams), np.int64, len(grams))
        idx = np.where(h == -(2**31), (2**31 - 1 - (n - 1)) % n, np.abs(h) % n)  # sklearn's rule for abs(-2^31)
        cols, counts = np.unique(idx, return_counts=True)
        if len(cols) == 0:
            return self.intercept.copy()
        counts = counts.astype(np.float64)
        return self.coef[:, cols] @ (counts / np.linalg.norm(counts)) + self.intercept

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        if len(texts) == 1:
            z = self._logits_one(texts[0])[None, :]
        else:
            z = self.features(texts) @ self.coef.T + self.intercept
        if len(self.labels) == 2:  # binary: one logit for labels[1]
            p1 = 1 / (1 + np.exp(-z[:, 0]))
            return np.stack([1 - p1, p1], axis=1)
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    def score(self, texts: list[str]) -> np.ndarray:
        """Probability of the positive label (binary models)."""
        return self.predict_proba(texts)[:, self.labels.index(self.positive or self.labels[-1])]

    def predict(self, texts: list[str]) -> list[str]:
        return [self.labels[i] for i in self.predict_proba(texts).argmax(axis=1)]

    def save(self, out: str | Path, metrics: dict) -> None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        save_npz(out / "weights.npz", coef=self.coef, intercept=self.intercept)
        atomic_write_json(out / "classifier.json", {"format": "herd-text-classifier-v1", "labels": self.labels,
                                                    "positive": self.positive, "n_features": self.n_features,
                                                    "ngrams": self.ngrams, "metrics": metrics})

    @classmethod
    def load(cls, path: str | Path) -> TextClassifier:
        from herd.data.stage import load_npz
        from herd.io import read_json

        path = Path(path)
        meta = read_json(path / "classifier.json", DataError)
        if meta.get("format") != "herd-text-classifier-v1":
            raise DataError(f"{path / 'classifier.json'}: not a classifier written by `herd data train-classifier`")
        w = load_npz(path / "weights.npz")
        return cls(meta["labels"], w["coef"], w["intercept"], meta["n_features"], meta["ngrams"], meta["positive"])


def read_labels(path: str | Path) -> tuple[list[str], list[str]]:
    texts, labels = [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(r.get("text"), str):
                raise DataError(f"{path}:{lineno}: expected a string field 'text'")
            if r.get("label") is None:
                continue  # the judge gave no usable answer
            texts.append(r["text"])
            labels.append(str(r["label"]))
    return texts, labels


def train_classifier(texts: list[str], labels: list[str], out: str | Path, holdout: float = 0.2, seed: int = 0,
                     c: float = 4.0, positive: str | None = None) -> dict:
    """Fit on a random (1 - holdout) part, report accuracy / AUC on the rest, refit on everything, save."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, roc_auc_score

    classes = sorted(set(labels))
    if len(classes) < 2:
        raise DataError(f"need at least two different labels to train a classifier (got {classes})")
    if positive is not None and positive not in classes:
        raise DataError(f"--positive {positive!r} is not one of the labels {classes}")
    idx = list(range(len(texts)))
    random.Random(seed).shuffle(idx)
    n_test = max(1, int(len(idx) * holdout))
    test, train = idx[:n_test], idx[n_test:]
    proto = TextClassifier(classes, np.zeros(0), np.zeros(0))

    def fit(rows: list[int]) -> TextClassifier:
        # Fit on the hashed columns that occur: the same L2-regularised problem (a column that never occurs has zero
        # gradient and stays 0), but the solver touches thousands of weights instead of 2^20 per class. One thread:
        # on a problem this small OpenMP threads only wait for each other (20-50x slower on a busy machine).
        from threadpoolctl import threadpool_limits

        x = proto.features([texts[i] for i in rows]).tocsr()
        used = np.unique(x.indices)
        lr = LogisticRegression(C=c, max_iter=2000, solver="liblinear" if len(classes) == 2 else "lbfgs")
        with threadpool_limits(limits=1):
            lr.fit(x[:, used], [labels[i] for i in rows])
        if list(lr.classes_) != classes:
            raise DataError("every label must occur in the training part; give more labelled documents")
        coef = np.zeros((lr.coef_.shape[0], proto.n_features), dtype=lr.coef_.dtype)
        coef[:, used] = lr.coef_
        return TextClassifier(classes, coef, lr.intercept_, positive=positive)

    model = fit(train)
    proba = model.predict_proba([texts[i] for i in test])
    y = [labels[i] for i in test]
    metrics = {"train": len(train), "test": len(test), "labels": {k: labels.count(k) for k in classes},
               "accuracy": round(float(accuracy_score(y, [classes[j] for j in proba.argmax(1)])), 4)}
    if len(set(y)) == len(classes):
        if len(classes) == 2:
            pos = positive or classes[-1]
            metrics["auc"] = round(float(roc_auc_score([t == pos for t in y], proba[:, classes.index(pos)])), 4)
        else:
            metrics["auc"] = round(float(roc_auc_score(y, proba, multi_class="ovr", labels=classes)), 4)
    fit(idx).save(out, metrics)  # the shipped model sees every label
    return metrics


class QualityScorer:
    name = "quality"

    def __init__(self, cfg: QualityConfig):
        if not cfg.model:
            raise DataError("[quality] is enabled but model is empty (train one with `herd data train-classifier`)")
        self.cfg, self.model = cfg, TextClassifier.load(cfg.model)

    def __call__(self, doc: dict) -> str | None:
        score = round(float(self.model.score([doc["text"]])[0]), 4)
        doc[self.cfg.field] = score
        return "low_quality" if score < self.cfg.min_score else None


# --- labelling with a chat model --------------------------------------------------------------------------------
def parse_answer(text: str, labels: tuple[str, ...] = YES_NO) -> str | None:
    """The first of ``labels`` the answer names (as a whole word, any case), or None when it names none."""
    m = re.search(r"\b(" + "|".join(re.escape(lab) for lab in labels) + r")\b", text, re.IGNORECASE)
    return next(lab for lab in labels if lab.lower() == m.group(1).lower()) if m else None


def judge_prompt(text: str, rubric: str, max_chars: int, labels: tuple[str, ...] = YES_NO) -> list[dict]:
    question = ("Does it meet the bar? (yes/no)" if tuple(labels) == YES_NO
                else f"Answer with one of: {', '.join(labels)}.")
    return [{"role": "system", "content": rubric},
            {"role": "user", "content": f"Document:\n\n{text[:max_chars]}\n\n{question}"}]


def default_rubric(labels: tuple[str, ...]) -> str:
    return RUBRIC if tuple(labels) == YES_NO else DOMAIN_RUBRIC.format(labels=", ".join(labels))


def label_rows(texts: list[str], answers: list[str], labels: tuple[str, ...] = YES_NO) -> list[dict]:
    """``label`` output rows: text, label (None when the answer names no label: counted, never fatal), answer."""
    return [{"text": t, "label": parse_answer(a, labels), "answer": a} for t, a in zip(texts, answers)]


def label_with_model(texts: list[str], model_dir: str, rubric: str = RUBRIC, max_chars: int = 4000,
                     batch: int = 8, labels: tuple[str, ...] = YES_NO) -> list[str]:
    """Raw answers of a herd/HF model directory (greedy decoding, herd's engine). A document too long for the
    model's context is cut (by characters) until the prompt and the answer fit."""
    import herd

    model = herd.load_model(model_dir).eval()
    tok = herd.Tokenizer(model_dir)
    chat = herd.ChatFormat(tok)
    params = herd.SamplingParams(max_new_tokens=8, temperature=0.0)
    limit = model.args.max_seq_len - params.max_new_tokens

    def prompt(text: str) -> list[int]:
        chars = max_chars
        ids = chat.encode_dialog_prompt(judge_prompt(text, rubric, chars, labels))
        while len(ids) > limit and chars > 0:
            chars = min(chars - 1, int(min(chars, len(text)) * limit / len(ids) * 0.95))
            ids = chat.encode_dialog_prompt(judge_prompt(text, rubric, max(chars, 0), labels))
        if len(ids) > limit:
            raise DataError(f"{model_dir}: the rubric alone ({len(ids)} tokens) exceeds the model's context of "
                            f"{model.args.max_seq_len} tokens")
        return ids

    answers: list[str] = []
    for i in range(0, len(texts), batch):
        answers += [s.text for s in herd.complete(model, [prompt(t) for t in texts[i:i + batch]], params, tok)]
    return answers


def label_with_endpoint(texts: list[str], base_url: str, model: str, api_key: str = "none", rubric: str = RUBRIC,
                        max_chars: int = 4000, labels: tuple[str, ...] = YES_NO) -> list[str]:
    """Raw answers of an OpenAI-compatible chat endpoint (``herd serve``, vLLM, ...), temperature 0."""
    import httpx

    answers = []
    with httpx.Client(base_url=base_url.rstrip("/"), headers={"Authorization": f"Bearer {api_key}"},
                      timeout=120) as client:
        for text in texts:
            r = client.post("/chat/completions", json={"model": model, "temperature": 0, "max_tokens": 8,
                                                       "messages": judge_prompt(text, rubric, max_chars, labels)})
            if r.status_code != 200:
                raise DataError(f"{base_url}: the endpoint answered {r.status_code}: {r.text[:200]}")
            answers.append(r.json()["choices"][0]["message"]["content"] or "")
    return answers
