"""The OpenAI-compatible server, driven live on 127.0.0.1 by the real ``openai`` client (and httpx for raw bodies)."""

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
import uvicorn

import herd
from herd.checkpoint import read_generation_config
from herd.inference.engine import Engine
from herd.inference.server import Server, create_app
from herd.tokenizer import ChatFormat, Tokenizer

from .helpers import random_model

KEY = "test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(small_tokenizer, tmp_path_factory):
    tok, _ = small_tokenizer
    path = tmp_path_factory.mktemp("served") / "tiny-chat"
    herd.save_model(random_model(vocab_size=tok.n_words), path, tokenizer=tok)
    return path


def start_server(model_dir, server_kw=None, model=None, **engine_kw):
    tok = Tokenizer(model_dir)
    engine = Engine(model or herd.load_model(model_dir), tok, **{"max_batch": 8, "max_len": 256, **engine_kw})
    server = Server(engine, tok, "tiny-chat", read_generation_config(model_dir, tok)["eos_token_id"], api_key=KEY,
                    **(server_kw or {}))
    uv = uvicorn.Server(uvicorn.Config(create_app(server), host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not uv.started:
        assert time.time() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    port = uv.servers[0].sockets[0].getsockname()[1]
    return uv, thread, server, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def live(model_dir):
    uv, thread, server, url = start_server(model_dir)
    yield server, url
    uv.should_exit = True
    thread.join(timeout=30)


@pytest.fixture()
def client(live):
    return openai.OpenAI(base_url=live[1] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def chat_text(client, content, stream=False, **kw):
    kw = {"model": "tiny-chat", "messages": [{"role": "user", "content": content}], "temperature": 0,
          "max_tokens": 24, **kw}
    if not stream:
        return client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, **kw))
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_models_health_and_api_key(live, client):
    assert [m.id for m in client.models.list()] == ["tiny-chat"]
    assert httpx.get(live[1] + "/health").json() == {"status": "ok"}
    bad = openai.OpenAI(base_url=live[1] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    r = httpx.post(live[1] + "/v1/completions", json={"prompt": "x"})  # no key at all
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_chat_matches_offline_generation_and_streaming(model_dir, client):
    text = chat_text(client, "Hello there")
    assert text and chat_text(client, "Hello there", stream=True) == text
    # The same greedy completion computed offline, with the engine shape the server uses.
    tok = Tokenizer(model_dir)
    prompt = ChatFormat(tok).encode_dialog_prompt([{"role": "user", "content": "Hello there"}])
    engine = Engine(herd.load_model(model_dir), tok, max_batch=8, max_len=256)
    seq = engine.submit(prompt, herd.SamplingParams(max_new_tokens=24,
                                                    stop_ids=tuple(read_generation_config(model_dir, tok)["eos_token_id"])))
    engine.run()
    assert seq.text == text


def test_completions_logprobs_and_echo(model_dir, client):
    tok = Tokenizer(model_dir)
    ids = tok.encode("Once upon a time, far away", bos=True)
    out = client.completions.create(model="tiny-chat", prompt=ids, max_tokens=0, echo=True, logprobs=1,
                                    temperature=0)
    lp = out.choices[0].logprobs
    assert out.choices[0].text == tok.decode(ids)
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(ids)
    with torch.no_grad():
        ref = torch.log_softmax(herd.load_model(model_dir)(torch.tensor([ids]))[0], dim=-1)
    want = [ref[i - 1, ids[i]].item() for i in range(1, len(ids))]
    assert lp.token_logprobs[1:] == pytest.approx(want, abs=1e-4)
    assert all(len(top) == 1 for top in lp.top_logprobs[1:])
    # lm-eval's request: echo, logprobs=1, max_tokens=1 -> one extra entry for the generated token.
    out = client.completions.create(model="tiny-chat", prompt=[ids, ids[:4]], max_tokens=1, echo=True, logprobs=1,
                                    temperature=0)
    assert [len(c.logprobs.token_logprobs) for c in out.choices] == [len(ids) + 1, 5]
    plain = client.completions.create(model="tiny-chat", prompt="Once upon", max_tokens=8, temperature=0, logprobs=2)
    c = plain.choices[0]
    assert c.finish_reason in ("stop", "length") and len(c.logprobs.tokens) == plain.usage.completion_tokens
    assert "".join(c.logprobs.tokens) == c.text
    n3 = client.completions.create(model="tiny-chat", prompt="Once upon", max_tokens=8, temperature=1.0, n=3, seed=5)
    assert len(n3.choices) == 3 and len({ch.text for ch in n3.choices}) > 1


def test_sixteen_concurrent_streams_match_their_solo_runs(client):
    prompts = [f"Question {i}: what comes next?" for i in range(16)]
    solo = [chat_text(client, p) for p in prompts]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda p: chat_text(client, p, stream=True), prompts))
    assert together == solo
    assert len(set(solo)) > 1


@pytest.mark.parametrize("body, field", [
    (b"{not json", None),
    (b'{"prompt": "\xff\xfe"}', None),
    (json.dumps({"prompt": "hi", "max_tokens": "ten"}).encode(), "max_tokens"),
    (json.dumps({"prompt": "hi", "max_tokens": -1}).encode(), "max_tokens"),
    (json.dumps({"prompt": "hi", "temperature": -0.5}).encode(), "temperature"),
    (json.dumps({"prompt": "hi", "model": "gpt-4"}).encode(), "model"),
    (json.dumps({"prompt": "hi", "max_tokens": 300}).encode(), "max_tokens"),
    (json.dumps({"prompt": [], "max_tokens": 3}).encode(), "prompt"),
    (json.dumps({"prompt": [99999]}).encode(), "prompt"),
    (json.dumps(["a list"]).encode(), None),
])
def test_bad_completion_requests_get_400(live, body, field):
    r = httpx.post(live[1] + "/v1/completions", content=body,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error" and error["param"] == field


def test_bad_chat_requests_get_400_and_the_server_lives(live, client):
    for kw in ({"messages": []}, {"messages": [{"role": "user"}]}, {"messages": [{"role": "robot", "content": "x"}]},
               {"messages": [{"role": "user", "content": "x"}], "max_tokens": 10_000},
               {"messages": [{"role": "user", "content": "x"}], "n": 0}):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="tiny-chat", **kw)
    assert chat_text(client, "still alive?")


def test_disconnect_frees_the_slot(live):
    server, url = live
    with httpx.stream("POST", url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"prompt": "go", "max_tokens": 200, "stream": True, "temperature": 1.0, "stop": ["\u2603"]},
                      timeout=30) as r:
        first = next(r.iter_lines())
        assert first.startswith("data: ")
        assert server.engine.running
    deadline = time.time() + 10
    while server.engine.running:
        assert time.time() < deadline, "the abandoned sequence kept its slot"
        time.sleep(0.05)


def test_full_queue_answers_503(model_dir):
    uv, thread, server, url = start_server(model_dir, max_batch=1, max_waiting=1)
    try:
        body = {"prompt": "x", "max_tokens": 200, "temperature": 1.0, "stop": ["\u2603"]}

        def post(_):
            return httpx.post(url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                              timeout=60).status_code
        with ThreadPoolExecutor(4) as pool:
            codes = list(pool.map(post, range(4)))
        assert codes.count(503) >= 2 and 200 in codes
    finally:
        uv.should_exit = True
        thread.join(timeout=30)


def test_cli_serve_drains_requests_on_sigterm(model_dir):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "herd", "serve", "--model", str(model_dir), "--port", str(port),
                             "--max-len", "256", "--log-level", "warning"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() else "timeout"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        result = {}

        def request():
            result["r"] = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                                     json={"prompt": "x", "max_tokens": 150, "temperature": 1.0, "stop": ["\u2603"]})
        t = threading.Thread(target=request)
        t.start()
        time.sleep(0.5)  # the request is in flight
        proc.send_signal(signal.SIGTERM)
        t.join(timeout=60)
        assert result["r"].status_code == 200
        assert result["r"].json()["usage"]["completion_tokens"] == 150
        # uvicorn re-raises the signal once it has shut down cleanly, so the exit status is "terminated by SIGTERM".
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()


MC_QUESTIONS = [
    ("The capital of France is", ["Paris", "Rome", "Berlin"], 0),
    ("Two plus two equals", ["three", "four", "five"], 1),
    ("The colour of the sky is", ["green", "red", "blue"], 2),
    ("A cat says", ["meow", "woof", "moo"], 0),
    ("Ice is made of", ["fire", "water", "sand"], 1),
    ("The opposite of hot is", ["warm", "loud", "cold"], 2),
]


def test_lm_eval_local_completions_scores_a_multiple_choice_task(live, model_dir, tmp_path, monkeypatch):
    """lm-evaluation-harness, offline, against the live server: its per-choice log-likelihoods and its accuracy equal
    the ones computed here directly from the model with lm-eval's tokenization (context, then " choice")."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    import lm_eval
    from lm_eval.tasks import TaskManager

    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n"
                            for q, c, a in MC_QUESTIONS))
    (tmp_path / "herd_tiny_mc.yaml").write_text(f"""task: herd_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
""")
    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={"base_url": live[1] + "/v1/completions", "model": "tiny-chat", "tokenizer": str(model_dir),
                    "tokenizer_backend": "huggingface", "num_concurrent": 1, "max_retries": 1, "max_length": 256},
        tasks=["herd_tiny_mc"], task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True)

    tok, model = Tokenizer(model_dir), herd.load_model(model_dir)
    correct, want_ll = 0, []
    for question, choices, answer in MC_QUESTIONS:
        lls = []
        for choice in choices:
            ctx = tok.encode(question)
            cont = tok.encode(question + " " + choice)[len(ctx):]
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([ctx + cont]))[0], dim=-1)
            lls.append(sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont)))
        want_ll.append(lls)
        correct += max(range(len(lls)), key=lls.__getitem__) == answer
    samples = sorted(results["samples"]["herd_tiny_mc"], key=lambda s: s["doc_id"])
    got_ll = [[r[0][0] for r in s["resps"]] for s in samples]
    assert [g == pytest.approx(w, abs=1e-3) for g, w in zip(got_ll, want_ll)] == [True] * len(MC_QUESTIONS)
    assert results["results"]["herd_tiny_mc"]["acc,none"] == pytest.approx(correct / len(MC_QUESTIONS))
