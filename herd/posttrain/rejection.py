"""Rejection sampling (Llama 3 §4.2.2): K responses per prompt from the policy, the reward model keeps the best.

``herd rejection-sample --policy DIR --reward DIR --prompts FILE.jsonl --samples K --out FILE.jsonl``

Every prompt is submitted K times to herd's continuous-batching ``Engine`` (sample j of prompt i seeded with
``seed + i * K + j``, so a run is reproducible and its samples independent); sequences join and leave the batch as
they finish, so short answers never wait for long ones. The reward model (``herd.posttrain.reward``) then scores the
K dialogs of every prompt in batches, and the best non-empty response is kept. The output is SFT data
(``{"messages": [...prompt, {"role": "assistant", "content": best}], "score": s, "scores": [all K]}``), which
``herd sft`` reads directly. Meta's two throughput tricks are not reproduced: herd's engine gives each sample its own
prefill (no shared prompt KV pages) and reserves a full ``max_len`` row per sequence.

Prompts: one per line, ``{"messages": [...]}`` (ending with a user turn) or ``{"prompt": str}`` (one user turn).
The policy object can be one already in memory (PPO, iterated rounds): ``sample_best`` takes models, not paths.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from herd.data.readers import DataError
from herd.inference.engine import Engine
from herd.inference.sampling import SamplingParams
from herd.io import atomic_write_text
from herd.model.transformer import Transformer
from herd.tokenizer import ChatFormat, Tokenizer

Messages = list[dict]
ScoreFn = Callable[[list[Messages]], list[float]]  # dialogs (prompt + response) -> one score each


def read_prompts(path: str | Path) -> list[Messages]:
    """The prompts of a JSONL file as message lists; a bad row is a ``DataError`` naming its line."""
    from herd.posttrain.data import _jsonl, check_messages

    out = []
    for n, obj in _jsonl(path):
        where = f"{path}:{n}"
        if isinstance(obj, dict) and isinstance(obj.get("prompt"), str):
            if not obj["prompt"].strip():
                raise DataError(f"{where}: 'prompt' is empty")
            out.append([{"role": "user", "content": obj["prompt"]}])
            continue
        if not isinstance(obj, dict) or "messages" not in obj:
            raise DataError(f"{where}: expected an object with 'messages' (a list) or 'prompt' (a string)")
        messages = check_messages(obj["messages"], where, need_assistant=False)
        if messages[-1]["role"] in ("assistant", "system"):
            raise DataError(f"{where}: the prompt ends with a {messages[-1]['role']!r} message; it must end with "
                            "the turn the policy answers (user or tool)")
        out.append(messages)
    return out


def sample_responses(policy: Transformer, tokenizer: Tokenizer, prompts: Sequence[Messages], k: int,
                     params: SamplingParams, max_batch: int = 32, seed: int = 0,
                     progress: bool = False) -> tuple[list[list[str]], int]:
    """``k`` sampled responses for every prompt (``[prompt][sample]`` texts) and the number of tokens generated."""
    from tqdm import tqdm

    chat = ChatFormat(tokenizer)
    encoded = [chat.encode_dialog_prompt(p) for p in prompts]
    max_len = min(max(len(e) for e in encoded) + params.max_new_tokens + 1, policy.args.max_seq_len)
    for i, e in enumerate(encoded):
        if len(e) >= max_len:
            raise DataError(f"prompt {i + 1} has {len(e)} tokens: no room for a response in the model's context "
                            f"of {policy.args.max_seq_len}")
    if not params.stop_ids:
        params = replace(params, stop_ids=tuple(tokenizer.stop_tokens))
    engine = Engine(policy, tokenizer, max_batch=max_batch, max_len=max_len, max_waiting=len(encoded) * k)
    bar = tqdm(total=len(encoded) * k, desc="sampling", unit="sample", disable=not progress, dynamic_ncols=True)
    try:
        seqs = [[engine.submit(ids, replace(params, seed=seed + i * k + j))
                 for j in range(k)] for i, ids in enumerate(encoded)]
        done = 0
        while engine.has_work():
            engine.step()
            finished = sum(s.done for row in seqs for s in row)
            bar.update(finished - done)
            done = finished
    finally:
        engine.close()
        bar.close()
    return [[s.text for s in row] for row in seqs], sum(len(s.output) for row in seqs for s in row)


@dataclass
class Selection:
    prompt: Messages
    responses: list[str]
    scores: list[float]
    best: int | None  # index of the kept response; None when every response was empty

    def row(self) -> dict:
        best = self.responses[self.best]
        return {"messages": self.prompt + [{"role": "assistant", "content": best}],
                "score": self.scores[self.best], "scores": self.scores}


def select_best(prompts: Sequence[Messages], responses: Sequence[Sequence[str]], score: ScoreFn
                ) -> list[Selection]:
    """Score every (prompt, response) dialog with ``score`` and keep each prompt's highest-scored non-empty
    response (the first of equal scores)."""
    dialogs = [p + [{"role": "assistant", "content": r}] for p, rs in zip(prompts, responses) for r in rs]
    flat = score(dialogs)
    out, at = [], 0
    for prompt, rs in zip(prompts, responses):
        scores = [float(s) for s in flat[at:at + len(rs)]]
        at += len(rs)
        candidates = [j for j, r in enumerate(rs) if r.strip()]
        best = max(candidates, key=lambda j: scores[j]) if candidates else None
        out.append(Selection(list(prompt), list(rs), scores, best))
    return out


def reward_model_scorer(model, tokenizer: Tokenizer, batch_size: int) -> ScoreFn:
    from herd.posttrain.reward import score_dialogs

    return lambda dialogs: score_dialogs(model, tokenizer, dialogs, batch_size=batch_size)


def rejection_sample(policy_dir: str | Path, reward_dir: str | Path, prompts_path: str | Path, k: int,
                     out: str | Path, temperature: float = 1.0, top_p: float = 1.0, max_tokens: int = 256,
                     batch_size: int = 32, seed: int = 0, device: str | None = None) -> dict:
    """The CLI's work: load both models, sample, score, write ``out`` (atomically); a summary with throughput."""
    from herd.checkpoint import load_model
    from herd.errors import UserError
    from herd.posttrain.reward import load_reward_model

    if k < 1:
        raise UserError(f"--samples must be at least 1, got {k}")
    if temperature <= 0 and k > 1:
        raise UserError("--temperature 0 (greedy) gives K identical samples; use a positive temperature")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    prompts = read_prompts(prompts_path)
    policy = load_model(policy_dir, dtype=dtype, device=device).eval()
    tokenizer = Tokenizer(policy_dir)
    reward_model, reward_tok = load_reward_model(reward_dir, dtype=dtype, device=device)
    params = SamplingParams(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p)

    t0 = time.perf_counter()
    responses, n_tokens = sample_responses(policy, tokenizer, prompts, k, params, max_batch=batch_size, seed=seed,
                                           progress=True)
    t_sample = time.perf_counter() - t0
    t0 = time.perf_counter()
    selections = select_best(prompts, responses, reward_model_scorer(reward_model, reward_tok, batch_size))
    t_score = time.perf_counter() - t0
    kept = [s.row() for s in selections if s.best is not None]
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
    n = len(prompts) * k
    summary = {"prompts": len(prompts), "samples": n, "kept": len(kept), "all_empty": len(prompts) - len(kept),
               "sample_s": t_sample, "score_s": t_score, "samples_per_s": n / t_sample,
               "tokens_per_s": n_tokens / t_sample, "scored_per_s": n / t_score,
               "mean_best_score": sum(r["score"] for r in kept) / max(len(kept), 1),
               "mean_score": sum(x for s in selections for x in s.scores) / n}
    return summary
