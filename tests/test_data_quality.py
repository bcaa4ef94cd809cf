"""Quality classifier (label -> train -> score), domain tagging and deterministic mixing."""

import json
import threading
import zlib
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import pytest

pytest.importorskip("sklearn")

from herd.data.demo import web_corpus  # noqa: E402
from herd.data.filters.heuristics import GopherQuality, GopherQualityConfig  # noqa: E402
from herd.data.mix import Mix, MixConfig, keep_rates, rule_domain  # noqa: E402
from herd.data.quality import (  # noqa: E402
    QualityConfig,
    QualityScorer,
    TextClassifier,
    label_with_endpoint,
    parse_answer,
    train_classifier,
)


class Judge(BaseHTTPRequestHandler):
    """A stand-in for a chat model behind an OpenAI-compatible endpoint: it answers the rubric question with the
    Gopher quality rules (no LLM is available offline). It exercises the real HTTP labelling path."""

    gopher = GopherQuality(GopherQualityConfig())

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        doc = body["messages"][1]["content"].split("Document:\n\n", 1)[1].rsplit("\n\nDoes it meet", 1)[0]
        answer = "Yes." if self.gopher({"text": doc}) is None else "No, it does not."
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def endpoint():
    server = HTTPServer(("127.0.0.1", 0), Judge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()


def test_label_train_score_round_trip(endpoint, tmp_path):
    texts = web_corpus(500, seed=7)
    labels = [parse_answer(a) for a in label_with_endpoint(texts, endpoint, "judge", max_chars=100_000)]
    assert set(labels) == {"yes", "no"}
    metrics = train_classifier(texts, labels, tmp_path / "clf", positive="yes")
    print(metrics)
    assert metrics["test"] == 100 and metrics["accuracy"] > 0.78 and metrics["auc"] > 0.75
    clf = TextClassifier.load(tmp_path / "clf")
    scorer = QualityScorer(QualityConfig(enabled=True, model=str(tmp_path / "clf"), min_score=0.5))
    scores = clf.score(texts[:50])
    assert np.all((scores >= 0) & (scores <= 1))
    doc = {"id": "x", "text": texts[0]}
    reason = scorer(doc)
    assert doc["quality"] == round(float(scores[0]), 4) and (reason is None) == (doc["quality"] >= 0.5)


def test_parse_answer():
    assert parse_answer("Yes, it does.") == "yes" and parse_answer("no") == "no" and parse_answer("maybe") is None


def test_rule_domains():
    assert rule_domain({"id": "src/a.py", "text": "x = 1"}) == "code"
    assert rule_domain({"id": "a", "text": "int main() {\n  return 0;\n}\n"}) == "code"
    assert rule_domain({"id": "b", "text": r"We have $x^2 = 4$ so \frac{a}{b} = x and y = 2x + 1 = 5."}) == "math"
    assert rule_domain({"id": "c", "text": "The weather was pleasant and the town was calm."}) == "general"


def test_mix_hits_target_shares_deterministically(tmp_path):
    rng = np.random.default_rng(0)
    domains = ["general"] * 3000 + ["code"] * 2000 + ["math"] * 300 + ["multilingual"] * 800 + ["other"] * 10
    docs = [{"id": f"d{i}", "text": "x" * int(rng.integers(50, 150)), "domain": d} for i, d in enumerate(domains)]
    mix = Mix(MixConfig(enabled=True))
    from herd.data.stage import load_npz, save_npz

    save_npz(tmp_path / "s.npz", **mix.scan(docs))
    (tmp_path / "p").mkdir()
    mix.reduce([tmp_path / "s.npz"], tmp_path / "p", None)
    plan = load_npz(tmp_path / "p" / "plan.npz")
    reasons = mix.apply(docs, plan)
    assert reasons == mix.apply(docs, plan)  # deterministic
    kept = [d for d, r in zip(docs, reasons) if r is None]
    size = {k: sum(len(d["text"]) for d in kept if d["domain"] == k) for k in mix.targets}
    total = sum(size.values())
    shares = {k: v / total for k, v in size.items()}
    for k, target in mix.targets.items():
        assert abs(shares[k] - target) < 0.03, (k, shares)
    assert all(r == "mix_domain_without_target" for d, r in zip(docs, reasons) if d["domain"] == "other")
    rates = keep_rates({"a": 100, "b": 50}, {"a": 0.5, "b": 0.5})
    assert rates == {"a": 0.5, "b": 1.0}


# --- domain classifier: labelled by a judge, trained like the quality one, used by the domain stage -------------------
GENERAL = ["The village market opens every Saturday morning near the old stone church.",
           "Our family travelled north by train and watched the snow cover the hills.",
           "The museum reopened after the storm, and visitors queued along the river path.",
           "She baked bread with rosemary and olive oil for the neighbours' harvest dinner.",
           "Local elections drew a record turnout as residents debated the new library.",
           "The football club signed a young striker from the coastal town last summer.",
           "Gardeners recommend planting tulip bulbs in autumn before the first frost.",
           "The novel follows two sisters who inherit a bakery in a quiet mountain valley.",
           "Tourists admired the cathedral windows while a choir rehearsed inside.",
           "Heavy rain closed the mountain pass, so the hikers waited at the lodge."]
MATH_WORDS = ["Let n be a prime number greater than two; then n is odd, since every even number is divisible by two.",
              "The derivative of the sine function is the cosine function, and integrating by parts gives the result.",
              "Suppose the sequence converges; then every subsequence converges to the same limit.",
              "By induction on the number of vertices, every tree with k vertices has exactly k minus one edges.",
              "The eigenvalues of a symmetric matrix are real, so the quadratic form is diagonalisable.",
              "Hence the probability that both dice show an even number is one quarter.",
              "Consider the polynomial of degree three; by the theorem it has at least one real root.",
              "The sum of the interior angles of a triangle equals two right angles, which proves the lemma.",
              "We bound the integral from above by the maximum of the function times the length of the interval.",
              "Therefore the group is abelian, because every element squared equals the identity."]
MATH_SYMBOLS = [r"We have $x^2 + y^2 = r^2$ and \frac{dy}{dx} = -x/y.", r"\sum_{k=1}^{n} k = n(n+1)/2 for all n ≥ 1.",
                r"\int_0^1 x^2 dx = 1/3, so the area is \frac{1}{3}.", r"If a ≤ b then a + c ≤ b + c."]


def domain_documents(n: int, seed: int, symbols: bool = True) -> list[tuple[str, str]]:
    """(text, true domain): general prose, math (in words, and with formulas when ``symbols``), Python source."""
    import random

    from herd.data.demo import stdlib_sources

    rng = random.Random(seed)
    sources = [src for _, src in stdlib_sources()]
    docs = []
    for i in range(n):
        domain = ("general", "math", "code")[i % 3]
        if domain == "code":
            lines = rng.choice(sources).splitlines()
            start = rng.randrange(max(1, len(lines) - 30))
            text = "\n".join(lines[start:start + rng.randint(12, 30)])
        else:
            pool = GENERAL if domain == "general" else MATH_WORDS + (MATH_SYMBOLS if symbols else [])
            text = " ".join(rng.choice(pool) for _ in range(rng.randint(3, 7)))
        docs.append((text, domain))
    return docs


class DomainJudge(BaseHTTPRequestHandler):
    """An endpoint that knows each document's true domain; it answers in a sentence, and for every seventh
    document with something that names no domain (what a confused model does)."""

    truth: dict[str, str] = {}

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        doc = body["messages"][1]["content"].split("Document:\n\n", 1)[1].rsplit("\n\nAnswer with one of", 1)[0]
        domain = self.truth[doc]
        answer = "I am not sure." if zlib.crc32(doc.encode()) % 7 == 0 else f"This one is {domain.upper()}."
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_domain_classifier_labelled_trained_and_used_by_the_domain_stage(tmp_path, capsys):
    from herd.cli import main
    from herd.data.executors import LocalExecutor
    from herd.data.mix import DomainConfig, DomainTagger
    from herd.data.pipeline import DataRunConfig, run_pipeline
    from herd.data.shardio import read_jsonl_zst

    train_docs = domain_documents(300, seed=1)
    DomainJudge.truth = dict(train_docs)
    server = HTTPServer(("127.0.0.1", 0), DomainJudge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    docs_file = tmp_path / "docs.jsonl"
    docs_file.write_text("".join(json.dumps({"text": t}) + "\n" for t, _ in train_docs), encoding="utf-8")
    try:
        assert main(["data", "label", "--input", str(docs_file), "--out", str(tmp_path / "labels.jsonl"),
                     "--endpoint", f"http://127.0.0.1:{server.server_port}/v1", "--labels", "general,math,code",
                     "--samples", "300"]) == 0
    finally:
        server.shutdown()
    rows = [json.loads(line) for line in (tmp_path / "labels.jsonl").read_text().splitlines()]
    unsure = sum(r["label"] is None for r in rows)
    assert 0 < unsure < 100 and all(r["label"] == DomainJudge.truth[r["text"]] for r in rows if r["label"])
    assert f"{unsure} answers named no label" in capsys.readouterr().out

    assert main(["data", "train-classifier", "--labels", str(tmp_path / "labels.jsonl"), "--out",
                 str(tmp_path / "domain-clf")]) == 0
    metrics = json.loads((tmp_path / "domain-clf" / "classifier.json").read_text())["metrics"]
    assert metrics["train"] + metrics["test"] == len(rows) - unsure
    assert metrics["accuracy"] >= 0.95 and metrics["auc"] >= 0.98, metrics

    # fresh documents, math in words only: the rules call it general, the trained classifier calls it math
    fresh = domain_documents(60, seed=2, symbols=False)
    tagger = DomainTagger(DomainConfig(model=str(tmp_path / "domain-clf")))
    tagged = []
    for i, (text, _) in enumerate(fresh):
        doc = {"id": f"d{i}", "text": text, "language": "en"}
        tagger(doc)
        tagged.append(doc["domain"])
    assert sum(t == d for t, (_, d) in zip(tagged, fresh)) >= 57
    math_in_words = [{"id": "m", "text": t} for t, d in fresh if d == "math"]
    assert all(rule_domain(d) == "general" for d in math_in_words)  # what the fallback would have said

    # through `herd data run`, routed by domain: each folder holds what the classifier says
    src = tmp_path / "fresh.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t, _ in fresh), encoding="utf-8")
    cfg = DataRunConfig()
    cfg.run.stages, cfg.run.route_by, cfg.domain.model = "domain", "domain", str(tmp_path / "domain-clf")
    run_pipeline([str(src)], tmp_path / "run", cfg, LocalExecutor(1), progress=False)
    for domain in ("general", "math", "code"):
        got = [r["text"] for f in (tmp_path / "run" / "data" / domain).glob("*.jsonl.zst") for r in read_jsonl_zst(f)]
        assert got == [t for (t, _), tag in zip(fresh, tagged) if tag == domain]


# --- `herd data label --model DIR`: a tiny herd model served by herd's engine ------------------------------------
@pytest.fixture(scope="module")
def tiny_judge(tmp_path_factory, small_tokenizer):
    """A random-weight herd model directory (2 layers of width 64: fast on a CPU), weights drawn as
    tests/helpers.py's random_model draws them; its answers are noise, so the tests check the mechanics."""
    import torch

    import herd

    tok, _ = small_tokenizer
    model = herd.Transformer(herd.ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.n_words,
                                            max_seq_len=640)).eval()
    model.init_weights(seed=3)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.5 if name == "output.weight" else 0.05, generator=gen)
    d = tmp_path_factory.mktemp("judge") / "model"
    herd.save_model(model, d, tokenizer=tok)
    return d


@pytest.fixture
def one_torch_thread():
    """The judge is tiny: one thread is 10x faster than two threads waiting for each other on a busy machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_label_with_a_herd_model_directory(tiny_judge, tmp_path, capsys, one_torch_thread):
    from herd.cli import main

    docs = GENERAL[:3] + MATH_WORDS[:2] + ["A long page. " * 2000]  # the last is longer than the model's context
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs), encoding="utf-8")
    outs = []
    for i, labels in enumerate(["yes,no", "yes,no"]):  # (other --labels: the endpoint test above)
        out = tmp_path / f"labels{i}.jsonl"
        assert main(["data", "label", "--input", str(src), "--out", str(out), "--model", str(tiny_judge),
                     "--labels", labels, "--samples", "6"]) == 0
        printed = capsys.readouterr().out
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert [r["text"] for r in rows] == docs and all(set(r) == {"text", "label", "answer"} for r in rows)
        names = tuple(labels.split(","))
        assert all(r["label"] == parse_answer(r["answer"], names) for r in rows)
        assert all(isinstance(r["answer"], str) for r in rows)
        unparsable = sum(r["label"] is None for r in rows)
        assert f"labelled {6 - unparsable} of 6 documents" in printed
        assert f"{unparsable} answers named no label" in printed
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]  # greedy decoding: the same labels file every time


def test_label_rejects_bad_rubrics_and_labels(tiny_judge, tmp_path, capsys):
    from herd.cli import main

    src = tmp_path / "docs.jsonl"
    src.write_text(json.dumps({"text": "hello there"}) + "\n", encoding="utf-8")
    (tmp_path / "empty.txt").write_text("  \n")
    base = ["data", "label", "--input", str(src), "--out", str(tmp_path / "o.jsonl"), "--model", str(tiny_judge)]
    for extra, message in ((["--rubric", str(tmp_path / "missing.txt")], "missing.txt: no such file"),
                           (["--rubric", str(tmp_path / "empty.txt")], "empty.txt: the file is empty"),
                           (["--labels", "yes"], "at least two different labels")):
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "o.jsonl").exists()


def test_parse_answer_with_domain_labels():
    labels = ("general", "math", "code")
    assert parse_answer("It is MATH, clearly", labels) == "math"
    assert parse_answer("code or math?", labels) == "code"  # the first named wins
    assert parse_answer("mathematics", labels) is None  # whole words only


def test_one_document_scoring_equals_the_batch_path(tmp_path):
    texts = web_corpus(200, seed=3) + ["", "   ", "ünïcödé wörds 42"]
    labels = ["yes" if len(t) > 600 else "no" for t in texts]
    train_classifier(texts, labels, tmp_path / "clf", positive="yes")
    clf = TextClassifier.load(tmp_path / "clf")
    batch = clf.predict_proba(texts)  # sklearn's HashingVectorizer
    one = np.concatenate([clf.predict_proba([t]) for t in texts])  # the direct per-document features
    np.testing.assert_allclose(one, batch, rtol=0, atol=1e-12)  # float summation order only
