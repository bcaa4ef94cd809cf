"""Post-training data: JSONL dialogs and preference rows, their Llama 3 encoding, and resumable batch sources.

Formats (the ones HF, OpenAI and TRL users already have):

- dialogs, one per line: ``{"messages": [{"role": "system"|"user"|"assistant"|"ipython"|"tool", "content": str}, ...]}``
- preference rows, one per line, TRL's two formats: conversational ``{"prompt": [messages], "chosen": [messages],
  "rejected": [messages]}`` (the responses start with an assistant message) or plain strings ``{"prompt": str,
  "chosen": str, "rejected": str}``; an optional ``"edited"`` response (the annotator's improvement of ``chosen``) in
  the same form gives the Llama 3 reward-model ranking edited > chosen > rejected.

Bad rows raise ``DataError`` naming the file and line, or are skipped and counted when ``data.skip_invalid`` is set.

Tokenisation follows TRL 1.x so losses can be compared: a conversational prompt is ``BOS + messages + the open
assistant header`` (``ChatFormat.encode_dialog_prompt``), its completion is the rest of the rendered dialog (the
assistant content and its ``<|eot_id|>``); a plain-string completion is ``tokenize(prompt + response)`` past the
prompt's tokens, with ``<|end_of_text|>`` appended.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from herd.data.loader import Batch
from herd.data.readers import DataError
from herd.errors import UserError
from herd.tokenizer import ChatFormat
from herd.train.task import IGNORE_INDEX

Message = dict[str, Any]
Response = list[Message] | str


# --- reading ----------------------------------------------------------------------------------------------------------
def _jsonl(path: str | Path) -> list[tuple[int, Any]]:
    """``(line number, parsed object)`` for every non-blank line; malformed JSON is an error naming the line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason})") from None
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((n, json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: invalid JSON ({e.msg})") from None
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


class Skips:
    """Bad rows that ``data.skip_invalid`` lets through: counted, with the first reasons kept for the message."""

    def __init__(self, enabled: bool):
        self.enabled, self.reasons = enabled, []

    def __call__(self, error: str) -> None:
        """Record a bad row, or raise ``DataError(error)`` when skipping is off."""
        if not self.enabled:
            raise DataError(error)
        self.reasons.append(error)

    def report(self, what: str) -> None:
        if self.reasons:
            print(f"herd: skipped {len(self.reasons)} invalid {what} (data.skip_invalid=true); first: "
                  f"{self.reasons[0]}", file=sys.stderr, flush=True)


def check_messages(messages: Any, where: str, need_assistant: bool = True) -> list[Message]:
    """A dialog's messages, checked: an optional leading system message, then user and assistant turns alternating
    (tool results, role ``ipython``/``tool``, may follow an assistant turn), non-empty assistant content."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list")
    previous = None
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: message {i} needs a string 'role' and a string 'content'")
        role = m["role"]
        allowed = {None: ("system", "user"), "system": ("user",), "user": ("assistant",),
                   "assistant": ("user", "ipython", "tool"), "ipython": ("assistant",), "tool": ("assistant",)}
        if role not in allowed["assistant"] + ("system", "assistant"):
            raise DataError(f"{where}: message {i} has unknown role {role!r}")
        if role not in allowed[previous]:
            raise DataError(f"{where}: message {i} is {role!r} after {previous or 'the start'!r}; roles must go "
                            f"[system,] user, assistant, user, assistant, ...")
        if role == "assistant" and not m["content"].strip() and not m.get("tool_call"):
            raise DataError(f"{where}: message {i} is an empty assistant turn")
        previous = role
    if need_assistant and "assistant" not in (m["role"] for m in messages):
        raise DataError(f"{where}: no assistant turn to train on")
    return messages


def read_dialog_rows(path: str | Path, skips: Skips | None = None) -> list[tuple[int, list[Message]]]:
    """``(line, messages)`` of every valid dialog in a JSONL file."""
    skips = skips or Skips(False)
    out = []
    for n, obj in _jsonl(path):
        where = f"{path}:{n}"
        try:
            if not isinstance(obj, dict) or "messages" not in obj:
                raise DataError(f"{where}: expected an object with 'messages'")
            out.append((n, check_messages(obj["messages"], where)))
        except DataError as e:
            skips(str(e))
    return out


def read_dialogs(path: str | Path) -> list[list[Message]]:
    """The dialogs of a JSONL file (``{"messages": [...]}`` per line); a bad row is a ``DataError`` naming its line."""
    return [messages for _, messages in read_dialog_rows(path)]


@dataclass
class PreferenceRow:
    prompt: list[Message] | str
    chosen: Response
    rejected: Response
    edited: Response | None = None
    where: str = ""  # "file:line", for error messages

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, list)


def _check_response(value: Any, key: str, conversational: bool, where: str) -> Response:
    if conversational:
        if not isinstance(value, list) or not value or not isinstance(value[0], dict) \
                or value[0].get("role") != "assistant":
            raise DataError(f"{where}: '{key}' must be a list of messages starting with an assistant message")
        return value
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: '{key}' must be a non-empty string (the prompt is a string)")
    return value


def parse_preference(obj: Any, where: str) -> PreferenceRow:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object")
    for key in ("prompt", "chosen", "rejected"):
        if key not in obj:
            raise DataError(f"{where}: missing '{key}' (a preference row needs prompt, chosen and rejected)")
    prompt = obj["prompt"]
    conversational = isinstance(prompt, list)
    if conversational:
        check_messages(prompt, where + " prompt", need_assistant=False)
        if prompt[-1]["role"] not in ("user", "ipython", "tool"):
            raise DataError(f"{where}: the prompt must end with a user (or tool) message")
    elif not isinstance(prompt, str) or not prompt:
        raise DataError(f"{where}: 'prompt' must be a list of messages or a non-empty string")
    responses = {k: _check_response(obj[k], k, conversational, where) for k in ("chosen", "rejected")}
    edited = obj.get("edited")
    if edited is not None:
        edited = _check_response(edited, "edited", conversational, where)
    if conversational:
        for key, value in (*responses.items(), ("edited", edited)):
            if value is not None:
                check_messages(prompt + value, f"{where} prompt+{key}")
    return PreferenceRow(prompt, responses["chosen"], responses["rejected"], edited, where)


def read_preferences(path: str | Path, skips: Skips | None = None) -> list[PreferenceRow]:
    """Preference rows of a JSONL file in TRL's conversational or plain-string format (optional ``edited``)."""
    skips = skips or Skips(False)
    rows = []
    for n, obj in _jsonl(path):
        try:
            rows.append(parse_preference(obj, f"{path}:{n}"))
        except DataError as e:
            skips(str(e))
    return rows


# --- encoding ---------------------------------------------------------------------------------------------------------
def encode_dialog(chat_format: ChatFormat, messages: list[Message], train_on: str = "all"
                  ) -> tuple[list[int], list[int]]:
    """``(ids, labels)`` of a whole dialog, the same length (HF convention, unshifted): ``labels[i] = ids[i]`` on the
    assistant turns' content and their end-of-turn token ``<|eot_id|>`` (as TRL's assistant-only / completion-only
    loss trains them: the model must learn to stop), ``IGNORE_INDEX`` on BOS, headers and other roles' messages."""
    try:
        ids, mask = chat_format.encode_dialog_for_training(messages, train_on=train_on)
    except UserError as e:
        raise DataError(str(e)) from None
    return ids, [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]


@dataclass
class EncodedPreference:
    prompt: list[int]
    chosen: list[int]  # completion tokens only
    rejected: list[int]
    edited: list[int] | None
    where: str


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def encode_preference(chat_format: ChatFormat, row: PreferenceRow) -> EncodedPreference:
    """Prompt and completion ids of a preference row, tokenised as TRL 1.x's ``DPOTrainer`` does (the completion
    starts where the prompt's tokens and the full sequence's tokens diverge)."""
    tok = chat_format.tokenizer
    names = ["chosen", "rejected"] + (["edited"] if row.edited is not None else [])
    if row.conversational:
        prompt = chat_format.encode_dialog_prompt(row.prompt)
        full = {k: [tok.bos_id] + [t for m in row.prompt + getattr(row, k) for t in chat_format.encode_message(m)]
                for k in names}
    else:
        prompt = [tok.bos_id] + tok.encode(row.prompt)
        full = {k: [tok.bos_id] + tok.encode(row.prompt + getattr(row, k)) + [tok.eos_id] for k in names}
    cut = min(_common_prefix(prompt, ids) for ids in full.values())
    out = {k: ids[cut:] for k, ids in full.items()}
    return EncodedPreference(prompt[:cut], out["chosen"], out["rejected"], out.get("edited"), row.where)


def encode_preferences(chat_format: ChatFormat, rows: list[PreferenceRow], max_len: int,
                       skips: Skips) -> list[EncodedPreference]:
    """Encode rows; a prompt + response longer than ``max_len`` tokens is an error naming the line (or a skip)."""
    out = []
    for row in rows:
        enc = encode_preference(chat_format, row)
        longest = max(len(r) for r in (enc.chosen, enc.rejected, enc.edited or []))
        if len(enc.prompt) + longest > max_len:
            skips(f"{row.where}: prompt ({len(enc.prompt)} tokens) + response ({longest}) is longer than "
                  f"data.seq_len={max_len}")
            continue
        out.append(enc)
    return out


# --- batches ----------------------------------------------------------------------------------------------------------
Collate = Callable[[list[int], list[int]], Batch]


class ExampleSource:
    """A resumable stream of global batches over ``n`` examples (packed SFT rows, preference rows).

    Epoch ``e`` visits the examples in the order of a permutation seeded by ``(seed, e)``; a global batch is the next
    ``batch_size`` of them, and data-parallel rank ``r`` reads its contiguous ``batch_size / world_size`` share, split
    into micro-batches. The whole state is the number of examples consumed, so a resumed run (at any layout with the
    same global batch) sees the same batches. ``collate(micro_batch_indices, global_batch_indices)`` builds a micro-
    batch; the global batch is there for losses normalised over the whole step (DPO's NLL term)."""

    def __init__(self, n: int, batch_size: int, collate: Collate, seed: int = 0, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True):
        if n == 0:
            raise UserError("no examples to train on")
        if batch_size % world_size:
            raise UserError(f"data.batch_size={batch_size} is not divisible by {world_size} data-parallel ranks")
        self.n, self.batch_size, self.collate, self.seed, self.shuffle = n, batch_size, collate, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.consumed = 0
        self._order: tuple[int, np.ndarray] | None = None

    def _index(self, k: int) -> int:
        epoch, i = divmod(k, self.n)
        if not self.shuffle:
            return i
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n))
        return int(self._order[1][i])

    def next_batch(self, micro_batches: int = 1) -> list[Batch]:
        per_rank = self.batch_size // self.world_size
        if per_rank % micro_batches:
            raise UserError(f"per-rank batch {per_rank} is not divisible by {micro_batches} accumulation steps")
        step = [self._index(k) for k in range(self.consumed, self.consumed + self.batch_size)]
        self.consumed += self.batch_size
        mine = step[self.rank * per_rank:(self.rank + 1) * per_rank]
        size = per_rank // micro_batches
        return [self.collate(mine[i:i + size], step) for i in range(0, per_rank, size)]

    @property
    def position(self) -> int:
        return self.consumed

    def skip_batch(self) -> None:
        self.consumed += self.batch_size

    def rewind(self) -> None:
        self.consumed = 0

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "n": self.n, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        for key in ("n", "seed"):
            if state[key] != getattr(self, key):
                raise UserError(f"checkpoint's data has {key}={state[key]}, this run has {getattr(self, key)} "
                                f"(same data.path and data.seed needed to resume)")
        self.consumed = int(state["consumed"])


def pad_rows(rows: list[list[int]], value: int, width: int | None = None) -> torch.Tensor:
    """Right-pad lists of ids to ``width`` (default: the longest): ``[len(rows), width]`` int64."""
    width = width or max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def split_validation(n: int, val_fraction: float) -> tuple[list[int], list[int]]:
    """Training and held-out example indices: the last ``ceil(val_fraction * n)`` examples validate."""
    if val_fraction <= 0:
        return list(range(n)), []
    n_val = min(n - 1, max(1, int(np.ceil(val_fraction * n))))
    return list(range(n - n_val)), list(range(n - n_val, n))


def load_preference_examples(cfg, tokenizer) -> list[EncodedPreference]:
    """``data.path``'s preference rows, checked and encoded (bad rows: errors, or counted skips with
    ``data.skip_invalid``); shared by the reward model and DPO."""
    skips = Skips(cfg.data.skip_invalid)
    examples = encode_preferences(ChatFormat(tokenizer), read_preferences(cfg.data.path, skips), cfg.data.seq_len,
                                  skips)
    skips.report("preference rows")
    if not examples:
        raise DataError(f"{cfg.data.path}: no valid preference rows")
    return examples


@dataclass
class SharedPrefixRows:
    """Rows that each hold a prompt once followed by several continuations of it (``prefix_rows``), right-padded:
    ``branch`` is 0 on the prompt, k on the k-th continuation and ``PAD_BRANCH`` on padding; ``positions`` are the RoPE
    positions each token has in its own prompt + continuation sequence; ``starts[r][k]`` is where continuation k of
    row r begins. With ``masks.shared_prefix_mask(branch)`` every continuation attends to the prompt and to itself
    only, so each of its positions computes what it would in its own sequence, while the prompt is computed once."""

    inputs: torch.Tensor  # [R, L]
    positions: torch.Tensor  # [R, L]
    branch: torch.Tensor  # [R, L]
    starts: list[list[int]]

    @property
    def n_tokens(self) -> int:
        return int((self.branch != PAD_BRANCH).sum())


PAD_BRANCH = 255  # padding: a branch of its own, never a continuation's


def prefix_rows(rows: list[tuple[list[int], list[list[int]]]], pad: int, multiple_of: int = 1) -> SharedPrefixRows:
    """``[(prompt, [continuation, ...]), ...]`` laid out as ``SharedPrefixRows``, padded to the longest row rounded up
    to ``multiple_of`` (tensor parallelism splits the sequence evenly over its ranks)."""
    tokens, positions, branches, starts = [], [], [], []
    for prompt, continuations in rows:
        ids, pos, br, st = list(prompt), list(range(len(prompt))), [0] * len(prompt), []
        for k, cont in enumerate(continuations, start=1):
            st.append(len(ids))
            ids += cont
            pos += range(len(prompt), len(prompt) + len(cont))
            br += [k] * len(cont)
        tokens.append(ids)
        positions.append(pos)
        branches.append(br)
        starts.append(st)
    width = -(-max(len(t) for t in tokens) // multiple_of) * multiple_of
    return SharedPrefixRows(pad_rows(tokens, pad, width),
                            torch.tensor([p + list(range(len(p), width)) for p in positions]),
                            torch.tensor([b + [PAD_BRANCH] * (width - len(b)) for b in branches]), starts)


def prefix_attention(branch: torch.Tensor, device: torch.device):
    """The attention mask of ``SharedPrefixRows`` on ``device``: FlexAttention's block mask on GPU, the dense SDPA mask
    on CPU (where FlexAttention has no backward)."""
    from herd.model.masks import shared_prefix_block_mask, shared_prefix_mask

    branch = branch.to(device)
    return shared_prefix_block_mask(branch) if device.type == "cuda" else shared_prefix_mask(branch)
