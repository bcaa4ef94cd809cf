"""Server reliability (issue 12, defects 1-6): a client's mistake is a 4xx naming the field, never a 500; one
request's failure stays its own; serving flags fail fast with one line; bodies are bounded; the API key guards every
route but /health. The acceptance test at the end sends a storm of hostile requests (fixed bodies plus a seeded
fuzz, to 127.0.0.1 only) while good requests generate, and checks the good ones are untouched.

The served model has a padded vocabulary (1536 embedding rows over a 1256-id tokenizer), as many real checkpoints
do, so every test here also runs against defect 2."""

from __future__ import annotations

import json
import math
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

import herd
from herd.cli import main
from herd.inference.engine import Engine
from herd.inference.sampling import SamplingParams
from herd.inference.server import Server

from .helpers import random_model
from .test_server import KEY, start_server

PADDED_VOCAB = 1536
LIMIT = 256 * 1024  # the test server's --max-body-bytes
CAPACITY = 32  # the test server's --max-waiting
AUTH = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}


@pytest.fixture(scope="module")
def padded_dir(small_tokenizer, tmp_path_factory):
    tok, _ = small_tokenizer
    assert tok.n_words < PADDED_VOCAB
    path = tmp_path_factory.mktemp("padded") / "tiny-chat"
    herd.save_model(random_model(vocab_size=PADDED_VOCAB), path, tokenizer=tok)
    return path


@pytest.fixture(scope="module")
def live(padded_dir):
    uv, thread, server, url = start_server(padded_dir, server_kw={"max_body_bytes": LIMIT}, max_waiting=CAPACITY)
    yield server, url
    uv.should_exit = True
    thread.join(timeout=30)


def post(url: str, body: bytes | dict, path: str = "/v1/completions", headers: dict | None = None,
         timeout: float = 120) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(url + path, content=content, headers=AUTH if headers is None else headers, timeout=timeout)


def completion(url: str, **kw) -> str:
    r = post(url, {"prompt": "Once upon a time", "max_tokens": 48, "temperature": 0, **kw})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def nested(depth: int) -> bytes:
    return b'{"prompt": ' + b"[" * depth + b"]" * depth + b"}"


# --- 1. sampling values are checked at the boundary; the engine fails only the sequence that broke -----------------
@pytest.mark.parametrize("raw, param", [
    (b'{"prompt": "x", "max_tokens": 3, "temperature": NaN}', "temperature"),
    (b'{"prompt": "x", "max_tokens": 3, "temperature": 1e-45}', "temperature"),
    (b'{"prompt": "x", "max_tokens": 3, "temperature": Infinity}', "temperature"),
    (b'{"prompt": "x", "max_tokens": 3, "temperature": 1e999}', "temperature"),  # JSON's way to spell inf
    (b'{"prompt": "x", "max_tokens": 3, "top_p": NaN}', "top_p"),
    (b'{"prompt": "x", "max_tokens": 3, "frequency_penalty": -Infinity}', "frequency_penalty"),
    (b'{"prompt": "x", "max_tokens": 3, "presence_penalty": NaN}', "presence_penalty"),
    (b'{"prompt": "x", "max_tokens": 3, "temperature": 100000000000000000000000000000000000000000000000000000000000'
     b'0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000'
     b'0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000'
     b'00000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000}', "temperature"),
    (b'{"prompt": "x", "max_tokens": 3, "top_k": 1.5}', "top_k"),
], ids=["nan", "denormal", "inf", "1e999", "top_p-nan", "penalty-inf", "penalty-nan", "int-1e400", "top_k-float"])
def test_bad_sampling_values_are_400_naming_the_field(live, raw, param):
    r = post(live[1], raw)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_a_hostile_request_does_not_disturb_one_in_flight(live):
    url = live[1]
    alone = completion(url, max_tokens=120, temperature=1.0, seed=3)
    result = {}
    t = threading.Thread(target=lambda: result.update(text=completion(url, max_tokens=120, temperature=1.0, seed=3)))
    t.start()
    codes = [post(url, raw).status_code for raw in (b'{"prompt": "x", "max_tokens": 3, "temperature": NaN}',
                                                    b'{"prompt": "x", "max_tokens": 3, "temperature": 1e-45}') * 3]
    t.join(timeout=120)
    assert codes == [400] * 6
    assert result["text"] == alone


def poisoned_model(token: int, vocab_size: int = 1256):
    """A model whose embedding of ``token`` is NaN: any sequence holding it gets NaN logits, the others do not."""
    model = random_model(vocab_size=vocab_size)
    with torch.no_grad():
        model.tok_embeddings.weight[token] = float("nan")
    return model


def test_engine_fails_only_the_sequence_whose_logits_break():
    model = poisoned_model(99)
    good = [([5, 6, 7], SamplingParams(max_new_tokens=30)), ([8, 9], SamplingParams(max_new_tokens=30,
                                                                                 temperature=1.0, seed=4))]
    solo = []
    for prompt, params in good:
        engine = Engine(model, max_batch=4, max_len=64)
        seq = engine.submit(prompt, params)
        engine.run()
        solo.append(seq.output)
    engine = Engine(model, max_batch=4, max_len=64)
    seqs = [engine.submit(p, params) for p, params in good]
    bad = engine.submit([1, 99, 2], SamplingParams(max_new_tokens=30))
    engine.run()
    assert bad.finish_reason == "error" and "non-finite" in bad.error
    assert [s.output for s in seqs] == solo and all(s.finish_reason == "length" for s in seqs)


def test_engine_survives_a_sampler_that_raises_for_one_sequence(monkeypatch):
    """A failing batched draw is retried row by row, so only the row that fails on its own fails; seeded rows draw
    exactly what they would have drawn (their generators are rewound)."""
    import herd.inference.engine as engine_module

    model = random_model()
    params = [SamplingParams(max_new_tokens=25), SamplingParams(max_new_tokens=25, temperature=1.0, seed=9)]
    solo = [herd.complete(model, [[3, 4]], p)[0].output for p in params]
    real_sample = engine_module.sample

    def sample(logits, temperature, *a, **kw):  # a sampler bug hit only by temperature 0.5
        if 0.5 in temperature:
            raise RuntimeError("sampler bug")
        return real_sample(logits, temperature, *a, **kw)

    monkeypatch.setattr(engine_module, "sample", sample)
    engine = Engine(model, max_batch=4, max_len=64)
    seqs = [engine.submit([3, 4], p) for p in params]
    bad = engine.submit([3, 4], SamplingParams(max_new_tokens=25, temperature=0.5))
    engine.run()
    assert bad.finish_reason == "error" and "sampler bug" in bad.error
    assert [s.output for s in seqs] == solo


def test_a_request_that_breaks_in_the_engine_fails_alone(padded_dir):
    """Served, the poisoned sequence's request gets a 500 (a server fault, not the client's), streamed or not; a
    request generating beside it gets exactly its solo text."""
    uv, thread, _, url = start_server(padded_dir, model=poisoned_model(500, vocab_size=PADDED_VOCAB))
    try:
        good = {"prompt": [1, 2, 3], "max_tokens": 100, "temperature": 1.0, "seed": 5}
        alone = post(url, good).json()["choices"][0]["text"]
        result = {}
        t = threading.Thread(target=lambda: result.update(r=post(url, good)))
        t.start()
        poison = {"prompt": [1, 500, 2], "max_tokens": 20}
        r = post(url, poison)
        assert r.status_code == 500 and "non-finite" in r.json()["error"]["message"]
        r = post(url, {**poison, "stream": True})
        events = [line for line in r.text.splitlines() if line.startswith("data: ")]
        assert r.status_code == 200 and "non-finite" in json.loads(events[-2][6:])["error"]["message"]
        assert events[-1] == "data: [DONE]"
        t.join(timeout=120)
        assert result["r"].json()["choices"][0]["text"] == alone
    finally:
        uv.should_exit = True
        thread.join(timeout=30)


# --- 2. padded vocabularies: padding ids are neither accepted nor sampled -----------------------------------------
def test_padding_ids_are_refused_and_never_sampled(live, padded_dir):
    server, url = live
    n_words = server.tok.n_words
    for ids in ([n_words], [1, PADDED_VOCAB - 1], [PADDED_VOCAB]):
        r = post(url, {"prompt": ids, "max_tokens": 2})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
        assert f"[0, {n_words})" in r.json()["error"]["message"]
    # At temperature 5 about a fifth of this model's probability mass sits on padding ids (random output rows).
    r = post(url, {"prompt": "hi", "max_tokens": 100, "temperature": 5.0, "seed": 1, "n": 4, "logprobs": 5})
    assert r.status_code == 200, r.text
    assert sum(len(c["logprobs"]["tokens"]) for c in r.json()["choices"]) > 100  # (a stop id may end one early)
    # The same through the engine API: every id sampled lies in the tokenizer's range.
    model, tok = herd.load_model(padded_dir), herd.Tokenizer(padded_dir)
    logits = model(torch.tensor([tok.encode("hi", bos=True)]))[0, -1]
    assert torch.softmax(logits.float() / 5.0, -1)[n_words:].sum() > 0.1  # padding would be sampled unmasked
    seqs = herd.complete(model, [tok.encode("hi", bos=True)] * 4,
                         SamplingParams(max_new_tokens=100, temperature=5.0, seed=2, logprobs=3), tok)
    ids = [t for s in seqs for t in s.output] + [t for s in seqs for e in s.logprobs for t, _ in e.top]
    assert len(ids) > 200 and max(ids) < n_words


# --- 3. serving flags: one line, exit 2, before anything loads ------------------------------------------------------
@pytest.mark.parametrize("flags, named", [
    (["--max-batch", "0"], "--max-batch"),
    (["--port", "99999"], "--port"),
    (["--port", "-1"], "--port"),
    (["--max-len", "0"], "--max-len"),
    (["--max-len", "100000"], "max_seq_len"),
    (["--max-waiting", "0"], "--max-waiting"),
    (["--max-body-bytes", "0"], "--max-body-bytes"),
    (["--drain-timeout", "-1"], "--drain-timeout"),
])
def test_bad_serving_flags_exit_2_with_one_line(padded_dir, flags, named, capsys, monkeypatch):
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda *a, **kw: pytest.fail("the server started"))
    assert main(["serve", "--model", str(padded_dir), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("herd: error: ") and named in err and len(err.strip().splitlines()) == 1


def test_stop_cancels_what_does_not_drain_in_time(padded_dir):
    """Shutdown waits ``drain_timeout`` for open sequences, then cancels them: SIGTERM is never ignored."""
    tok = herd.Tokenizer(padded_dir)
    engine = Engine(herd.load_model(padded_dir), tok, max_batch=1, max_len=256)
    real_step = engine.step

    def slow_step():  # 2,000 steps of 10 ms: 20 s to drain
        time.sleep(0.01)
        real_step()

    engine.step = slow_step
    server = Server(engine, tok, "tiny-chat", [], drain_timeout=0.5)
    server.start()
    seqs = [engine.submit([1, 2, 3], SamplingParams(max_new_tokens=250)) for _ in range(8)]
    time.sleep(0.2)
    t0 = time.monotonic()
    server.stop()
    assert time.monotonic() - t0 < 5
    assert all(s.done for s in seqs) and seqs[-1].finish_reason == "cancelled"


# --- 4. bounded bodies; tokenising off the event loop -----------------------------------------------------------------
def test_bodies_over_the_limit_get_413(live):
    url = live[1]
    big = json.dumps({"prompt": "a" * (LIMIT + 10), "max_tokens": 1}).encode()
    r = post(url, big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: the server must count as it reads
        yield b'{"prompt": "'
        for _ in range(2 * LIMIT // 8192):
            yield b"a" * 8192
        yield b'"}'
    r = httpx.post(url + "/v1/completions", content=chunks(), headers=AUTH, timeout=60)
    assert r.status_code == 413
    assert completion(url, max_tokens=2)  # just under the limit is fine, and the server lives
    assert post(url, {"prompt": "a" * (LIMIT - 100), "max_tokens": 1}).status_code == 400  # too long for 256 tokens


def test_health_answers_while_a_prompt_is_tokenised(live, monkeypatch):
    server, url = live
    real_encode = server.tok.encode

    def slow_encode(*a, **kw):  # a tokenizer taking 3 s (a huge prompt); it holds no lock the loop needs
        time.sleep(3)
        return real_encode(*a, **kw)

    monkeypatch.setattr(server.tok, "encode", slow_encode)
    t = threading.Thread(target=lambda: post(url, {"prompt": "slow", "max_tokens": 1}))
    t.start()
    time.sleep(0.5)
    t0 = time.monotonic()
    assert httpx.get(url + "/health", timeout=30).status_code == 200
    waited = time.monotonic() - t0
    t.join(timeout=60)
    assert waited < 1.5


# --- 5. 400, not 500 ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("raw, param, path", [
    (nested(5000), None, "/v1/completions"),
    (nested(5000).replace(b"prompt", b"messages"), None, "/v1/chat/completions"),
    (b'{"prompt": "x\\ud800", "echo": true, "max_tokens": 2}', "prompt", "/v1/completions"),
    (b'{"prompt": ["ok", "\\udfff"], "max_tokens": 2}', "prompt[1]", "/v1/completions"),
    (b'{"prompt": "x", "model": "\\ud800"}', "model", "/v1/completions"),
    (b'{"messages": [{"role": "user", "content": "\\ud83d"}]}', "messages[0].content", "/v1/chat/completions"),
    (b'{"prompt": ["a", "b", "c"], "n": 16, "max_tokens": 1}', "n", "/v1/completions"),
    (json.dumps({"prompt": ["a"] * (CAPACITY + 1), "max_tokens": 1}).encode(), "prompt", "/v1/completions"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "n": 16, "max_tokens": 4}).encode(), None, None),  # fits: 200
    (json.dumps({"prompt": "x", "seed": 2**64}).encode(), "seed", "/v1/completions"),
    (json.dumps({"prompt": "x", "seed": 2**63}).encode(), "seed", "/v1/completions"),
    (json.dumps({"prompt": "x", "seed": -(2**63) - 1}).encode(), "seed", "/v1/completions"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 99}).encode(),
     "top_logprobs", "/v1/chat/completions"),
], ids=["nested-5000", "chat-nested-5000", "surrogate-echo", "surrogate-list", "surrogate-model",
        "surrogate-chat", "prompts-x-n", "too-many-prompts", "n16-fits", "seed-2^64", "seed-2^63", "seed-below-int64",
        "top-logprobs"])
def test_malformed_requests_are_400(live, raw, param, path):
    if path is None:  # the control: 16 choices of one prompt fit the queue
        assert post(live[1], raw, "/v1/chat/completions").status_code == 200
        return
    r = post(live[1], raw, path)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and r.json()["error"]["type"] == "invalid_request_error"


def test_seeds_use_all_their_bits(live):
    url = live[1]
    texts = {seed: completion(url, temperature=1.0, seed=seed, max_tokens=24) for seed in (0, 2**32, 2**63 - 1, -1)}
    assert len(set(texts.values())) == 4  # before: seeds 0 and 2**32 drew the same tokens on CPU
    assert completion(url, temperature=1.0, seed=2**32, max_tokens=24) == texts[2**32]


# --- 6. the API key ------------------------------------------------------------------------------------------------
def test_every_route_but_health_needs_the_key(live, monkeypatch):
    import hmac

    url = live[1]
    for path in ("/docs", "/openapi.json", "/redoc", "/v1/models", "/no-such-route"):
        r = httpx.get(url + path)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", path
    assert httpx.get(url + "/openapi.json", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert httpx.get(url + "/health").status_code == 200
    compared = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: compared.append(1) or real(a, b))
    for value in (f"Bearer {KEY[:-1]}X", f"Bearer {KEY}X", KEY, "Bearer é".encode()):
        assert httpx.get(url + "/v1/models", headers={"Authorization": value}).status_code == 401
    assert len(compared) == 4  # constant-time comparison


# --- acceptance: hostile traffic next to good traffic -----------------------------------------------------------------
BAD_VALUES = {  # each value is invalid for its field (so any body holding one must get a 4xx)
    "temperature": [math.nan, math.inf, -math.inf, -1, 1e-45, 1e-300, "hot", [], {}, True],
    "top_p": [math.nan, 0, -0.5, 1.5, math.inf, "x", True],
    "top_k": [-1, -(10**20), 1.5, "k", math.nan],
    "max_tokens": [-1, 10**30, 10**6, 1.5, "ten", math.nan, True],
    "n": [0, -1, 17, 10**20, 1.5, "2"],
    "seed": [2**64, -(2**64), 1.5, "7", 10**40],
    "frequency_penalty": [math.nan, 2.5, -3, math.inf, "x", 10**400],
    "presence_penalty": [math.nan, -2.5, 3, "x"],
    "stop": [5, [""], ["a"] * 5, [1], {"a": 1}, "\ud800"],
    "stream": ["true", 1, []],
    "model": ["gpt-4", "\ud800", 5, []],
}
COMPLETION_BAD = {
    **BAD_VALUES,
    "logprobs": [-1, 21, 10**9, 1.5, "x"],
    "echo": ["yes", 1, []],
    "prompt": [[], [[]], [-1], [1300], [PADDED_VOCAB], [10**20], [1.5], [True], {"a": 1}, 5, "\ud800x",
               [["a"]], [[1, "a"]], ["ok", 7], ["a"] * (CAPACITY + 1), "word " * 400],
}
CHAT_BAD = {
    **BAD_VALUES,
    "logprobs": [1, "x", []],
    "top_logprobs": [-1, 21, "x"],
    "stream_options": ["x", 5, []],
    "messages": [[], "hi", [{"role": "user"}], [{"role": "robot", "content": "x"}], [{"content": "x"}],
                 [{"role": "user", "content": 5}], [{"role": "user", "content": [{"type": "image_url"}]}],
                 [{"role": "user", "content": "\ud800"}], [{"role": "user", "content": "word " * 400}]],
}


def fuzzed_requests(count: int, seed: int = 1234) -> list[tuple[str, bytes, dict]]:
    """``count`` hostile (path, body, headers) triples, the same for a given seed: valid bodies with one to three
    fields replaced by invalid values, bodies cut short, non-JSON bytes, deep nesting, no or wrong API key."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        kind = rng.random()
        if kind < 0.7:
            path, base, bad = rng.choice([
                ("/v1/completions", {"prompt": "Hello", "max_tokens": 4}, COMPLETION_BAD),
                ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
                 CHAT_BAD)])
            body = dict(base)
            for name in rng.sample(sorted(bad), rng.randint(1, 3)):
                body[name] = rng.choice(bad[name])
            if body.get("top_logprobs") is not None:
                body["logprobs"] = True  # so top_logprobs is read
            out.append((path, json.dumps(body).encode(), AUTH))  # json.dumps writes NaN / Infinity as Python reads
        elif kind < 0.8:
            valid = json.dumps({"prompt": "Hello", "max_tokens": 4, "temperature": 0.5}).encode()
            out.append(("/v1/completions", valid[: rng.randrange(1, len(valid) - 1)], AUTH))  # a cut object
        elif kind < 0.87:
            out.append(("/v1/completions", b"\xff" + bytes(rng.randrange(256) for _ in range(rng.randint(0, 64))),
                        AUTH))
        elif kind < 0.94:
            depth = rng.choice([1500, 5000, 20000])
            out.append((rng.choice(["/v1/completions", "/v1/chat/completions"]), nested(depth), AUTH))
        else:
            headers = rng.choice([{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}])
            out.append(("/v1/completions", b'{"prompt": "x"}', headers))
    return out


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_hostile_requests_never_disturb_good_ones(live):
    """While good requests (greedy, seeded sampling, streamed chat) generate, 200 hostile requests are sent from
    four threads: every hostile one gets a 4xx; every good one returns exactly its solo text; /health answers every
    poll; the server's memory grows by less than 200 MB."""
    server, url = live
    good = [
        ("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 64, "temperature": 0}),
        ("/v1/completions", {"prompt": "The cat", "max_tokens": 64, "temperature": 1.0, "seed": 7, "n": 2}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 64,
                                  "temperature": 0.8, "seed": 3}),
        ("/v1/completions", {"prompt": "def f(x):", "max_tokens": 64, "temperature": 2.0, "seed": 11,
                             "logprobs": 2}),
    ]

    def run_good(req):
        path, body = req
        r = post(url, body, path)
        assert r.status_code == 200, r.text
        return [c.get("text", c.get("message", {}).get("content")) for c in r.json()["choices"]]

    solo = [run_good(req) for req in good]
    hostile = [(p, b, h) for p, b, h in fuzzed_requests(190)]
    hostile += [("/v1/completions", raw, AUTH) for raw in (
        b'{"prompt": "x", "max_tokens": 3, "temperature": NaN}', b'{"prompt": "x", "max_tokens": 3, "temperature": 1e-45}',
        b'{"prompt": [1300], "max_tokens": 3}', b'{"prompt": "x\\ud800", "echo": true}', b'{"prompt": "x", "model": "\\ud800"}',
        json.dumps({"prompt": ["a", "b", "c"], "n": 16}).encode(), json.dumps({"prompt": "x", "seed": 2**64}).encode(),
        nested(5000), b'{"prompt": "' + b"a" * (8 * 2**20) + b'"}')]
    rss_before = rss_bytes()
    storm_done = threading.Event()
    health: list[tuple[int, float]] = []

    def poll_health():
        with httpx.Client(timeout=30) as c:
            while not storm_done.is_set():
                t0 = time.monotonic()
                health.append((c.get(url + "/health").status_code, time.monotonic() - t0))
                time.sleep(0.05)

    def send(req):
        path, body, headers = req
        try:
            return httpx.post(url + path, content=body, headers=headers, timeout=60).status_code
        except httpx.TransportError as e:  # tolerated for nothing: record it
            return repr(e)

    rounds: list[list[list[str]]] = []

    def good_traffic():
        with ThreadPoolExecutor(len(good)) as pool:
            while not storm_done.is_set() or not rounds:
                rounds.append(list(pool.map(run_good, good)))

    poller, goods = threading.Thread(target=poll_health), threading.Thread(target=good_traffic)
    poller.start(), goods.start()
    t0 = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        codes = list(pool.map(send, hostile))
    storm_done.set()
    goods.join(timeout=300), poller.join(timeout=60)
    elapsed = time.monotonic() - t0
    rss_growth = rss_bytes() - rss_before

    failures = [(req[0], req[1][:120], code) for req, code in zip(hostile, codes)
                if not (isinstance(code, int) and 400 <= code < 500)]
    assert not failures, failures
    assert {401, 413, 400} <= set(codes)
    assert rounds and all(r == solo for r in rounds), (solo, rounds)
    assert health and all(code == 200 for code, _ in health)
    assert max(t for _, t in health) < 2.0, max(t for _, t in health)
    assert rss_growth < 200 * 2**20, rss_growth
    assert elapsed < 120
    assert server.engine.running == [] and not server.engine.waiting  # nothing hostile reached the engine
