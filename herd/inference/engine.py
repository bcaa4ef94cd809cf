"""The generation engine: continuous batching over a fixed set of KV-cache slots.

Every sequence owns one row ("slot") of a preallocated cache ``[max_batch, n_kv_heads, max_len, hd]`` and keeps its
own positions there, starting at 0, so no padding is ever needed. ``step()`` first admits waiting sequences into
free slots (one prefill each, written into that row only), then runs one decode step for every running sequence
together. Sequences join and leave between steps: this is what lets a server share decode steps between requests.

Batch invariance (the default): the decode step always runs on all ``max_batch`` rows (idle rows compute a dummy
token), and the attended cache width is rounded up to a multiple of 64. A matrix multiply gives a row the same bits
whatever the other rows hold, but not whatever the batch *size* is (different kernels), so with fixed shapes a
request's greedy output does not depend on what else is being served. The price is paid at low load: one request
on an 8-slot engine computes 8 rows. ``batch_invariant=False`` decodes only rows up to the highest busy slot (slots
are handed out lowest first), which is faster when lightly loaded; outputs then agree with a solo run only up to
fp32 rounding (a greedy tie broken differently is possible, if rare).

Fault isolation: one sequence's failure stays its own. A prompt whose prefill raises, a row whose logits are not
finite (a NaN from the model), a draw or a decode that raises: that sequence finishes with ``finish_reason ==
"error"`` (and ``error`` says why) and the others go on unchanged. Only a failed batched forward fails every
running sequence (nothing can be attributed to one row there).

A model whose vocabulary is padded beyond its tokenizer's (common in real checkpoints: embeddings rounded up to a
multiple of 64 or 128) is served on the tokenizer's ids only: prompts with padding ids are refused, and the logits of
the padding ids are dropped before anything is sampled or scored (as vLLM does), so they are never generated.

Thread use: ``submit`` and ``Sequence.cancel`` may be called from any thread; ``step`` / ``loop`` from one thread.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections import deque
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import torch
from torch import Tensor

from herd.errors import UserError
from herd.inference.sampling import (
    SamplingParams,
    TokenLogprob,
    apply_penalties,
    generator_seed,
    sample,
    token_logprobs,
)
from herd.model.masks import decode_mask
from herd.model.transformer import KVCache, Transformer
from herd.tokenizer.tokenizer import StreamDecoder, Tokenizer

log = logging.getLogger(__name__)
WIDTH_MULTIPLE = 64


class QueueFull(RuntimeError):
    """The engine's waiting queue is full; try again later (a server answers 503)."""


@dataclass
class Delta:
    """What one step produced for one sequence: new text (only complete characters, never past a stop string),
    new token ids with their log-probabilities, and the finish reason once it is done."""

    text: str = ""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None  # "stop", "length", "cancelled", "error"
    error: str | None = None  # with finish_reason "error": what failed (for the log; a server shows it as a 500)


class Sequence:
    """One prompt being completed. Read ``output``, ``text``, ``logprobs``, ``prompt_logprobs``, ``finish_reason``.

    ``output`` excludes a final stop id; ``logprobs`` (when asked for) has one entry per sampled token, the stop id
    included."""

    def __init__(self, prompt: list[int], params: SamplingParams, on_delta: Callable[[Delta], None] | None,
                 tokenizer: Tokenizer | None, device: torch.device):
        self.prompt, self.params, self.on_delta = prompt, params, on_delta
        self.output: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.prompt_logprobs: list[TokenLogprob] | None = None
        self.text = ""
        self.finish_reason: str | None = None
        self.error: str | None = None  # why it finished with "error"
        self.cancelled = False
        self.slot: int | None = None
        self.length = 0  # tokens in this sequence's cache row
        self.last: int = 0  # the newest token, to be written to the cache by the next decode step
        self._decoder = StreamDecoder(tokenizer) if tokenizer is not None else None
        self._pending = ""  # decoded text held back because it may be the start of a stop string
        seed = generator_seed(params.seed) if params.seed is not None else secrets.randbits(64)
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.counts: Tensor | None = None  # generated-token counts, only when a penalty needs them

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        """Stop generating; the slot is freed at the next step (safe from any thread)."""
        self.cancelled = True

    # --- text: incremental decoding and stop strings ---
    def _push_text(self, token: int | None, delta: Delta) -> bool:
        """Decode ``token`` (None: flush) into ``delta.text``; True when a stop string was hit."""
        if self._decoder is None:
            return False
        self._pending += self._decoder.push(token) if token is not None else self._decoder.flush()
        stops = self.params.stop
        hits = [i for i in (self._pending.find(s) for s in stops) if i >= 0]
        if hits:
            self._emit_text(self._pending[: min(hits)], delta)
            self._pending = ""
            return True
        # Hold back the longest tail that could still grow into a stop string (none once flushed).
        hold = 0 if token is None else _longest_stop_prefix(self._pending, stops)
        self._emit_text(self._pending[: len(self._pending) - hold], delta)
        self._pending = self._pending[len(self._pending) - hold:]
        return False

    def _emit_text(self, text: str, delta: Delta) -> None:
        self.text += text
        delta.text += text


def _longest_stop_prefix(text: str, stops: Seq[str]) -> int:
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


class Engine:
    """Continuous-batching generation over one model (see the module docstring).

    ``max_len`` is the cache length per sequence (prompt + new tokens), at most the model's ``max_seq_len``.
    ``max_waiting`` bounds the queue of sequences not yet admitted (``submit`` raises ``QueueFull`` beyond it).
    ``vocab`` is the number of token ids served: the model's vocabulary, or the tokenizer's when that is smaller.
    """

    def __init__(self, model: Transformer, tokenizer: Tokenizer | None = None, max_batch: int = 8,
                 max_len: int | None = None, max_waiting: int = 256, compile: bool = False,
                 batch_invariant: bool = True):
        # The engine borrows the model: it never switches its mode or attaches state to it. The KV cache is the
        # engine's own and is passed to every forward, so the caller can sample from a policy it is training.
        for name, value, least in (("max_batch", max_batch, 1), ("max_len", max_len, 1),
                                   ("max_waiting", max_waiting, 0)):
            if value is not None and (not isinstance(value, int) or value < least):
                raise UserError(f"{name} must be an integer >= {least}, got {value}")
        self.model = model
        self.tokenizer = tokenizer
        self.vocab = model.args.vocab_size if tokenizer is None else min(model.args.vocab_size, tokenizer.n_words)
        self.device = next(model.parameters()).device
        self.max_len = min(max_len or model.args.max_seq_len, model.args.max_seq_len)
        self.max_waiting = max_waiting
        self.batch_invariant = batch_invariant
        self.slots: list[Sequence | None] = [None] * max_batch
        self.waiting: deque[Sequence] = deque()
        self._wake = threading.Condition()
        self.cache: KVCache | None = KVCache.for_model(model, max_batch, self.max_len)
        # Compiling the decode step pays off on GPU (fused small kernels, CUDA graphs); shapes vary with the
        # attended width, hence dynamic.
        self._decode_forward = torch.compile(model, dynamic=True) if compile else model

    # --- the public side ---
    def submit(self, prompt: Seq[int], params: SamplingParams | None = None,
               on_delta: Callable[[Delta], None] | None = None) -> Sequence:
        params = params or SamplingParams()
        params.validate()
        prompt = list(prompt)
        vocab = self.vocab
        if not prompt:
            raise UserError("the prompt is empty (it needs at least one token, e.g. BOS)")
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in prompt):
            raise UserError(f"prompt token ids must be integers in [0, {vocab})")
        if len(prompt) > self.max_len or (len(prompt) == self.max_len and params.max_new_tokens > 0):
            raise UserError(f"a prompt of {len(prompt)} tokens leaves no room in the context of {self.max_len}")
        if params.stop and self.tokenizer is None:
            raise UserError("stop strings need an engine with a tokenizer")
        seq = Sequence(prompt, params, on_delta, self.tokenizer, self.device)
        with self._wake:
            if len(self.waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting")
            self.waiting.append(seq)
            self._wake.notify()
        return seq

    @property
    def running(self) -> list[Sequence]:
        return [s for s in self.slots if s is not None]

    def has_work(self) -> bool:
        return bool(self.waiting) or any(s is not None for s in self.slots)

    def run(self) -> None:
        """Step until every submitted sequence is done."""
        while self.has_work():
            self.step()

    def loop(self, stop: threading.Event) -> None:
        """Serve forever from one thread: step while there is work, sleep until ``submit`` wakes it; after ``stop``
        is set, finish (drain) what was submitted, then return."""
        while True:
            with self._wake:
                while not self.has_work() and not stop.is_set():
                    self._wake.wait(timeout=0.5)
            if not self.has_work() and stop.is_set():
                return
            try:
                self.step()
            except Exception as e:  # never let one bad step kill the server: fail what was running, keep going
                log.exception("generation step failed")
                for seq in self.running:
                    self._fail(seq, f"the batched decode step failed: {type(e).__name__}: {e}")

    def cancel_all(self) -> None:
        """Cancel every waiting and running sequence (safe from any thread); each ends with "cancelled"."""
        with self._wake:
            for seq in [*self.waiting, *self.running]:
                seq.cancel()
            self._wake.notify_all()

    def wake(self) -> None:
        with self._wake:
            self._wake.notify_all()

    def close(self) -> None:
        """Release the KV cache (the model is untouched)."""
        self.cache = None

    # --- one step ---
    @torch.inference_mode()
    def step(self) -> None:
        if self.cache is None:
            raise RuntimeError("the engine is closed")
        for seq in self.running:
            if seq.cancelled:
                self._finish(seq, "cancelled", Delta())
        admitted = []
        with self._wake:
            cancelled = [seq for seq in self.waiting if seq.cancelled]  # wherever they wait, not only at the head
            if cancelled:
                self.waiting = deque(seq for seq in self.waiting if not seq.cancelled)
            while self.waiting and None in self.slots:
                seq = self.waiting.popleft()
                seq.slot = self.slots.index(None)
                self.slots[seq.slot] = seq
                admitted.append(seq)
        for seq in cancelled:  # its consumer still hears that it ended
            self._finish(seq, "cancelled", Delta())
        last_logits = [self._isolated(seq, self._prefill, seq) for seq in admitted]
        sampling = [(seq, lg) for seq, lg in zip(admitted, last_logits) if lg is not None]
        if sampling:
            self._accept([s for s, _ in sampling], torch.stack([lg for _, lg in sampling]))
        # Newcomers decode in this step too: a row left out of a decode step would be treated as idle (its position 0
        # overwritten by the dummy token).
        running = [s for s in self.running if not s.done]
        if running:
            self._decode(running)

    def _isolated(self, seq: Sequence, fn: Callable, *args):
        """``fn(*args)``; if it raises, only ``seq`` fails (finish reason "error"), and None is returned."""
        try:
            return fn(*args)
        except Exception as e:
            self._fail(seq, e)
            return None

    def _fail(self, seq: Sequence, e: BaseException | str) -> None:
        if isinstance(e, BaseException):
            log.error("sequence failed: %s", e, exc_info=e)
            e = f"{type(e).__name__}: {e}"
        else:
            log.error("sequence failed: %s", e)
        if not seq.done:
            seq.error = e
            self._finish(seq, "error", Delta(error=e))

    def _prefill(self, seq: Sequence) -> Tensor | None:
        """Write the prompt into the sequence's cache row; the logits of its last position (None when it asks for
        no new tokens and is finished here)."""
        P = len(seq.prompt)
        tokens = torch.tensor([seq.prompt], device=self.device)
        pos = torch.arange(P, device=self.device)[None]
        causal = torch.ones(P, P, dtype=torch.bool, device=self.device).tril()[None, None]
        want_prompt = seq.params.prompt_logprobs
        logits = self.model(tokens, positions=pos, mask=causal, cache=self.cache.rows(seq.slot, 1), cache_pos=pos,
                            last_only=not want_prompt)[0]
        seq.length = P
        if want_prompt:
            seq.prompt_logprobs = token_logprobs(logits[:-1, : self.vocab], tokens[0, 1:], seq.params.logprobs or 0)
        if seq.params.max_new_tokens == 0:
            self._finish(seq, "length", Delta())
            return None
        return logits[-1]

    def _decode(self, running: list[Sequence]) -> None:
        n = len(self.slots) if self.batch_invariant else max(seq.slot for seq in running) + 1
        tokens = torch.zeros(n, 1, dtype=torch.long)
        pos = torch.zeros(n, 1, dtype=torch.long)  # idle rows: a dummy token at position 0 of their free row
        for seq in running:
            tokens[seq.slot, 0], pos[seq.slot, 0] = seq.last, seq.length
        longest = max(seq.length for seq in running) + 1
        width = min(-(-longest // WIDTH_MULTIPLE) * WIDTH_MULTIPLE, self.max_len)
        tokens, pos = tokens.to(self.device), pos.to(self.device)
        mask = decode_mask(pos, torch.ones(n, width, dtype=torch.bool, device=self.device))
        logits = self._decode_forward(tokens, positions=pos, mask=mask, cache=self.cache.rows(0, n),
                                      cache_pos=pos)[:, -1]
        for seq in running:
            seq.length += 1
        rows = torch.tensor([seq.slot for seq in running], device=self.device)
        self._accept(running, logits.index_select(0, rows))

    def _accept(self, seqs: list[Sequence], logits: Tensor) -> None:
        """Sample the next token of every sequence in ``seqs`` from its row of ``logits [n, V]`` (one batched draw,
        one host transfer), then report each. Logits of padding ids (beyond ``self.vocab``) are dropped first. A row
        whose logits are not finite fails only its sequence; if the batched draw raises, each row is drawn alone so
        that only the sequences that fail on their own fail."""
        logits = logits[:, : self.vocab]
        states = [s.generator.get_state() for s in seqs]  # a failed batched draw may have advanced some of them
        try:
            tokens, broken, logprobs = self._draw(seqs, logits)
        except Exception:
            log.exception("batched sampling failed; sampling each sequence alone")
            tokens, broken, logprobs = [], [], {}
            for i, seq in enumerate(seqs):
                seq.generator.set_state(states[i])
                one = self._isolated(seq, self._draw, [seq], logits[i: i + 1])
                tokens.append(one[0][0] if one else 0)
                broken.append(one[1][0] if one else False)
                if one and 0 in one[2]:
                    logprobs[i] = one[2][0]
        for i, (seq, token, bad) in enumerate(zip(seqs, tokens, broken)):
            if seq.done:  # failed while drawing alone
                continue
            if bad:
                self._fail(seq, "the model produced non-finite logits (NaN or inf) for this sequence")
                continue
            self._isolated(seq, self._accept_one, seq, token, logprobs.get(i))

    def _draw(self, seqs: list[Sequence], logits: Tensor) -> tuple[list[int], list[bool], dict[int, TokenLogprob]]:
        """(token per row, whether the row's logits were broken, logprobs of the rows that asked for them)."""
        scores = logits
        if any(s.params.frequency_penalty or s.params.presence_penalty for s in seqs):
            scores = logits.float().clone()
            for i, seq in enumerate(seqs):
                p = seq.params
                if p.frequency_penalty or p.presence_penalty:
                    if seq.counts is None:
                        seq.counts = torch.zeros(logits.size(-1), dtype=torch.float32, device=logits.device)
                    scores[i] = apply_penalties(scores[i], seq.counts, p.frequency_penalty, p.presence_penalty)
        params = [s.params for s in seqs]
        tokens = sample(scores, [p.temperature for p in params], [p.top_p for p in params],
                        [p.top_k for p in params], [s.generator for s in seqs])
        broken = torch.isnan(scores).any(dim=-1) | torch.isposinf(scores).any(dim=-1)
        scored = [i for i, p in enumerate(params) if p.logprobs is not None]
        logprobs: dict[int, TokenLogprob] = {}
        if scored:
            k = max(params[i].logprobs for i in scored)
            index = torch.tensor(scored, device=logits.device)
            found = token_logprobs(logits.index_select(0, index), tokens.index_select(0, index), k)
            for i, lp in zip(scored, found):
                lp.top = lp.top[: params[i].logprobs]
                logprobs[i] = lp
        tokens_and_broken = torch.stack([tokens, broken.long()]).tolist()  # the one host transfer
        return tokens_and_broken[0], [bool(b) for b in tokens_and_broken[1]], logprobs

    def _accept_one(self, seq: Sequence, token: int, lp: TokenLogprob | None) -> None:
        p, delta = seq.params, Delta()
        if lp is not None:  # a stop id is scored like any sampled token (lm-eval counts on one per step)
            seq.logprobs.append(lp)
            delta.logprobs.append(lp)
        if token in p.stop_ids:
            seq._push_text(None, delta)
            return self._finish(seq, "stop", delta)
        seq.output.append(token)
        seq.last = token
        delta.tokens.append(token)
        if seq.counts is not None:
            seq.counts[token] += 1
        if seq._push_text(token, delta):
            return self._finish(seq, "stop", delta)
        if len(seq.output) >= p.max_new_tokens or seq.length + 1 >= self.max_len:
            seq._push_text(None, delta)
            return self._finish(seq, "length", delta)
        self._report(seq, delta)

    def _finish(self, seq: Sequence, reason: str, delta: Delta) -> None:
        seq.finish_reason = delta.finish_reason = reason
        if seq.slot is not None:
            self.slots[seq.slot] = None
        self._report(seq, delta)

    def _report(self, seq: Sequence, delta: Delta) -> None:
        if seq.on_delta is not None:
            try:
                seq.on_delta(delta)
            except Exception:  # a consumer's failure (e.g. a closed event loop) must not stop the others
                log.exception("on_delta callback failed; cancelling the sequence")
                seq.cancel()
