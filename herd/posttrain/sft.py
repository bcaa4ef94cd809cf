"""Supervised fine-tuning (Llama 3 §4.1.3): dialogs in the Llama 3 chat format, cross-entropy on the assistant turns
only, through the one training loop (``herd.train.loop.train``) with its ``LanguageModelTask``.

``herd sft --config FILE.toml --run-dir DIR [--section.key=value ...]`` with ``model.init_from`` (an HF/Meta model
directory, or a run's ``checkpoints/step-N`` with ``data.tokenizer``) and ``data.path`` (JSONL dialogs).

Each dialog becomes ``inputs = ids[:-1]``, ``targets = labels[1:]`` (``data.encode_dialog``: the assistant content and
its ``<|eot_id|>`` are trained, everything else is -100). With ``data.packing`` whole dialogs are packed into rows of
``data.seq_len`` tokens (next-fit, in a seed-shuffled order), with document masks (no attention across dialogs) and
RoPE positions restarting at each dialog, so every dialog's logits are those it would have alone; a dialog longer
than a row is an error naming its line (or a counted skip with ``data.skip_invalid``). The loss is the sum over the
step's trained tokens divided by their number (micro-batches and data-parallel ranks together), as TRL's SFT with a
completion-only loss. ``lora.rank > 0`` trains LoRA adapters only (``herd.posttrain.lora``); the export then writes the
merged model to ``RUN_DIR/model`` and the PEFT adapter to ``RUN_DIR/adapter``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from herd.config import ConfigError, PretrainConfig
from herd.data.loader import Batch
from herd.model.args import ModelArgs
from herd.model.transformer import Transformer
from herd.posttrain.config import SFTRunConfig
from herd.posttrain.data import ExampleSource, Skips, encode_dialog, read_dialog_rows, split_validation
from herd.tokenizer import ChatFormat, Tokenizer
from herd.train.parallelize import World
from herd.train.task import IGNORE_INDEX, LanguageModelTask


def open_tokenizer(cfg: PretrainConfig) -> Tokenizer:
    """``data.tokenizer`` when set, else the tokenizer saved in ``model.init_from``."""
    source = cfg.data.tokenizer or cfg.model.init_from
    if not source:
        raise ConfigError("model.init_from is not set (the HF/Meta model directory to fine-tune)")
    if not Path(source).exists():
        raise ConfigError(f"model.init_from: {source} does not exist")
    try:
        return Tokenizer(source)
    except Exception as e:  # noqa: BLE001  (any unreadable tokenizer is the user's file)
        raise ConfigError(f"no tokenizer in {source} ({e}); set data.tokenizer") from None


# --- LoRA-aware model construction and export, shared with DPO --------------------------------------------------
def build_policy(cfg: PretrainConfig, args: ModelArgs) -> Transformer:
    """``model.init_from``'s weights, with LoRA adapters (base frozen) when ``lora.rank > 0``."""
    from herd.train.loop import initial_model

    model = initial_model(cfg, args)
    lora = getattr(cfg, "lora", None)
    if lora is not None and lora.rank > 0:
        from herd.posttrain.lora import apply_lora

        if cfg.parallel.tp > 1 or cfg.parallel.pp > 1:
            raise ConfigError("lora.rank > 0 does not support parallel.tp or parallel.pp (use dp_shard)")
        apply_lora(model, lora.rank, lora.alpha, lora.dropout, lora.modules(), seed=cfg.train.seed)
    return model


def export_policy(cfg: PretrainConfig, args: ModelArgs, model: torch.nn.Module, path: Path, tokenizer: Tokenizer,
                  world: World) -> None:
    """The trained model as an HF directory; with LoRA, the adapters also in PEFT's layout beside it (``adapter``)
    and merged into the weights of ``path``."""
    from herd.train.loop import export_model, full_state_dict

    lora = getattr(cfg, "lora", None)
    if lora is None or lora.rank == 0:
        export_model(model, args, path, tokenizer, world)
        return
    from herd.checkpoint import save_model
    from herd.posttrain.lora import apply_lora, merge_lora, save_peft_adapter

    state = full_state_dict(model, world)
    if world.is_main:
        plain = Transformer(args)
        apply_lora(plain, lora.rank, lora.alpha, lora.dropout, lora.modules())
        plain.load_state_dict(state)
        save_peft_adapter(plain, path.parent / "adapter", base_model_name_or_path=cfg.model.init_from or None)
        merge_lora(plain)
        save_model(plain, path, tokenizer=tokenizer, overwrite=True)
    world.barrier()


# --- data -----------------------------------------------------------------------------------------------------------
def encode_sft_examples(cfg: SFTRunConfig, tokenizer: Tokenizer, skips: Skips) -> list[tuple[list[int], list[int]]]:
    """``(inputs, targets)`` of every valid dialog: ``ids[:-1]`` and ``labels[1:]``."""
    chat = ChatFormat(tokenizer)
    out = []
    for line, messages in read_dialog_rows(cfg.data.path, skips):
        ids, labels = encode_dialog(chat, messages, cfg.data.train_on)
        if len(ids) - 1 > cfg.data.seq_len:
            skips(f"{cfg.data.path}:{line}: the dialog has {len(ids)} tokens, more than data.seq_len + 1 = "
                  f"{cfg.data.seq_len + 1}")
            continue
        out.append((ids[:-1], labels[1:]))
    return out


def pack(lengths: list[int], seq_len: int, seed: int, packing: bool = True) -> list[list[int]]:
    """Rows of example indices: next-fit packing of whole examples (lengths <= ``seq_len``) in a seed-shuffled order;
    one example per row without packing."""
    order = np.random.default_rng([seed, 1 << 20]).permutation(len(lengths)).tolist()
    if not packing:
        return [[i] for i in order]
    rows, current, used = [], [], 0
    for i in order:
        if current and used + lengths[i] > seq_len:
            rows.append(current)
            current, used = [], 0
        current.append(i)
        used += lengths[i]
    if current:
        rows.append(current)
    return rows


def collate_rows(rows: list[list[int]], examples: list[tuple[list[int], list[int]]], pad_id: int,
                 width: int | None, split: bool = False) -> Batch:
    """Packed rows as a ``Batch`` with document ids and per-document positions; padding (to ``width``, or to the
    longest row) is a document of its own with targets -100.

    ``split`` lays the same dialogs out one per row instead (in row order, padded to the longest, causal attention,
    positions from 0): with document masks and per-document positions every dialog's logits are those it has in the
    packed row, so the step's loss and gradients are the packed step's (to float rounding), without attention over
    whole rows through a dense ``[B, 1, S, S]`` mask. ``sft_task`` chooses it where attention has no block-sparse
    kernel (CPU: FlexAttention has no backward there)."""
    if split:
        rows = [[i] for row in rows for i in row]
        width = None
    width = width or max(sum(len(examples[i][0]) for i in row) for row in rows)
    inputs = torch.full((len(rows), width), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    doc_ids = torch.zeros((len(rows), width), dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for d, i in enumerate(row):
            inp, tgt = examples[i]
            n = len(inp)
            inputs[r, at:at + n] = torch.tensor(inp)
            targets[r, at:at + n] = torch.tensor(tgt)
            doc_ids[r, at:at + n] = d
            positions[r, at:at + n] = torch.arange(n)
            at += n
        doc_ids[r, at:] = len(row)
        positions[r, at:] = torch.arange(width - at)
    n_tokens = sum(len(examples[i][0]) for row in rows for i in row)
    if all(len(row) == 1 for row in rows):
        # One dialog per row, padding after it: causal attention is already exact (and far cheaper than a dense
        # document mask on CPU).
        return Batch(inputs, targets, None, positions, n_tokens)
    return Batch(inputs, targets, doc_ids, positions, n_tokens)


@dataclass
class SFTTask(LanguageModelTask):
    """The loop's next-token task on packed dialogs, plus LoRA-aware model construction and export."""

    cfg: SFTRunConfig = field(default_factory=SFTRunConfig)
    args: ModelArgs | None = None

    def build_model(self, cfg: SFTRunConfig, args: ModelArgs) -> Transformer:
        return build_policy(cfg, args)

    def export(self, model: torch.nn.Module, path: Path, tokenizer: Tokenizer, world: World) -> None:
        export_policy(self.cfg, self.args, model, path, tokenizer, world)


def sft_task(cfg: SFTRunConfig, examples: list[tuple[list[int], list[int]]], tokenizer: Tokenizer, args: ModelArgs,
             world: World) -> SFTTask:
    from herd.train.loop import resolve_device

    d = cfg.data
    pad_id = tokenizer.pad_id if tokenizer.pad_id >= 0 else tokenizer.eos_id
    train_idx, val_idx = split_validation(len(examples), d.val_fraction)
    width = d.seq_len if d.packing else None
    # Packed rows train exactly like their dialogs one per row when attention stays inside each dialog and positions
    # restart; without a block-sparse attention kernel (CPU) that layout is the cheaper one. A pipeline schedule needs
    # the fixed number of rows per batch that packing gives.
    split = (d.packing and d.document_masking and d.per_document_positions and world.pp_size == 1
             and resolve_device(cfg.train.device).type != "cuda")

    def source(indices: list[int], batch_size: int, shuffle: bool) -> ExampleSource:
        part = [examples[i] for i in indices]
        rows = pack([len(x) for x, _ in part], d.seq_len, d.seed, d.packing)
        return ExampleSource(len(rows), batch_size, lambda mine, _: collate_rows([rows[i] for i in mine], part,
                                                                                  pad_id, width, split),
                             d.seed, world.dp_rank, world.dp_size, shuffle=shuffle)

    val = source(val_idx, d.batch_size // cfg.train.grad_accum, False) if val_idx else None
    # Logits of the response tokens only; tensor parallelism keeps the full [B, S] layout (its sequence-sharded
    # hidden states and vocabulary-sharded loss), and a pipeline schedule needs fixed output shapes.
    trained_only = world.degrees["tp"] == 1 and world.pp_size == 1
    return SFTTask(source(train_idx, d.batch_size, True), val, document_masking=d.document_masking,
                   per_document_positions=d.per_document_positions, trained_logits_only=trained_only, cfg=cfg,
                   args=args)


def sft(cfg: SFTRunConfig, run_dir: str | Path) -> list[dict]:
    """Fine-tune ``model.init_from`` on the dialogs of ``data.path`` in ``run_dir`` (resuming from its latest
    checkpoint); the per-step metrics records."""
    from herd.train.loop import model_args_for, train

    if cfg.data.train_on not in ("all", "last"):
        raise ConfigError(f"data.train_on must be 'all' or 'last', got {cfg.data.train_on!r}")
    tokenizer = open_tokenizer(cfg)
    skips = Skips(cfg.data.skip_invalid)
    examples = encode_sft_examples(cfg, tokenizer, skips)
    skips.report("dialogs")
    args = model_args_for(cfg, tokenizer.n_words)
    return train(cfg, run_dir, lambda world: sft_task(cfg, examples, tokenizer, args, world), tokenizer, name="sft")
