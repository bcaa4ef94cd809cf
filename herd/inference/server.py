"""An OpenAI-compatible HTTP server over the continuous-batching engine (FastAPI + uvicorn).

Endpoints: ``GET /health``, ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (both
with ``"stream": true`` as server-sent events ending in ``data: [DONE]``), and with a guard model
``POST /v1/moderations``. With a ``Moderator`` (``herd serve --guard DIR`` / ``--codeshield``) prompts are checked
before they reach the engine and responses before they reach the client; the refusal format is documented in
herd/safety/moderation.py.

One engine thread runs decode steps; request handlers (asyncio) submit sequences and receive each step's ``Delta``
through an ``asyncio.Queue``. A request whose client disconnects cancels its sequences, which frees their cache
slots at the next step. On shutdown uvicorn stops accepting connections and waits for the open requests; the engine
thread keeps stepping until they are drained (at most ``drain_timeout`` seconds: then what is left is cancelled),
then stops.

Failure behaviour (vLLM's bar): a client's mistake is a 4xx naming the field, never a 500, and never reaches the
engine; one request's failure stays its own (the engine fails only the sequence that broke, see engine.py).
With an API key every route but ``/health`` needs it (``/docs`` and ``/openapi.json`` included), compared in
constant time. Bodies above ``max_body_bytes`` get 413 before they are read whole; parsing and tokenising run in
worker threads, so ``/health`` answers while a large prompt is being tokenised.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from herd.inference import openai_protocol as api
from herd.inference.engine import Delta, Engine, QueueFull, Sequence
from herd.inference.openai_protocol import APIError
from herd.inference.sampling import SamplingParams
from herd.tokenizer.chat import ChatFormat
from herd.tokenizer.tokenizer import Tokenizer

log = logging.getLogger(__name__)
MAX_BODY_BYTES = 16 * 2**20  # 16 MiB: a 128k-token prompt as ids is ~1 MB of JSON


class Server:
    """The state behind the routes: the engine, its thread, the tokenizer and chat format, the served name."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, model_name: str, stop_ids: list[int],
                 api_key: str | None = None, moderator: Any = None, max_body_bytes: int = MAX_BODY_BYTES,
                 drain_timeout: float = 30.0):
        self.engine, self.tok, self.name, self.stop_ids = engine, tokenizer, model_name, stop_ids
        self.moderator = moderator  # herd.safety.moderation.Moderator, or None
        self.chat = ChatFormat(tokenizer)
        self.api_key = api_key
        self.max_body_bytes, self.drain_timeout = max_body_bytes, drain_timeout
        self.context = engine.max_len
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.engine.loop, args=(self._stop,), name="herd-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Let the engine drain what was submitted, for at most ``drain_timeout`` seconds; then cancel the rest."""
        self._stop.set()
        self.engine.wake()
        if self._thread is not None:
            self._thread.join(timeout=self.drain_timeout)
            if self._thread.is_alive():
                log.warning("the engine did not drain in %ss: cancelling what is left", self.drain_timeout)
                self.engine.cancel_all()
                self._thread.join()

    # --- submitting and collecting ---
    def submit(self, prompts: list[list[int]], params: SamplingParams, n: int
               ) -> tuple[list[Sequence], asyncio.Queue]:
        """Submit ``n`` sequences per prompt; their deltas arrive on the queue as ``(index, Delta)``."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        seqs: list[Sequence] = []
        try:
            for p in prompts:
                for j in range(n):
                    index = len(seqs)
                    sp = params if params.seed is None else replace(params, seed=params.seed + j)
                    seqs.append(self.engine.submit(p, sp, on_delta=lambda d, i=index: loop.call_soon_threadsafe(
                        queue.put_nowait, (i, d))))
        except QueueFull as e:
            for s in seqs:
                s.cancel()
            raise APIError(f"server busy: {e}", status=503, type="server_error", code="queue_full") from None
        except ValueError as e:
            for s in seqs:
                s.cancel()
            raise APIError(str(e), "prompt") from None
        return seqs, queue

    async def events(self, request: Request, seqs: list[Sequence], queue: asyncio.Queue
                     ) -> AsyncIterator[tuple[int, Delta]]:
        """Deltas until every sequence is done; a disconnected client (or a cancelled handler) cancels them."""
        open_ = len(seqs)
        try:
            while open_:
                try:
                    index, delta = await asyncio.wait_for(queue.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                if delta.finish_reason == "error":  # the engine failed this request's sequence, not the others
                    raise APIError(f"generation failed: {delta.error}", status=500, type="server_error")
                if delta.finish_reason is not None:
                    open_ -= 1
                yield index, delta
        finally:
            for s in seqs:
                s.cancel()  # no-op for finished ones; frees the slots of abandoned ones
            self.engine.wake()


def create_app(server: Server) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server.start()
        yield
        # uvicorn has waited for the open requests (up to --drain-timeout) and cancelled the rest: a sequence still in
        # the engine has no client left (a cancelled handler's cleanup may not have run yet), so it is cancelled here.
        server.engine.cancel_all()
        server.stop()

    app = FastAPI(title="herd", lifespan=lifespan)
    if server.api_key is not None:
        app.add_middleware(_RequireKey, key=server.api_key)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return _error_response(e)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return _error_response(APIError(f"internal error: {type(e).__name__}", status=500, type="server_error"))

    async def read_body(request: Request, check_model: bool = True) -> dict:
        if request.method == "GET":
            return {}
        limit = server.max_body_bytes
        too_large = APIError(f"the request body is larger than this server's limit of {limit} bytes "
                             "(herd serve --max-body-bytes)", status=413, code="request_too_large")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():  # a chunked body has no length to check up front
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        body = await asyncio.to_thread(api.parse_body, b"".join(chunks))  # megabytes of JSON: off the event loop
        model = api.field(body, "model", str, server.name)
        if check_model and model != server.name:
            raise APIError(f"the model '{model}' does not exist (this server has '{server.name}')", "model",
                           code="model_not_found")
        return body

    # --- moderation (a no-op without a moderator) ---
    async def check_prompt(messages: list[dict]) -> None:
        if server.moderator is None:
            return
        d = await asyncio.to_thread(server.moderator.check_prompt, messages)
        if d.refuse:
            raise APIError(d.reason, "messages", code="content_filter", extra={"moderation": d.details})

    async def moderated(messages: list[dict], text: str) -> tuple[str | None, dict]:
        """(content to send or None when refused, the choice's extra fields) of a finished response."""
        if server.moderator is None:
            return text, {}
        d = await asyncio.to_thread(server.moderator.check_response, messages, text)
        if d.refuse:
            return None, {"refusal": d.reason, "moderation": d.details}
        return text + d.note, {"moderation": d.details}

    def gates(conversations: list[list[dict]]) -> list | None:
        """One StreamGate per streamed choice (None without a moderator)."""
        if server.moderator is None:
            return None
        from herd.safety.moderation import StreamGate

        return [StreamGate(server.moderator, messages) for messages in conversations]

    async def gated(gate, text: str, finish: bool) -> str | None:
        """Stream text through a gate: what may be sent now ('' while held; None: refused)."""
        if gate is None:
            return text
        out = await asyncio.to_thread(gate.push, text) if text else ""
        if out is None or not finish:
            return out
        rest = await asyncio.to_thread(gate.finish)
        return None if rest is None else out + rest

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        await read_body(request)
        return {"object": "list", "data": [{"id": server.name, "object": "model", "created": 0, "owned_by": "herd",
                                            "max_model_len": server.context}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(request)
        n = api.check_count(body, api.prompt_count(body), server.engine.max_waiting)  # before tokenising anything
        prompts = await asyncio.to_thread(api.completion_prompts, body, server.tok, server.engine.vocab)
        for _, text in prompts:
            await check_prompt([{"role": "user", "content": text}])
        echo = api.field(body, "echo", bool, False)
        logprobs = api.field(body, "logprobs", int, None)
        max_tokens = api.field(body, "max_tokens", int, 16)
        for ids, _ in prompts:
            api.check_max_tokens(max_tokens, len(ids), server.context, "max_tokens")
        params = api.sampling_params(body, max_tokens, server.stop_ids, logprobs)
        params.prompt_logprobs = echo and logprobs is not None
        stream = api.field(body, "stream", bool, False)
        seqs, queue = server.submit([ids for ids, _ in prompts], params, n)
        texts = [text for _, text in prompts for _ in range(n)]
        rid = api.new_id("cmpl")
        if stream:
            guard = gates([[{"role": "user", "content": text}] for text in texts])

            async def sse() -> AsyncIterator[str]:
                if echo:
                    for i, text in enumerate(texts):
                        yield _sse(api.envelope("text_completion", rid, server.name,
                                                [{"index": i, "text": text, "logprobs": None, "finish_reason": None}]))
                refused: set[int] = set()
                async for i, d in server.events(request, seqs, queue):
                    if i in refused:
                        continue
                    text = await gated(guard[i] if guard else None, d.text, d.finish_reason is not None)
                    if text is None:
                        refused.add(i)
                        seqs[i].cancel()
                        yield _sse(api.envelope("text_completion", rid, server.name, [
                            {"index": i, "text": "", "logprobs": None, "finish_reason": "content_filter",
                             "refusal": guard[i].decision.reason}]))
                        continue
                    lp = api.completion_logprobs(server.tok, d.logprobs) if logprobs is not None else None
                    choice = {"index": i, "text": text, "logprobs": lp,
                              "finish_reason": api.finish_reason(d.finish_reason)}
                    yield _sse(api.envelope("text_completion", rid, server.name, [choice]))
                yield "data: [DONE]\n\n"
            return StreamingResponse(_until_error(sse()), media_type="text/event-stream")
        async for _ in server.events(request, seqs, queue):
            pass
        choices = [api.completion_choice(i, s, server.tok, texts[i] if echo else None) for i, s in enumerate(seqs)]
        for c, s in zip(choices, seqs):
            content, extra = await moderated([{"role": "user", "content": texts[c["index"]]}], s.text)
            if content is None:
                c.update(text="", logprobs=None, finish_reason="content_filter", **extra)
            elif extra:
                c.update(text=(texts[c["index"]] if echo else "") + content, **extra)
        return api.envelope("text_completion", rid, server.name, choices,
                            usage=api.usage(sum(len(ids) for ids, _ in prompts), sum(len(s.output) for s in seqs)))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_body(request)
        messages = api.chat_messages(body)
        n = api.check_count(body, 1, server.engine.max_waiting)
        try:
            prompt = await asyncio.to_thread(server.chat.encode_dialog_prompt, messages)
        except ValueError as e:
            raise APIError(str(e), "messages") from None
        await check_prompt(messages)  # before anything reaches the engine
        max_tokens = api.field(body, "max_completion_tokens", int, None)
        max_tokens = api.field(body, "max_tokens", int, max_tokens)
        max_tokens = api.check_max_tokens(max_tokens, len(prompt), server.context,
                                          "max_tokens" if "max_tokens" in body else "max_completion_tokens")
        want_lp = api.field(body, "logprobs", bool, False)
        top = api.field(body, "top_logprobs", int, 0)
        if not 0 <= top <= 20:
            raise APIError(f"'top_logprobs' must be in [0, 20], got {top}", "top_logprobs")
        params = api.sampling_params(body, max_tokens, server.stop_ids, top if want_lp else None)
        stream = api.field(body, "stream", bool, False)
        options = api.field(body, "stream_options", dict, {})
        seqs, queue = server.submit([prompt], params, n)
        rid = api.new_id("chatcmpl")
        if stream:
            guard = gates([messages] * n)

            async def sse() -> AsyncIterator[str]:
                for i in range(n):
                    yield _sse(api.envelope("chat.completion.chunk", rid, server.name, [
                        {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                         "finish_reason": None}]))
                refused: set[int] = set()
                async for i, d in server.events(request, seqs, queue):
                    if i in refused:
                        continue
                    text = await gated(guard[i] if guard else None, d.text, d.finish_reason is not None)
                    if text is None:  # refused: nothing more of this choice reaches the client
                        refused.add(i)
                        seqs[i].cancel()
                        yield _sse(api.envelope("chat.completion.chunk", rid, server.name, [
                            {"index": i, "delta": {"refusal": guard[i].decision.reason}, "logprobs": None,
                             "finish_reason": "content_filter"}]))
                        continue
                    delta: dict[str, Any] = {"content": text} if text else {}
                    lp = api.chat_logprobs(server.tok, d.logprobs) if want_lp and d.logprobs else None
                    if delta or lp or d.finish_reason:
                        yield _sse(api.envelope("chat.completion.chunk", rid, server.name, [
                            {"index": i, "delta": delta, "logprobs": lp,
                             "finish_reason": api.finish_reason(d.finish_reason)}]))
                if options.get("include_usage"):
                    yield _sse(api.envelope("chat.completion.chunk", rid, server.name, [],
                                            usage=api.usage(len(prompt), sum(len(s.output) for s in seqs))))
                yield "data: [DONE]\n\n"
            return StreamingResponse(_until_error(sse()), media_type="text/event-stream")
        async for _ in server.events(request, seqs, queue):
            pass
        choices = []
        for i, s in enumerate(seqs):
            content, extra = await moderated(messages, s.text)
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if "refusal" in extra:
                message["refusal"] = extra.pop("refusal")
            choices.append({"index": i, "message": message,
                            "logprobs": api.chat_logprobs(server.tok, s.logprobs) if want_lp and content else None,
                            "finish_reason": ("content_filter" if content is None
                                              else api.finish_reason(s.finish_reason)),
                            **extra})
        return api.envelope("chat.completion", rid, server.name, choices,
                            usage=api.usage(len(prompt), sum(len(s.output) for s in seqs)))

    @app.post("/v1/moderations")
    async def moderations(request: Request):
        body = await read_body(request, check_model=False)
        if server.moderator is None or server.moderator.guard is None:
            raise APIError("this server has no guard model (start it with --guard GUARD_DIR)", status=404,
                           code="not_found")
        inputs = api.field(body, "input", (str, list))
        inputs = [inputs] if isinstance(inputs, str) else inputs
        if not inputs or not all(isinstance(x, str) for x in inputs):
            raise APIError("'input' must be a string or a non-empty list of strings", "input")
        results = await asyncio.to_thread(server.moderator.moderations, inputs)
        return {"id": api.new_id("modr"), "model": body.get("model") or "llama-guard-2", "results": results}

    return app


class _RequireKey:
    """Every route but ``/health`` needs ``Authorization: Bearer KEY`` (``/docs``, ``/openapi.json`` and unknown
    paths included). ``hmac.compare_digest`` takes the same time wherever the first wrong byte is."""

    def __init__(self, app: ASGIApp, key: str):
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] != "/health":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                response = _error_response(APIError("invalid or missing API key", status=401,
                                                    type="authentication_error", code="invalid_api_key"))
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


class _AsciiJSON(JSONResponse):
    def render(self, content: Any) -> bytes:  # escaped: an error quoting client text can never fail to encode
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def _error_response(e: APIError) -> JSONResponse:
    return _AsciiJSON(e.body(), status_code=e.status)


async def _until_error(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """A stream whose generation fails after the 200 was sent ends with an error event and ``[DONE]`` (as vLLM's
    do), rather than a connection cut mid-stream."""
    try:
        async for event in events:
            yield event
    except APIError as e:
        yield _sse(e.body())
        yield "data: [DONE]\n\n"


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"
