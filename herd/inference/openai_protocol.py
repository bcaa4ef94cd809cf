"""The OpenAI wire format: request validation into ``SamplingParams`` and response bodies, without any HTTP.

Requests are validated by hand (not by pydantic models) so every error names the field the way the OpenAI API does
(``{"error": {"message", "type", "param", "code"}}``) and the status is 400, never a 422 or a 500: a body that is
not UTF-8 JSON, nested too deep, or holds a string with a lone UTF-16 surrogate (``"\\ud800"``, which no UTF-8
text can hold) is refused before any field is read; NaN, infinities and out-of-range numbers are refused per field.

Seeds follow vLLM: integers in [-2**63, 2**63 - 1]; the generator is seeded with a 64-bit hash of the whole
integer (see ``sampling.generator_seed``), so seeds that differ only above bit 32 still sample differently on CPU.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any

from herd.inference.engine import Sequence
from herd.inference.sampling import SamplingParams, TokenLogprob
from herd.tokenizer.tokenizer import Tokenizer

_MISSING = object()
SEED_RANGE = (-(2**63), 2**63 - 1)  # vLLM's (a torch int64)
_SURROGATE = re.compile("[\ud800-\udfff]")  # after JSON decoding, any surrogate left is a lone one


class APIError(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 type: str = "invalid_request_error", code: str | None = None, extra: dict | None = None):
        super().__init__(message)
        self.status, self.param, self.type, self.code = status, param, type, code
        self.extra = extra or {}  # more fields for the error object (e.g. a refusal's "moderation" details)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code,
                          **self.extra}}


def parse_body(raw: bytes) -> dict:
    """The JSON object of a request body, or an ``APIError`` (400) saying what is wrong with it."""
    try:
        body = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise APIError("the request body is not UTF-8") from None
    except json.JSONDecodeError as e:
        raise APIError(f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise APIError("the request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object")
    bad = _lone_surrogate(body)
    if bad is not None:
        raise APIError(f"'{bad}' holds a lone UTF-16 surrogate (not valid Unicode text)", bad)
    return body


def _lone_surrogate(body: dict) -> str | None:
    """The path (``messages[0].content``) of a string, key or value, holding a lone surrogate, or None. Iterative:
    the depth is bounded only by what ``json.loads`` accepted."""
    stack: list[tuple[str, Any]] = [("", body)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value):
                return path
        elif isinstance(value, dict):
            for k, v in value.items():
                sub = f"{path}.{k}" if path else k
                if _SURROGATE.search(k):
                    return _SURROGATE.sub("\ufffd", sub)  # the report must itself be valid text
                stack.append((sub, v))
        elif isinstance(value, list):  # numbers are skipped without a path each: id lists can be millions long
            stack.extend((f"{path}[{i}]", v) for i, v in enumerate(value) if isinstance(v, (str, list, dict)))
    return None


def field(body: dict, name: str, kind: type | tuple[type, ...], default: Any = _MISSING) -> Any:
    """``body[name]`` checked against ``kind`` (ints are accepted as floats; booleans are never numbers)."""
    if name not in body or body[name] is None:
        if default is _MISSING:
            raise APIError(f"'{name}' is required", name)
        return default
    value = body[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        try:
            value = float(value)
        except OverflowError:
            raise APIError(f"'{name}' is out of range", name) from None
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise APIError(f"'{name}' must be of type {names}, got {type(value).__name__}", name)
    return value


def sampling_params(body: dict, max_tokens: int, stop_ids: list[int], logprobs: int | None) -> SamplingParams:
    """The sampling fields shared by completions and chat completions."""
    stop = field(body, "stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise APIError("'stop' must be a string or a list of at most 4 non-empty strings", "stop")
    params = SamplingParams(
        max_new_tokens=max_tokens,
        temperature=field(body, "temperature", float, 1.0),
        top_p=field(body, "top_p", float, 1.0),
        top_k=field(body, "top_k", int, 0),
        frequency_penalty=field(body, "frequency_penalty", float, 0.0),
        presence_penalty=field(body, "presence_penalty", float, 0.0),
        seed=check_seed(field(body, "seed", int, None)),
        stop_ids=tuple(stop_ids),
        stop=tuple(stop),
        logprobs=logprobs,
    )
    try:
        params.validate()
    except ValueError as e:
        raise APIError(str(e), str(e).split()[0]) from None
    return params


def check_seed(seed: int | None) -> int | None:
    if seed is not None and not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise APIError(f"'seed' must be in [-2**63, 2**63 - 1], got {seed}", "seed")
    return seed


def check_count(body: dict, prompts: int = 1, capacity: int | None = None) -> int:
    """``n``, checked; with ``capacity`` (how many sequences the server can ever hold queued), a request asking for
    more completions (prompts x n) than that is refused: it could never be admitted, so a 503 would be a lie."""
    n = field(body, "n", int, 1)
    if not 1 <= n <= 16:
        raise APIError(f"'n' must be in [1, 16], got {n}", "n")
    if capacity is not None and prompts * n > capacity:
        raise APIError(f"this request asks for {prompts * n} completions ({prompts} prompt(s) x n={n}); this server "
                       f"queues at most {capacity} at once", "n" if n > 1 else "prompt")
    return n


def prompt_count(body: dict) -> int:
    """How many prompts ``prompt`` holds (before tokenising any): a string or a flat id list is one."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return len(prompt)
    return 1


def check_max_tokens(value: int | None, prompt_len: int, context: int, name: str) -> int:
    """``max_tokens`` if given (checked against the context), else what the context leaves."""
    room = context - prompt_len
    if value is None:
        if room <= 0:
            raise APIError(f"the prompt has {prompt_len} tokens; the context is {context}", "messages",
                           code="context_length_exceeded")
        return room
    if value < 0:
        raise APIError(f"'{name}' must be >= 0, got {value}", name)
    if value > room:
        raise APIError(f"the prompt ({prompt_len} tokens) plus {name}={value} exceeds the context of {context} "
                       "tokens", name, code="context_length_exceeded")
    return value


def completion_prompts(body: dict, tok: Tokenizer, vocab_size: int) -> list[tuple[list[int], str]]:
    """``prompt`` as (ids, text) pairs: a string, a list of strings, a list of ids, or a list of id lists.
    Strings get BOS (as the Llama 3 tokenizer does in the reference servers); id lists are used as given."""
    prompt = field(body, "prompt", (str, list))
    if isinstance(prompt, str):
        prompts: list = [prompt]
    elif prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompts = [prompt]
    else:
        prompts = prompt
    out = []
    for p in prompts:
        if isinstance(p, str):
            out.append((tok.encode(p, bos=True), p))
        elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            if not all(0 <= t < vocab_size for t in p):
                raise APIError(f"token ids must be in [0, {vocab_size})", "prompt")
            out.append((p, tok.decode(p)))
        else:
            raise APIError("'prompt' must be a non-empty string, list of strings, list of token ids, or list of "
                           "token-id lists", "prompt")
    if not out:
        raise APIError("'prompt' is empty", "prompt")
    return out


def chat_messages(body: dict) -> list[dict]:
    messages = field(body, "messages", list)
    if not messages:
        raise APIError("'messages' must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise APIError(f"messages[{i}] must be an object with 'role' and 'content'", f"messages[{i}]")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text is understood
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise APIError(f"messages[{i}].content: only parts of type 'text' are supported",
                               f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise APIError(f"messages[{i}].content must be a string", f"messages[{i}].content")
        out.append({"role": m["role"], "content": content})
    return out


# --- responses ---
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def token_text(tok: Tokenizer, token: int) -> str:
    return tok.decode_bytes([token]).decode("utf-8", errors="replace")


def completion_logprobs(tok: Tokenizer, entries: list[TokenLogprob], text_start: int = 0) -> dict:
    """The completions API's logprobs object (``tokens``, ``token_logprobs``, ``top_logprobs``, ``text_offset``)."""
    tokens, lps, tops, offsets = [], [], [], []
    offset = text_start
    for e in entries:
        text = token_text(tok, e.token)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        lps.append(e.logprob)
        tops.append({token_text(tok, t): lp for t, lp in e.top} if e.top else None)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(tok: Tokenizer, entries: list[TokenLogprob]) -> dict:
    def item(token: int, logprob: float) -> dict:
        text = token_text(tok, token)
        return {"token": text, "logprob": logprob, "bytes": list(tok.decode_bytes([token]))}
    return {"content": [{**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                        for e in entries]}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_choice(index: int, seq: Sequence, tok: Tokenizer, echo_text: str | None) -> dict:
    text = (echo_text or "") + seq.text
    logprobs = None
    if seq.params.logprobs is not None:
        if echo_text is not None:
            # The first prompt token has no logprob (nothing precedes it): OpenAI reports null there.
            first = TokenLogprob(seq.prompt[0], 0.0, [])
            lp = completion_logprobs(tok, [first, *(seq.prompt_logprobs or []), *seq.logprobs])
            lp["token_logprobs"][0] = None
            lp["top_logprobs"][0] = None
        else:
            lp = completion_logprobs(tok, seq.logprobs)
        logprobs = lp
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason(seq.finish_reason)}


def finish_reason(reason: str | None) -> str | None:
    return None if reason is None else ("length" if reason == "length" else "stop")


def envelope(kind: str, rid: str, model: str, choices: list[dict], **extra: Any) -> dict:
    return {"id": rid, "object": kind, "created": int(time.time()), "model": model, "choices": choices, **extra}
