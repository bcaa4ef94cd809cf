"""The harness on a tiny model: prefix-shared batched log-likelihoods equal plain forwards, ``herd eval`` end to end
(JSON, table, samples), resume without redoing items (interrupted in-process, and SIGKILLed), ``herd eval score``,
and bad input (unknown task, missing data, model without tokenizer, failing endpoint)."""

import json
import os
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

import herd
from herd.cli import main
from herd.errors import UserError
from herd.eval.backends import EndpointBackend, LocalBackend
from herd.eval.harness import EvalConfig, evaluate

from .conftest import ROOT

DATA = ROOT.parent / "shared" / "benchmarks"
pytestmark = pytest.mark.skipif(not DATA.exists(), reason=f"benchmarks not found at {DATA}")
QUICK = ["--data-dir", str(DATA), "--limit", "2", "--num-fewshot", "1", "--max-new-tokens", "8", "--quiet"]


def tiny_model(vocab_size: int, seed: int = 0):
    """Small enough that an eval of a few items takes seconds on 2 cores; weights large enough to vary outputs."""
    model = herd.Transformer(herd.ModelArgs.from_name("tiny", vocab_size=vocab_size, dim=64, n_layers=2, n_heads=4,
                                                      n_kv_heads=2, max_seq_len=4096, tie_embeddings=False)).eval()
    model.init_weights(seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.5 if name == "output.weight" else 0.1, generator=gen)
    return model


@pytest.fixture(scope="module")
def model_dir(small_tokenizer, tmp_path_factory):
    tok, _ = small_tokenizer
    path = tmp_path_factory.mktemp("eval") / "tiny"
    herd.save_model(tiny_model(tok.n_words), path, tokenizer=tok)
    return path


def test_shared_prefix_batched_loglikelihood_equals_plain_forwards(small_tokenizer):
    tok, _ = small_tokenizer
    model = tiny_model(tok.n_words)
    backend = LocalBackend(model, tok, [tok.eos_id], batch_size=3, max_batch_tokens=200)
    shots = "Question: what is shared?\nA. this\nB. that\nAnswer: A\n\n"
    requests = [(shots + q + "\nAnswer:", c) for q in ("Which one", "A much longer question about the fox", "Why")
                for c in (" A", " B", " C", " D", " a longer continuation")]
    requests += [("Unrelated context", " text"), ("Answer:  ", "A")]  # no shared prefix; trailing spaces move
    got = backend.loglikelihood(requests)
    for (ctx, cont), (ll, greedy) in zip(requests, got):
        n = len(ctx) - len(ctx.rstrip())
        ctx, cont = (ctx[:-n], ctx[-n:] + cont) if n else (ctx, cont)
        whole, n_ctx = tok.encode(ctx + cont, bos=True), len(tok.encode(ctx, bos=True))
        with torch.no_grad():
            logp = model(torch.tensor([whole]))[0].log_softmax(-1)
        want = sum(logp[i - 1, whole[i]].item() for i in range(n_ctx, len(whole)))
        assert ll == pytest.approx(want, abs=1e-4)
        assert greedy == all(logp[i - 1].argmax().item() == whole[i] for i in range(n_ctx, len(whole)))


def test_herd_eval_end_to_end(model_dir, tmp_path, capsys):
    out, samples = tmp_path / "results.json", tmp_path / "samples.jsonl"
    rc = main(["eval", "--model", str(model_dir), "--tasks", "arc_challenge,gsm8k,humaneval,drop,gpqa",
               "--out", str(out), "--samples-out", str(samples), *QUICK])
    assert rc == 0
    report = json.loads(out.read_text())
    res = report["results"]
    assert set(res) == {"arc_challenge", "gsm8k", "humaneval", "drop", "gpqa"}
    assert res["arc_challenge"]["n"] == 2 and 0 <= res["arc_challenge"]["acc"] <= 1
    assert res["arc_challenge"]["settings"]["shots"] == 1
    assert {"exact_match", "exact_match_flexible"} <= set(res["gsm8k"])
    assert "pass@1" in res["humaneval"] and {"f1", "em"} <= set(res["drop"])
    assert "deviates from Meta" in res["drop"]["settings"]["shots_from"]
    assert res["gsm8k"]["settings"]["generation"]["max_new_tokens"] == 8
    records = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(records) == 10 and all("metrics" in r and "response" in r for r in records)
    table = capsys.readouterr().out
    assert "arc_challenge" in table and "pass@1" in table and "exact_match" in table
    assert not (tmp_path / "results.json.partial.jsonl").exists()  # removed once the results are written


class Interrupt(Exception):
    pass


class CountingBackend:
    """Wraps a backend, counts the items it is asked for, and can fail after ``fail_after`` calls."""

    def __init__(self, inner, fail_after=None):
        self.inner, self.name, self.fail_after = inner, inner.name, fail_after
        self.items: list[str] = []
        self.calls = 0

    def _tick(self):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise Interrupt

    def loglikelihood(self, requests):
        self._tick()
        self.items += [ctx for ctx, _ in requests]
        return self.inner.loglikelihood(requests)

    def generate(self, prompts, ids, gen, seed, on_done):
        def done(i, texts):
            self._tick()
            self.items.append(ids[i])
            on_done(i, texts)
        self.inner.generate(prompts, ids, gen, seed, done)


def test_resume_after_interruption_redoes_nothing_and_matches_an_uninterrupted_run(model_dir, tmp_path):
    base = LocalBackend.from_dir(str(model_dir), batch_size=4)
    cfg = dict(tasks=["gpqa", "gsm8k"], data_dir=str(DATA), limit=3, num_fewshot=1, max_new_tokens=6)
    whole = evaluate(CountingBackend(base), EvalConfig(out=str(tmp_path / "a.json"), **cfg), show_progress=False)

    out = tmp_path / "b.json"
    first = CountingBackend(base, fail_after=2)  # one gpqa chunk (3 items), then one gsm8k item, then "killed"
    with pytest.raises(Interrupt):
        evaluate(first, EvalConfig(out=str(out), **cfg), show_progress=False)
    partial = out.with_name("b.json.partial.jsonl")
    saved = [json.loads(line) for line in partial.read_text().splitlines()[1:]]
    assert len(saved) == 4 and not out.exists()
    second = CountingBackend(base)
    resumed = evaluate(second, EvalConfig(out=str(out), **cfg), show_progress=False)
    assert second.items == ["1", "2"]  # only the two gsm8k items not finished before
    for task in ("gpqa", "gsm8k"):
        strip = {k: v for k, v in resumed["results"][task].items() if k != "seconds"}
        assert strip == {k: v for k, v in whole["results"][task].items() if k != "seconds"}


def test_progress_file_of_another_model_is_refused(model_dir, tmp_path):
    out = tmp_path / "r.json"
    out.with_name("r.json.partial.jsonl").write_text(json.dumps({"herd_eval_progress": {"model": "other"}}) + "\n")
    with pytest.raises(UserError, match="different run"):
        evaluate(LocalBackend.from_dir(str(model_dir)), EvalConfig(["gpqa"], str(DATA), str(out), limit=1))


@pytest.mark.slow
def test_sigkill_then_rerun_finishes_with_the_results_of_an_uninterrupted_run(model_dir, tmp_path):
    out = tmp_path / "r.json"
    cmd = [sys.executable, "-m", "herd", "eval", "--model", str(model_dir), "--tasks", "gsm8k", "--out", str(out),
           "--data-dir", str(DATA), "--limit", "12", "--num-fewshot", "1", "--max-new-tokens", "24", "--quiet",
           "--batch-size", "2"]
    # killed as by SIGKILL (the OOM killer, a preempted node) once 4 items are on disk: injected, so that the kill
    # lands mid-run however fast the machine is
    killed = subprocess.run(cmd, env={**os.environ, "HERD_FAULT": "kill-after-items:4"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    partial = out.with_name("r.json.partial.jsonl")
    done_before = len(partial.read_text().splitlines()) - 1
    assert 4 <= done_before < 12 and not out.exists()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert json.loads(out.read_text())["results"]["gsm8k"]["n"] == 12
    # the uninterrupted run gives the same per-item answers (greedy: the completions do not depend on batching)
    ref = tmp_path / "ref.json"
    subprocess.run(cmd[:cmd.index("--out") + 1] + [str(ref)] + cmd[cmd.index("--out") + 2:] + ["--samples-out",
                   str(tmp_path / "ref.jsonl")], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert json.loads(ref.read_text())["results"]["gsm8k"]["exact_match"] == \
        json.loads(out.read_text())["results"]["gsm8k"]["exact_match"]


def test_eval_score_humaneval_samples(tmp_path, capsys):
    from herd.eval.tasks.humaneval import load

    problems = load(DATA)[:3]
    samples = tmp_path / "samples.jsonl"
    lines = [{"task_id": p["task_id"], "completion": p["canonical_solution"]} for p in problems]
    lines += [{"task_id": p["task_id"], "completion": "    return None\n"} for p in problems]
    samples.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "scored.json"
    assert main(["eval", "score", "--task", "humaneval", "--samples", str(samples), "--data-dir", str(DATA),
                 "--out", str(out)]) == 0
    res = json.loads(out.read_text())["results"]["humaneval"]
    assert res["n"] == 3 and res["pass@1"] == pytest.approx(0.5)


def test_eval_score_gsm8k_by_index_and_bad_lines(tmp_path, capsys):
    from herd.eval.tasks.gsm8k import load

    rows = load(DATA)[:4]
    samples = tmp_path / "gsm.jsonl"
    golds = [r["answer"].split("####")[-1].strip() for r in rows]
    samples.write_text("".join(json.dumps({"index": i, "completion": f"The answer is {g if i % 2 else 0}."}) + "\n"
                               for i, g in enumerate(golds)))
    assert main(["eval", "score", "--task", "gsm8k", "--samples", str(samples), "--data-dir", str(DATA)]) == 0
    assert "50.0" in capsys.readouterr().out
    samples.write_text('{"index": 0, "completion": "x"}\nnot json\n')
    assert main(["eval", "score", "--task", "gsm8k", "--samples", str(samples), "--data-dir", str(DATA)]) == 2
    assert f"{samples}:2: not valid JSON" in capsys.readouterr().err


def test_bad_input_is_one_clear_error(model_dir, tmp_path, capsys):
    def err(argv):
        assert main(argv) == 2
        return capsys.readouterr().err.strip()

    out = ["--out", str(tmp_path / "r.json")]
    assert "unknown task(s) nope" in err(["eval", "--model", str(model_dir), "--tasks", "nope", *out, *QUICK])
    empty = tmp_path / "empty_data"
    (empty / "gsm8k").mkdir(parents=True)
    assert f"{empty / 'gsm8k' / 'test.jsonl'}: data file not found" in err(
        ["eval", "--model", str(model_dir), "--tasks", "gsm8k", "--data-dir", str(empty), *out])
    no_tok = tmp_path / "no_tok"
    no_tok.mkdir()
    for f in model_dir.iterdir():
        if not f.name.startswith("tokenizer"):
            (no_tok / f.name).write_bytes(f.read_bytes())
    assert "no tokenizer" in err(["eval", "--model", str(no_tok), "--tasks", "gsm8k", *out, *QUICK])
    assert "exactly one of --model" in err(["eval", "--tasks", "gsm8k", *out, *QUICK])


def test_failing_endpoint_is_retried_then_reported(tmp_path):
    hits = []

    class Failing(BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            self.send_response(500)
            self.end_headers()
            self.wfile.write(b"boom")

        def log_message(self, *a):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Failing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(UserError, match=r"/v1/models: request failed after 3 attempt\(s\): HTTP 500"):
            EndpointBackend(f"http://127.0.0.1:{server.server_address[1]}", retries=2)
    finally:
        server.shutdown()
    assert hits == ["/v1/models"] * 3


def test_eval_verb_and_sub_verbs_are_registered(capsys):
    for argv in (["eval", "--help"], ["eval", "score", "--help"], ["eval", "pairwise", "--help"],
                 ["eval", "contamination", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
    text = capsys.readouterr().out
    assert "--num-fewshot" in text and "--samples" in text and "--judge" in text and "--train" in text


def test_endpoint_mode_against_herd_serve_matches_the_local_model(model_dir, tmp_path):
    """``--endpoint`` on a live ``herd serve`` (in a thread): the same log-likelihoods (echo + logprobs) and the same
    greedy completions as the model run locally."""
    from .test_server import KEY, start_server

    uv, thread, _, base = start_server(model_dir, max_len=4096)
    url = base + "/v1"
    try:
        cfg = dict(tasks=["arc_challenge", "gsm8k"], data_dir=str(DATA), limit=2, num_fewshot=1, max_new_tokens=8)
        remote = evaluate(EndpointBackend(url, api_key=KEY), EvalConfig(out=str(tmp_path / "remote.json"),
                                                           samples_out=str(tmp_path / "remote.jsonl"), **cfg),
                          show_progress=False)
        local = evaluate(LocalBackend.from_dir(str(model_dir)), EvalConfig(
            out=str(tmp_path / "local.json"), samples_out=str(tmp_path / "local.jsonl"), **cfg), show_progress=False)
    finally:
        uv.should_exit = True
        thread.join(timeout=30)
    assert remote["model"] == f"{url} (tiny-chat)"
    got = [json.loads(x) for x in (tmp_path / "remote.jsonl").read_text().splitlines()]
    want = [json.loads(x) for x in (tmp_path / "local.jsonl").read_text().splitlines()]
    for g, w in zip(got, want):
        assert (g["task"], g["id"], g["metrics"]) == (w["task"], w["id"], w["metrics"])
        if g["task"] == "arc_challenge":
            assert g["response"] == pytest.approx(w["response"], abs=1e-3)
        else:
            assert g["response"] == w["response"]
    assert remote["results"]["arc_challenge"]["acc"] == local["results"]["arc_challenge"]["acc"]
