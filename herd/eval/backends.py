"""The two things the harness asks of a model, from a local model directory or an OpenAI-compatible endpoint.

- ``loglikelihood([(context, continuation), ...])`` -> ``[(log p(continuation | context), is_greedy), ...]``.
  Tokenized as lm-eval does (trailing spaces of the context move to the continuation; the continuation's ids are
  the tail of the encoding of context + continuation; BOS first). Locally, requests are scored in batches with
  their **shared token prefix computed once** (the few-shot block of MMLU, ARC, AGIEval): the prefix goes through
  the model into a KV cache, which is copied to every row, and each batch runs only the tokens after it (left-padded,
  so the answer letter's logits are the last position of every row).
- ``generate(prompts, generation, on_done)``: completions through herd's continuous-batching ``Engine`` (locally) or
  the endpoint's /v1/completions or /v1/chat/completions; ``on_done(index, texts)`` fires as each prompt finishes.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from herd.errors import UserError
from herd.eval.tasks.base import Generation
from herd.model.transformer import KVCache

Prompt = str | list[dict]


def split_context(context: str, continuation: str) -> tuple[str, str]:
    """lm-eval's ``_encode_pair``: trailing whitespace of the context belongs to the continuation."""
    n = len(context) - len(context.rstrip())
    return (context[:-n], context[-n:] + continuation) if n else (context, continuation)


def sample_seed(seed: int, item_id: str, k: int) -> int:
    """A per-(item, sample) seed, so a resumed run samples exactly what an uninterrupted one would."""
    return zlib.crc32(f"{seed}/{item_id}/{k}".encode())


# --- local model --------------------------------------------------------------------------------------------------
@dataclass
class _Request:
    ids: list[int]  # context + continuation (BOS first)
    n_cont: int  # continuation tokens at the end of ids


class LocalBackend:
    def __init__(self, model, tokenizer, stop_ids: Sequence[int], batch_size: int = 16, max_batch_tokens: int = 8192,
                 name: str = "model"):
        from herd.tokenizer import ChatFormat

        self.model, self.tokenizer = model, tokenizer
        self.chat_format = ChatFormat(tokenizer) if "<|start_header_id|>" in tokenizer.special_tokens else None
        self.stop_ids = tuple(stop_ids)
        self.batch_size, self.max_batch_tokens = batch_size, max_batch_tokens
        self.max_len = model.args.max_seq_len
        self.device = next(model.parameters()).device
        self.name = name

    @classmethod
    def from_dir(cls, path: str, device: str | None = None, dtype: torch.dtype | None = None, **kw) -> LocalBackend:
        from pathlib import Path

        from herd.checkpoint import load_model, read_generation_config
        from herd.tokenizer import Tokenizer

        root = Path(path)
        if not root.is_dir():
            raise UserError(f"{path}: --model is not a directory")
        if not any((root / f).exists() for f in ("tokenizer.model", "tokenizer.json", "original/tokenizer.model")):
            raise UserError(f"{path}: no tokenizer (tokenizer.model or tokenizer.json) in the model directory")
        tok = Tokenizer(root / "original" if (root / "original" / "tokenizer.model").exists()
                        and not (root / "tokenizer.model").exists() and not (root / "tokenizer.json").exists()
                        else root)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
        model = load_model(root, dtype=dtype, device=device).eval()
        return cls(model, tok, read_generation_config(root, tok)["eos_token_id"], name=str(root.resolve()), **kw)

    # --- encoding ---
    def encode_prompt(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, bos=True)
        if self.chat_format is None:
            raise UserError("--chat needs a tokenizer with Llama 3's chat special tokens")
        # Contents trimmed as Meta's Llama 3 Instruct chat template does (``message['content'] | trim``), so a model
        # directory sees the ids that transformers' apply_chat_template / lm-eval --apply_chat_template give it.
        return self.chat_format.encode_dialog_prompt([{**m, "content": m["content"].strip()} for m in prompt])

    def _request(self, context: str, continuation: str) -> _Request:
        context, continuation = split_context(context, continuation)
        whole = self.tokenizer.encode(context + continuation, bos=True)
        n_ctx = len(self.tokenizer.encode(context, bos=True))
        if n_ctx >= len(whole):
            raise UserError(f"continuation {continuation!r} encodes to no tokens")
        ids = whole[-(self.max_len + 1):]  # lm-eval keeps the last max_length + 1 tokens
        return _Request(ids, len(whole) - n_ctx)

    # --- log-likelihood ---
    @torch.inference_mode()
    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        reqs = [self._request(c, x) for c, x in requests]
        out: list[tuple[float, bool] | None] = [None] * len(reqs)
        # Requests with the same input (every letter of one question) share one row.
        inputs: dict[tuple[int, ...], list[int]] = {}
        for i, r in enumerate(reqs):
            inputs.setdefault(tuple(r.ids[:-1]), []).append(i)
        keys = list(inputs)
        prefix = _common_prefix(keys)
        # The prefix must stop before the first position whose logits are needed.
        prefix = min([prefix] + [len(r.ids) - r.n_cont - 1 for r in reqs])
        keys.sort(key=len, reverse=True)
        suffix_max = len(keys[0]) - prefix
        rows = min(self.batch_size, len(keys), max(1, self.max_batch_tokens // max(suffix_max, 1)))
        cache = KVCache.for_model(self.model, rows, prefix + suffix_max)
        if prefix:
            self._prefill(list(keys[0][:prefix]), cache)
        start = 0
        while start < len(keys):
            width = len(keys[start]) - prefix
            n = min(rows, len(keys) - start, max(1, self.max_batch_tokens // width))
            batch = keys[start: start + n]
            self._score_batch(batch, prefix, [[reqs[i] for i in inputs[k]] for k in batch],
                              [inputs[k] for k in batch], cache.rows(0, n), out)
            start += n
        return out  # type: ignore[return-value]

    def _prefill(self, prefix: list[int], cache: KVCache) -> None:
        """Run the shared prefix once into row 0 of ``cache`` and copy its keys/values to every other row."""
        P = len(prefix)
        pos = torch.arange(P, device=self.device)
        mask = torch.ones(P, P, dtype=torch.bool, device=self.device).tril()[None, None]
        self.model(torch.tensor([prefix], device=self.device), positions=pos[None], mask=mask,
                   cache=cache.rows(0, 1), cache_pos=pos, last_only=True)
        for t in cache.k + cache.v:
            t[1:, :, :P] = t[:1, :, :P]

    def _score_batch(self, batch: list[tuple[int, ...]], P: int, reqs: list[list[_Request]], idx: list[list[int]],
                     cache: KVCache, out: list) -> None:
        """Score one batch of inputs that continue the cached prefix: suffixes left-padded to one width, so every
        row's continuation ends at the last position; pad positions attend only to themselves (never NaN)."""
        b, S = len(batch), len(batch[0]) - P
        tokens = torch.zeros(b, S, dtype=torch.long)
        positions = torch.zeros(b, S, dtype=torch.long)
        valid = torch.zeros(b, S, dtype=torch.bool)
        for r, key in enumerate(batch):
            suffix = key[P:]
            pad = S - len(suffix)
            tokens[r, pad:] = torch.tensor(suffix)
            positions[r, pad:] = torch.arange(P, P + len(suffix))
            valid[r, pad:] = True
        q = torch.arange(S)
        causal = q[None, :] <= q[:, None]  # [S, S]: key slot <= query slot
        mask = (valid[:, None, :] & causal[None]) | torch.eye(S, dtype=torch.bool)[None]
        mask = torch.cat([torch.ones(b, S, P, dtype=torch.bool), mask], dim=2)[:, None]  # + the prefix
        longest_cont = max(x.n_cont for group in reqs for x in group)
        logits = self.model(tokens.to(self.device), positions=positions.to(self.device), mask=mask.to(self.device),
                            cache=cache, cache_pos=torch.arange(P, P + S, device=self.device),
                            last_only=longest_cont == 1)
        logits = logits[:, -longest_cont:].float().log_softmax(-1).cpu()
        for r, group in enumerate(reqs):
            for x, i in zip(group, idx[r]):
                target = torch.tensor(x.ids[-x.n_cont:])
                lp = logits[r, -x.n_cont:]
                out[i] = (float(lp.gather(1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all()))

    # --- generation ---
    def generate(self, prompts: Sequence[Prompt], item_ids: Sequence[str], gen: Generation, seed: int,
                 on_done: Callable[[int, list[str]], None]) -> None:
        from herd.inference.engine import Engine
        from herd.inference.sampling import SamplingParams

        if not prompts:
            return
        room = self.max_len - gen.max_new_tokens
        if room < 1:
            raise UserError(f"max_new_tokens {gen.max_new_tokens} leaves no room in the context of {self.max_len}")
        ids = []
        for p in prompts:
            x = self.encode_prompt(p)
            ids.append(x if len(x) <= room else x[:1] + x[len(x) - room + 1:])  # keep BOS, drop the oldest shots
        max_len = min(self.max_len, max(len(x) for x in ids) + gen.max_new_tokens)
        engine = Engine(self.model, self.tokenizer, max_batch=self.batch_size, max_len=max_len,
                        max_waiting=len(ids) * gen.n + 1)
        texts: list[list[str | None]] = [[None] * gen.n for _ in ids]
        seqs: list = []
        failure: list[BaseException] = []

        def finished(i: int, k: int) -> Callable:
            def cb(delta) -> None:
                if delta.finish_reason is None or failure:
                    return
                if delta.finish_reason not in ("stop", "length"):
                    failure.append(RuntimeError(f"generation for item {item_ids[i]} ended: {delta.finish_reason}"))
                    return
                texts[i][k] = seqs[i * gen.n + k].text
                if all(t is not None for t in texts[i]):
                    try:
                        on_done(i, list(texts[i]))  # type: ignore[arg-type]
                    except BaseException as e:  # the engine would swallow it: stop everything and re-raise below
                        failure.append(e)
                        for seq in seqs:
                            seq.cancel()
            return cb

        try:
            for i, x in enumerate(ids):
                for k in range(gen.n):
                    params = SamplingParams(max_new_tokens=gen.max_new_tokens, temperature=gen.temperature,
                                            top_p=gen.top_p, seed=sample_seed(seed, item_ids[i], k),
                                            stop_ids=self.stop_ids, stop=gen.stop)
                    seqs.append(engine.submit(x, params, on_delta=finished(i, k)))
            engine.run()
        finally:
            engine.close()
        if failure:
            raise failure[0]


def _common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for s in seqs[1:]:
        i = 0
        while i < n and s[i] == first[i]:
            i += 1
        n = i
    return n


# --- OpenAI-compatible endpoint -----------------------------------------------------------------------------------
class EndpointBackend:
    """An OpenAI-compatible server (``herd serve``, vLLM, ...). Log-likelihoods come from /v1/completions with
    ``echo`` and ``logprobs`` (the server must support them, as herd's and vLLM's do); the continuation's tokens are
    found by ``text_offset``. Failed requests are retried ``retries`` times with backoff, then an error names the
    endpoint and the last failure."""

    def __init__(self, url: str, model: str | None = None, api_key: str | None = None, concurrency: int = 4,
                 retries: int = 3, timeout: float = 300.0):
        self.url = url.rstrip("/")
        if not self.url.endswith("/v1"):
            self.url += "/v1"
        self.api_key, self.concurrency, self.retries, self.timeout = api_key, concurrency, retries, timeout
        self.model = model or self._models()[0]
        self.name = f"{self.url} ({self.model})"

    def _post(self, path: str, body: dict | None = None) -> dict:
        last = ""
        for attempt in range(self.retries + 1):
            req = urllib.request.Request(self.url + path, data=None if body is None else json.dumps(body).encode(),
                                         method="GET" if body is None else "POST")
            req.add_header("Content-Type", "application/json")
            if self.api_key:
                req.add_header("Authorization", f"Bearer {self.api_key}")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    return json.loads(resp.read())
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code}: {e.read()[:200].decode('utf-8', 'replace')}"
                if e.code < 500 and e.code != 429:  # the request itself is wrong: retrying will not help
                    break
            except (urllib.error.URLError, TimeoutError, ConnectionError, json.JSONDecodeError) as e:
                last = str(getattr(e, "reason", e))
            if attempt < self.retries:
                time.sleep(min(2 ** attempt, 10) * 0.5)
        raise UserError(f"{self.url}{path}: request failed after {self.retries + 1} attempt(s): {last}")

    def _models(self) -> list[str]:
        data = self._post("/models").get("data") or []
        if not data:
            raise UserError(f"{self.url}/models: the endpoint lists no model; pass --endpoint-model")
        return [m["id"] for m in data]

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        def one(req: tuple[str, str]) -> tuple[float, bool]:
            context, continuation = split_context(*req)
            body = {"model": self.model, "prompt": context + continuation, "echo": True, "max_tokens": 1,
                    "logprobs": 1, "temperature": 0}
            lp = self._post("/completions", body)["choices"][0]["logprobs"]
            # Drop the one generated token. Servers differ on whether offsets count the BOS token's text: measure
            # the shift from the echoed tokens themselves.
            tokens, lps = lp["tokens"][:-1], lp["token_logprobs"][:-1]
            offsets, tops = lp["text_offset"][:-1], (lp.get("top_logprobs") or [None] * len(lp["tokens"]))[:-1]
            shift = offsets[0] + len("".join(tokens)) - len(context + continuation)
            total, greedy = 0.0, True
            for tok, tok_lp, offset, top in zip(tokens, lps, offsets, tops):
                if offset - shift >= len(context):
                    if tok_lp is None:
                        raise UserError(f"{self.url}/completions: no prompt logprobs (does the server support echo?)")
                    total += tok_lp
                    if top:
                        greedy &= max(top, key=top.get) == tok
            return total, greedy

        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(one, requests))

    def generate(self, prompts: Sequence[Prompt], item_ids: Sequence[str], gen: Generation, seed: int,
                 on_done: Callable[[int, list[str]], None]) -> None:
        def one(i: int) -> tuple[int, list[str]]:
            texts = []
            for k in range(gen.n):
                body = {"model": self.model, "max_tokens": gen.max_new_tokens, "temperature": gen.temperature,
                        "top_p": gen.top_p, "seed": sample_seed(seed, item_ids[i], k)}
                if gen.stop:
                    body["stop"] = list(gen.stop)
                if isinstance(prompts[i], str):
                    texts.append(self._post("/completions", {**body, "prompt": prompts[i]})["choices"][0]["text"])
                else:
                    msg = self._post("/chat/completions", {**body, "messages": prompts[i]})["choices"][0]["message"]
                    texts.append(msg.get("content") or "")
            return i, texts

        with ThreadPoolExecutor(self.concurrency) as pool:
            for i, texts in pool.map(one, range(len(prompts))):
                on_done(i, texts)
