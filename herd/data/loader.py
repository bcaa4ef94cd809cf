"""Packed, shuffled, resumable batches of training windows.

The documents of a split (whole, or token ranges of them: ``DocSpans``) are concatenated in a seed-determined order
(a fresh permutation every epoch) into one endless stream, which is cut into consecutive windows of ``seq_len + 1``
tokens (inputs = window[:-1], targets = window[1:]). Every token of the split lands in exactly one window per epoch.
Window ``w`` is a pure function of ``(seed, w)``, so the loader's whole state is the number of windows consumed: a
resumed run sees exactly the batches it would have seen, whatever the number of data-parallel ranks, as long as the
global batch size is the same.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import numpy as np
import torch

from herd.data.shards import TokenShards
from herd.errors import UserError


@dataclass
class Batch:
    """One micro-batch of a training stage (``herd.train.task``): inputs and targets, and for packed windows the
    document structure."""

    inputs: torch.Tensor  # [B, S] int64
    targets: torch.Tensor  # [B, S] int64 (-100 where nothing is trained) or a stage's own target tensor
    doc_ids: torch.Tensor | None = None  # [B, S] int64, document index within the window (0, 1, ...)
    positions: torch.Tensor | None = None  # [B, S] int64, position within the document (restarts at each document)
    n_tokens: int | None = None  # real tokens in ``inputs`` where a stage pads its rows (None: every one is real)


@dataclass
class DocSpans:
    """Token ranges of documents: ``doc(docs[i])[start[i]:end[i]]`` for each ``i``. A split by tokens cuts one
    document in two, its head in the training split and its tail in the validation split."""

    docs: np.ndarray  # [n] int64 document index
    start: np.ndarray  # [n] int64 first token of the span within its document
    end: np.ndarray  # [n] int64 one past the last token

    @classmethod
    def whole(cls, shards: TokenShards, doc_indices: np.ndarray) -> DocSpans:
        docs = np.asarray(doc_indices, dtype=np.int64)
        return cls(docs, np.zeros(len(docs), dtype=np.int64), shards.doc_len[docs].astype(np.int64))

    def __len__(self) -> int:
        return len(self.docs)

    @property
    def n_tokens(self) -> int:
        return int((self.end - self.start).sum())


class PackedLoader:
    def __init__(self, shards: TokenShards, doc_indices: np.ndarray | DocSpans, seq_len: int, batch_size: int,
                 seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True):
        """``doc_indices``: the split's whole documents by index, or its ``DocSpans`` (``split_documents``)."""
        if batch_size % world_size:
            raise UserError(f"batch size {batch_size} is not divisible by {world_size} data-parallel ranks")
        if len(doc_indices) == 0:
            raise UserError("no documents in this split")
        self.shards = shards
        self.spans = doc_indices if isinstance(doc_indices, DocSpans) else DocSpans.whole(shards, doc_indices)
        self.seq_len, self.batch_size, self.seed, self.shuffle = seq_len, batch_size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch_tokens = self.spans.n_tokens
        self.windows_consumed = 0  # global count, all ranks together: the whole loader state
        self._epoch_cache: tuple[int, np.ndarray, np.ndarray] | None = None

    # --- the stream -------------------------------------------------------------------------------------------
    def _epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Spans (indices into ``self.spans``) of ``epoch`` in stream order, and the stream offset where each
        starts."""
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            order = np.arange(len(self.spans))
            if self.shuffle:
                order = order[np.random.default_rng([self.seed, epoch]).permutation(len(order))]
            lengths = self.spans.end[order] - self.spans.start[order]
            starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
            self._epoch_cache = (epoch, order, starts)
        return self._epoch_cache[1], self._epoch_cache[2]

    def window(self, w: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens and document ids of stream window ``w`` (``seq_len + 1`` of each)."""
        length = self.seq_len + 1
        pos, end = w * length, (w + 1) * length
        tokens, doc_ids = [], []
        doc_counter = 0
        while pos < end:
            epoch, offset = divmod(pos, self.epoch_tokens)
            order, starts = self._epoch_order(epoch)
            k = int(np.searchsorted(starts, offset, side="right") - 1)
            span = order[k]
            doc = self.shards.doc(self.spans.docs[span])[self.spans.start[span]:self.spans.end[span]]
            within = offset - starts[k]
            take = doc[within:within + (end - pos)]
            tokens.append(take)
            doc_ids.append(np.full(len(take), doc_counter, dtype=np.int64))
            doc_counter += 1
            pos += len(take)
        return np.concatenate(tokens).astype(np.int64), np.concatenate(doc_ids)

    # --- batches ----------------------------------------------------------------------------------------------
    def next_batch(self, micro_batches: int = 1) -> list[Batch]:
        """This rank's share of the next global batch, split into ``micro_batches`` micro-batches."""
        per_rank = self.batch_size // self.world_size
        if per_rank % micro_batches:
            raise UserError(f"per-rank batch {per_rank} is not divisible by {micro_batches} accumulation steps")
        first = self.windows_consumed + self.rank * per_rank
        windows = [self.window(w) for w in range(first, first + per_rank)]
        self.windows_consumed += self.batch_size
        toks = torch.from_numpy(np.stack([t for t, _ in windows]))
        docs = torch.from_numpy(np.stack([d for _, d in windows]))
        from herd.model.masks import document_positions

        inputs, targets, doc_ids = toks[:, :-1], toks[:, 1:], docs[:, :-1]
        positions = document_positions(doc_ids)
        step = per_rank // micro_batches
        return [Batch(inputs[i:i + step], targets[i:i + step], doc_ids[i:i + step], positions[i:i + step])
                for i in range(0, per_rank, step)]

    @property
    def position(self) -> int:
        return self.windows_consumed

    def rewind(self) -> None:
        """Back to the first batch (validation reads the same batches every time)."""
        self.windows_consumed = 0

    def skip_batch(self) -> None:
        """Pass over the next global batch without reading it (a rollback skipping a bad batch)."""
        self.windows_consumed += self.batch_size

    def state_dict(self) -> dict:
        return {"windows_consumed": self.windows_consumed, "seed": self.seed, "seq_len": self.seq_len,
                "epoch_tokens": self.epoch_tokens}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "seq_len", "epoch_tokens"):
            if state[key] != getattr(self, key):
                raise UserError(f"checkpoint's data loader has {key}={state[key]}, this run has {getattr(self, key)}")
        self.windows_consumed = int(state["windows_consumed"])


def split_documents(shards: TokenShards, val_fraction: float) -> tuple[np.ndarray | DocSpans, np.ndarray | DocSpans]:
    """Train / validation split holding out about ``val_fraction`` of the corpus's tokens from its end.

    Normally whole documents: they are held out from the end of the corpus until they hold at least
    ``val_fraction`` of its tokens (a fraction of tokens, so one short last file is not the whole val set), and
    both splits are arrays of document indices. When that leaves no training document (a corpus of one document)
    or a lopsided split (the held-out documents hold more than ``2 * val_fraction`` of the tokens, or more than
    the training split: a one-line file followed by a big one), the split is by tokens instead: the last
    ``ceil(val_fraction * tokens)`` tokens validate, which may cut one document in two (its head trains, its tail
    validates), and both splits are ``DocSpans``. A one-line warning on stderr says so. ``val_fraction <= 0``: no
    validation split."""
    n = shards.n_docs
    if val_fraction <= 0:
        return np.arange(n), np.arange(0)
    from_end = np.cumsum(shards.doc_len[::-1])
    total = int(from_end[-1])
    n_val = int(np.searchsorted(from_end, val_fraction * total)) + 1
    val_tokens = int(from_end[min(n_val, n) - 1])
    if n_val < n and val_tokens <= 2 * val_fraction * total and val_tokens <= total - val_tokens:
        return np.arange(n - n_val), np.arange(n - n_val, n)
    return _split_tokens(shards, val_fraction, n_val, val_tokens, total)


def _split_tokens(shards: TokenShards, val_fraction: float, n_val: int, doc_val_tokens: int,
                  total: int) -> tuple[DocSpans, DocSpans]:
    """The last ``ceil(val_fraction * total)`` tokens validate (at least one, and at least one token trains)."""
    if total < 2:
        raise UserError(f"{shards.path}: {total} token(s) cannot be split into training and validation")
    n = shards.n_docs
    n_val_tokens = min(total - 1, max(1, math.ceil(val_fraction * total)))
    cut = total - n_val_tokens  # stream offset of the first validation token
    doc_start = np.concatenate([[0], np.cumsum(shards.doc_len)[:-1]])
    k = int(np.searchsorted(doc_start, cut, side="right") - 1)  # the document the cut falls in
    within = cut - int(doc_start[k])
    lengths = shards.doc_len.astype(np.int64)
    n_train_docs = k + (within > 0)
    train_docs = np.arange(n_train_docs)
    train_end = lengths[:n_train_docs].copy()
    if within > 0:
        train_end[k] = within
    train = DocSpans(train_docs, np.zeros(n_train_docs, dtype=np.int64), train_end)
    val_docs = np.arange(k, n)
    val_start = np.zeros(n - k, dtype=np.int64)
    val_start[0] = within
    val = DocSpans(val_docs, val_start, lengths[k:])
    why = (f"leaves no training documents out of {n}" if n_val >= n else
           f"would hold out {n_val} of {n} documents with {doc_val_tokens / total:.1%} of the tokens")
    lopsided = " (still lopsided: fewer training than validation tokens)" if val.n_tokens > train.n_tokens else ""
    print(f"herd: warning: data.val_fraction={val_fraction}: holding out whole documents {why}; splitting by "
          f"tokens instead: {train.n_tokens:,} training and {val.n_tokens:,} validation tokens{lopsided}",
          file=sys.stderr, flush=True)
    return train, val
