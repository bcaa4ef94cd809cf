"""Reward model (Llama 3 §4.1.2): the Transformer with a scalar ``score`` head read at the last token, trained with
the Bradley–Terry loss without a margin term on preference rows (with an ``edited`` response: edited > chosen >
rejected, three pairs), through the one training loop.

Saved as Hugging Face's ``LlamaForSequenceClassification`` (``num_labels = 1``, ``pad_token_id`` set so transformers
reads the score at the last non-padding token), so herd (``load_reward_model``) and transformers load the same
directory. Public for rejection sampling and PPO: ``RewardModel``, ``load_reward_model``, ``score_dialogs``.

As Meta does, a prompt and its 2–3 responses share one row (``data.prefix_rows``: the prompt once, then each response,
with a mask that lets each response see the prompt and itself only): every score is the one the response would get in
its own row (tested), and the prompt is computed once.
``train.val_batches`` batches of held-out rows (``data.val_fraction``) give ``val_loss`` and ``val_accuracy``
(the fraction of held-out pairs ranked right) in ``metrics.jsonl``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from herd.checkpoint import hf
from herd.config import ConfigError
from herd.data.loader import Batch
from herd.io import atomic_directory, atomic_write_json
from herd.model.args import ModelArgs
from herd.model.transformer import Transformer
from herd.posttrain import losses
from herd.posttrain.config import RewardRunConfig
from herd.posttrain.data import (
    EncodedPreference,
    ExampleSource,
    load_preference_examples,
    pad_rows,
    prefix_attention,
    prefix_rows,
    split_validation,
)
from herd.tokenizer import ChatFormat, Tokenizer
from herd.train.parallelize import World

ARCHITECTURE = "LlamaForSequenceClassification"


class RewardModel(Transformer):
    """A Transformer whose output head is one scalar per position (``score``, as in HF); no language-model head."""

    def __init__(self, args: ModelArgs):
        super().__init__(args)
        self.output = None  # Transformer.forward then returns the final-norm hidden states
        self.score = nn.Linear(args.dim, 1, bias=False)

    def forward(self, tokens: Tensor, lengths: Tensor | None = None, positions: Tensor | None = None,
                mask=None) -> Tensor:
        """``tokens [B, S]`` (right-padded) -> scores ``[B]`` at position ``lengths - 1`` of each row, or ``[B, S]``
        (every position's score) when ``lengths`` is None."""
        scores = self.score(super().forward(tokens, positions=positions, mask=mask)).squeeze(-1).float()
        if lengths is None:
            return scores
        return scores.gather(1, (lengths.to(scores.device) - 1).long()[:, None]).squeeze(1)

    @classmethod
    def from_language_model(cls, lm: Transformer, seed: int = 0) -> RewardModel:
        """A reward model with ``lm``'s body and a fresh score head (std 0.02, transformers' initializer_range)."""
        model = cls(lm.args)
        body = {k: v for k, v in lm.state_dict().items() if not k.startswith("output.")}
        model.load_state_dict(body, strict=False)
        with torch.no_grad():
            model.score.weight.normal_(0, 0.02, generator=torch.Generator().manual_seed(seed))
        return model


# --- files --------------------------------------------------------------------------------------------------------
def is_reward_model_dir(path: str | Path) -> bool:
    config = Path(path) / hf.CONFIG
    if not config.exists():
        return False
    return ARCHITECTURE in (json.loads(config.read_text()).get("architectures") or [])


def save_reward_model(model: RewardModel, path: str | Path, tokenizer: Tokenizer | None = None,
                      state: dict[str, Tensor] | None = None) -> Path:
    """Write ``LlamaForSequenceClassification`` files atomically: the body (``model.*``) as herd writes an HF model,
    ``score.weight`` in ``model-score.safetensors``, an index naming both, and ``config.json`` with
    ``num_labels = 1``."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    args = model.args
    state = state if state is not None else model.state_dict()
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    score = state.pop("score.weight")
    path = Path(path)
    with atomic_directory(path, overwrite=True) as tmp:
        hf.write(state, args, tmp)
        # transformers reads model.safetensors alone when it exists: list the body's file(s) and the head's in an
        # index instead (the body's single file renamed so the index is what both loaders follow).
        index = tmp / hf.INDEX
        if index.exists():
            listing = json.loads(index.read_text())
        else:
            body = "model-body.safetensors"
            (tmp / hf.SINGLE).rename(tmp / body)
            with safe_open(tmp / body, framework="pt") as f:
                listing = {"metadata": {}, "weight_map": dict.fromkeys(f.keys(), body)}
        save_file({"score.weight": score}, tmp / "model-score.safetensors", metadata={"format": "pt"})
        listing["weight_map"]["score.weight"] = "model-score.safetensors"
        atomic_write_json(index, listing)
        pad = None
        if tokenizer is not None:
            pad = tokenizer.pad_id if tokenizer.pad_id >= 0 else tokenizer.eos_id
        config = hf.config_from_args(args, score.dtype, tokenizer.bos_id if tokenizer else None,
                                     tokenizer.eos_id if tokenizer else None)
        config.update(architectures=[ARCHITECTURE], id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0},
                      pad_token_id=pad, problem_type="regression")
        atomic_write_json(tmp / hf.CONFIG, config)
        if tokenizer is not None:
            tokenizer.save(tmp)
    return path


def load_reward_model(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
                      ) -> tuple[RewardModel, Tokenizer]:
    """A ``LlamaForSequenceClassification`` directory (herd's or transformers') as a ``RewardModel`` (eval mode)
    and its tokenizer."""
    from safetensors import safe_open

    from herd.checkpoint.errors import CheckpointError

    path = Path(path)
    if not is_reward_model_dir(path):
        raise CheckpointError(f"{path}: not a reward model ({hf.CONFIG} must list architectures "
                              f"['{ARCHITECTURE}'])")
    args = hf.read_args(path)
    model = RewardModel(args)
    state = {}
    for file in hf.weight_files(path):
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                if key == "score.weight":
                    if tuple(t.shape) != (1, args.dim):
                        raise CheckpointError(f"{file}: score.weight has shape {tuple(t.shape)}, expected "
                                              f"(1, {args.dim}) (one label)")
                    state["score.weight"] = t
                    continue
                try:
                    name = hf.from_hf_name(key)
                except KeyError:
                    raise CheckpointError(f"{file}: unexpected tensor '{key}'") from None
                if name is None or name.startswith("output."):
                    continue
                if name.endswith("attention.wq.weight"):
                    t = hf.permute_from_hf(t, args.n_heads)
                elif name.endswith("attention.wk.weight"):
                    t = hf.permute_from_hf(t, args.n_kv_heads)
                state[name] = t
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: missing {missing[:3]} / unexpected {unexpected[:3]} tensors")
    return model.to(device=device, dtype=dtype).eval(), Tokenizer(path)


@torch.inference_mode()
def score_dialogs(model: RewardModel, tokenizer: Tokenizer, dialogs: list[list[dict]], batch_size: int = 8
                  ) -> list[float]:
    """The reward of each dialog (its last message is the response being scored), encoded as in training: BOS and
    every message in the Llama 3 chat format, the score read at the last token (the response's ``<|eot_id|>``)."""
    chat = ChatFormat(tokenizer)
    device = next(model.parameters()).device
    encoded = [[tokenizer.bos_id] + [t for m in d for t in chat.encode_message(m)] for d in dialogs]
    pad = tokenizer.pad_id if tokenizer.pad_id >= 0 else tokenizer.eos_id
    scores: list[float] = []
    for i in range(0, len(encoded), batch_size):
        rows = encoded[i:i + batch_size]
        lengths = torch.tensor([len(r) for r in rows], device=device)
        scores += model(pad_rows(rows, pad).to(device), lengths=lengths).tolist()
    return scores


# --- training -------------------------------------------------------------------------------------------------------
@dataclass
class RewardTargets:
    """The responses of a micro-batch, where each one's score is read (its last token: ``row``, ``col``), and which are
    compared: response ``better[k]`` should outscore response ``worse[k]``."""

    row: Tensor  # [R]
    col: Tensor  # [R]
    better: Tensor  # [P] response indices
    worse: Tensor  # [P]

    def to(self, device) -> RewardTargets:
        return RewardTargets(self.row.to(device), self.col.to(device), self.better.to(device), self.worse.to(device))


def collate_pairs(examples: list[EncodedPreference], pad: int, multiple_of: int = 1) -> Batch:
    """One row per preference row: the prompt, then chosen, rejected (and edited); pairs (chosen, rejected), plus
    (edited, chosen) and (edited, rejected) when edited. ``Batch.doc_ids`` carries the rows' branches."""
    responses = [[ex.chosen, ex.rejected] + ([ex.edited] if ex.edited is not None else []) for ex in examples]
    rows = prefix_rows([(ex.prompt, rs) for ex, rs in zip(examples, responses)], pad, multiple_of)
    site_row, site_col, better, worse = [], [], [], []
    for r, rs in enumerate(responses):
        first = len(site_row)
        for start, response in zip(rows.starts[r], rs):
            site_row.append(r)
            site_col.append(start + len(response) - 1)
        better.append(first)
        worse.append(first + 1)
        if len(rs) == 3:
            better += [first + 2, first + 2]
            worse += [first, first + 1]
    targets = RewardTargets(torch.tensor(site_row), torch.tensor(site_col), torch.tensor(better), torch.tensor(worse))
    return Batch(rows.inputs, targets, rows.branch, rows.positions, rows.n_tokens)


class RewardTask:
    """Bradley–Terry on a batch of preference rows, normalised by the number of pairs in the step."""

    def __init__(self, cfg: RewardRunConfig, examples: list[EncodedPreference], tokenizer: Tokenizer, world: World,
                 args: ModelArgs):
        if world.pp_size > 1:
            raise ConfigError("reward: parallel.pp is not supported (use parallel.tp, dp_shard, dp_replicate)")
        tp = world.degrees["tp"]
        self.cfg, self.world, self.args = cfg, world, args
        pad = tokenizer.pad_id if tokenizer.pad_id >= 0 else tokenizer.eos_id
        train_idx, val_idx = split_validation(len(examples), cfg.data.val_fraction)
        d = cfg.data

        def source(indices, batch_size, shuffle):
            return ExampleSource(len(indices), batch_size,
                                 lambda mine, _: collate_pairs([examples[indices[i]] for i in mine], pad, tp),
                                 d.seed, world.dp_rank, world.dp_size, shuffle=shuffle)

        self.train_data = source(train_idx, d.batch_size, True)
        self.val_data = source(val_idx, d.batch_size // cfg.train.grad_accum, False) if val_idx else None
        self._correct = self._pairs = 0  # held-out tallies since the last val_metrics()

    def build_model(self, cfg: RewardRunConfig, args: ModelArgs) -> RewardModel:
        from herd.train.loop import initial_model

        source = cfg.model.init_from
        if source and is_reward_model_dir(source):  # continue training a reward model
            return load_reward_model(source)[0].train()
        return RewardModel.from_language_model(initial_model(cfg, args), seed=cfg.train.seed)

    def model_inputs(self, batch: Batch, device: torch.device) -> dict:
        return {"positions": batch.positions.to(device), "mask": prefix_attention(batch.doc_ids, device)}

    def count(self, targets: RewardTargets) -> Tensor:
        return torch.tensor(len(targets.better))

    def loss(self, output: Tensor, targets: RewardTargets) -> tuple[Tensor, Tensor]:
        if isinstance(output, DTensor):  # tensor parallelism: [B, S] scores sharded on the sequence; gather them
            output = output.full_tensor()
        rewards = output[targets.row, targets.col]
        better, worse = rewards[targets.better], rewards[targets.worse]
        if not torch.is_grad_enabled():  # validation
            self._correct += int((better > worse).sum())
            self._pairs += len(better)
        return losses.reward_loss(better, worse).sum(), torch.tensor(len(better))

    def val_metrics(self) -> dict:
        correct = self.world.sum_over_dp(self._correct)
        pairs = self.world.sum_over_dp(self._pairs)
        self._correct = self._pairs = 0
        return {"val_accuracy": correct / pairs} if pairs else {}

    def export(self, model: nn.Module, path: Path, tokenizer: Tokenizer, world: World) -> None:
        from herd.train.loop import full_state_dict

        state = full_state_dict(model, world)
        if world.is_main:
            save_reward_model(RewardModel(self.args), path, tokenizer, state=state)
        world.barrier()


def train_reward(cfg: RewardRunConfig, run_dir: str | Path) -> list[dict]:
    """Train a reward model on ``data.path`` (preference rows) in ``run_dir``; resumes from its latest checkpoint."""
    from herd.posttrain.sft import open_tokenizer
    from herd.train.loop import model_args_for, train

    tokenizer = open_tokenizer(cfg)
    examples = load_preference_examples(cfg, tokenizer)
    args = model_args_for(cfg, tokenizer.n_words)

    return train(cfg, run_dir, lambda world: RewardTask(cfg, examples, tokenizer, world, args), tokenizer,
                 name="reward")
