"""Generation from Python: a batch of prompts completed together, or one prompt streamed as text.

    model, tok = herd.load_model("run/model"), herd.Tokenizer("run/model")
    outs = generate(model, [tok.encode("def ", bos=True)], max_new_tokens=32)             # token ids
    seqs = complete(model, [ids], SamplingParams(temperature=0.7, stop=("\\n\\n",)), tok)  # .text, .logprobs, ...
    for piece in stream(model, tok, ids, SamplingParams(max_new_tokens=64)): print(piece, end="")

All three run on ``Engine`` (engine.py): a preallocated KV cache holding only the KV heads, one prefill per prompt,
then one batched decode step per token, every prompt at its own positions (prompts of different lengths need no
padding).
"""

from __future__ import annotations

from collections.abc import Iterator
from collections.abc import Sequence as Seq
from dataclasses import replace

from herd.errors import UserError
from herd.inference.engine import Delta, Engine, Sequence
from herd.inference.sampling import SamplingParams
from herd.model.transformer import Transformer
from herd.tokenizer.tokenizer import Tokenizer


def complete(model: Transformer, prompts: Seq[Seq[int]], params: SamplingParams,
             tokenizer: Tokenizer | None = None, compile: bool = False, max_batch: int = 64) -> list[Sequence]:
    """Complete every prompt (token ids) and return the finished sequences: ``output`` ids, ``text`` (with a
    tokenizer), ``logprobs``, ``finish_reason``. With ``params.seed`` set, prompt i samples with seed + i.

    At most ``max_batch`` sequences decode together (the KV cache has that many rows); the others wait and take a row
    as one finishes. Any number of prompts is accepted."""
    if not prompts:
        raise UserError("no prompts given")
    longest = max(len(p) for p in prompts)
    engine = Engine(model, tokenizer, max_batch=min(max_batch, len(prompts)), max_waiting=len(prompts),
                    max_len=min(longest + max(params.max_new_tokens, 1), model.args.max_seq_len), compile=compile)
    try:
        seqs = [engine.submit(p, params if params.seed is None else replace(params, seed=params.seed + i))
                for i, p in enumerate(prompts)]
        engine.run()
        return seqs
    finally:
        engine.close()


def generate(model: Transformer, prompts: Seq[Seq[int]], max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, stop_ids: Seq[int] = (), seed: int | None = None
             ) -> list[list[int]]:
    """New token ids for each prompt (without the prompt; generation stops at, and excludes, a stop id)."""
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                            stop_ids=tuple(stop_ids), seed=seed)
    return [seq.output for seq in complete(model, prompts, params)]


def stream(model: Transformer, tokenizer: Tokenizer, prompt: Seq[int], params: SamplingParams) -> Iterator[str]:
    """Yield the completion of one prompt as text pieces, each made of complete UTF-8 characters."""
    pieces: list[Delta] = []
    engine = Engine(model, tokenizer, max_batch=1,
                    max_len=min(len(prompt) + max(params.max_new_tokens, 1), model.args.max_seq_len))
    try:
        seq = engine.submit(prompt, params, on_delta=pieces.append)
        while not seq.done:
            engine.step()
            for delta in pieces:
                if delta.text:
                    yield delta.text
            pieces.clear()
    finally:
        engine.close()
