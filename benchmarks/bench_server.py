"""Server throughput and latency under concurrent clients: continuous batching vs serving one request at a time.

    python benchmarks/bench_server.py [--preset small-100m --clients 1 8 32 --new 32 --max-batch 8]

One process: a herd server (uvicorn, in a thread) on 127.0.0.1 over a random-weight model with a tokenizer trained
here on the standard library's sources; C asyncio clients each send completions requests back to back (greedy,
exactly ``--new`` tokens unless an end token comes first; tokens are counted from ``usage``). Reported per C:
completion tokens/s over the wall time, and p50 / p99 of request latency. The peer is the same server with one
KV-cache slot (``--max-batch 1``: requests are served one after another), so the ratio is what batching buys.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import hardware  # noqa: E402

import herd  # noqa: E402
from herd.inference.engine import Engine  # noqa: E402
from herd.inference.server import Server, create_app  # noqa: E402
from herd.tokenizer.train import train_bpe  # noqa: E402


def start(model_dir: Path, max_batch: int, invariant: bool):
    import uvicorn

    tok = herd.Tokenizer(model_dir)
    engine = Engine(herd.load_model(model_dir), tok, max_batch=max_batch, max_len=512, max_waiting=1024,
                    batch_invariant=invariant)
    server = Server(engine, tok, "bench", list(tok.stop_tokens))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(create_app(server), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    while not uv.started:
        time.sleep(0.05)
    return uv, thread, f"http://127.0.0.1:{port}/v1/completions"


async def load(url: str, clients: int, requests_per_client: int, new: int) -> tuple[float, list[float], int]:
    import httpx

    latencies: list[float] = []
    tokens = 0

    async def client(i: int, http: httpx.AsyncClient) -> None:
        nonlocal tokens
        for j in range(requests_per_client):
            t0 = time.perf_counter()
            r = await http.post(url, json={"prompt": f"def handler_{i}_{j}(request):", "max_tokens": new,
                                           "temperature": 0})
            r.raise_for_status()
            latencies.append(time.perf_counter() - t0)
            tokens += r.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients + 4)) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(i, http) for i in range(clients)))
        return time.perf_counter() - t0, latencies, tokens


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="small-100m")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--no-batch-invariant", action="store_true", help="decode only up to the highest busy slot")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        tok = train_bpe(sorted((stdlib / "asyncio").glob("*.py")), vocab_size=2048, progress=False)
        model = herd.Transformer(herd.ModelArgs.from_name(a.preset, vocab_size=tok.n_words))
        model.init_weights(seed=0)
        herd.save_model(model, Path(tmp) / "m", tokenizer=tok)
        print(f"hardware: {hardware()}")
        print(f"model: {a.preset} ({sum(p.numel() for p in model.parameters()):,} params, fp32), {a.new} new tokens "
              f"per request, greedy; each of C clients sends max(2, 32 // C) requests back to back; batch-invariant "
              f"decoding: {not a.no_batch_invariant}")
        results = {}
        for max_batch in (a.max_batch, 1):
            uv, thread, url = start(Path(tmp) / "m", max_batch, not a.no_batch_invariant)
            try:
                asyncio.run(load(url, 1, 1, 4))  # warm-up
                for c in a.clients:
                    wall, lat, tokens = asyncio.run(load(url, c, max(2, 32 // c), a.new))
                    results[max_batch, c] = tokens / wall
                    print(f"  slots {max_batch:>2}, {c:>2} clients: {tokens / wall:7.1f} tok/s, latency p50 "
                          f"{percentile(lat, 0.5):6.2f} s, p99 {percentile(lat, 0.99):6.2f} s ({len(lat)} requests)")
            finally:
                uv.should_exit = True
                thread.join()
        for c in a.clients:
            print(f"  throughput with {a.max_batch} slots vs 1 slot at {c} clients: "
                  f"{results[a.max_batch, c] / results[1, c]:.2f}x")


if __name__ == "__main__":
    main()
