"""Direct preference optimisation with Llama 3's changes (§4.1.4), through the one training loop.

``herd dpo --config FILE.toml --run-dir DIR`` with ``model.init_from``, ``data.path`` (preference rows, TRL's
formats), ``dpo.beta`` (0.1), ``dpo.nll_coef`` (0.2) and ``dpo.mask_formatting_tokens`` (true).

- Reference log-probabilities are computed once, before training, by the initial model (the reference) over every
  preference row, and stored in ``RUN_DIR/dpo_reference.pt`` with a fingerprint of the tokenised data and settings:
  a resumed run reads them back, and only the policy is in memory while training.
- Loss per step, over the step's P pairs (all micro-batches and data-parallel ranks) and the T completion tokens of
  their chosen responses:

      L = (1/P) Σ_pairs −log σ(β Δ)  +  nll_coef · (1/T) Σ_chosen tokens −log π(y_t | ...),

  with Δ = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l)) summed over completion tokens. This is TRL
  1.x's ``DPOTrainer`` with ``loss_type=["sigmoid", "sft"]``, ``loss_weights=[1, nll_coef]``: TRL's ``"sft"`` term is
  the token mean of the chosen completions' NLL over the batch. (TRL takes that mean per device and micro-batch;
  herd takes it over the whole step, so the loss does not depend on the layout; one device, one micro-batch: equal.)
- ``dpo.mask_formatting_tokens``: Meta's mask — the chat format's header (``<|start_header_id|> role
  <|end_header_id|>``) and termination tokens (``<|eot_id|>``, ``<|eom_id|>``, ``<|end_of_text|>``) are left out of
  both sequence log-probabilities of the DPO term (policy and reference alike). The NLL term keeps them: it exists to
  keep the format (the model must still learn to end its turn).
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from herd.config import ConfigError
from herd.data.loader import Batch
from herd.io import atomic_write_bytes
from herd.model.args import ModelArgs
from herd.model.transformer import Transformer
from herd.posttrain import losses
from herd.posttrain.config import DPORunConfig
from herd.posttrain.data import EncodedPreference, ExampleSource, load_preference_examples, pad_rows, split_validation
from herd.posttrain.sft import build_policy, export_policy, open_tokenizer
from herd.tokenizer import Tokenizer
from herd.train.parallelize import World
from herd.train.task import IGNORE_INDEX

REFERENCE_FILE = "dpo_reference.pt"


@dataclass
class DPOTargets:
    """A micro-batch's targets: rows are the chosen sequences, then the rejected ones (``2b`` rows for ``b`` pairs)."""

    labels: Tensor  # [2b, S] completion tokens (shifted), IGNORE_INDEX elsewhere: the NLL term uses the chosen rows
    dpo_labels: Tensor  # [2b, S] the tokens in the DPO term (labels minus formatting tokens when masked)
    ref_logps: Tensor  # [2b] reference sequence log-probs of dpo_labels
    nll_weight: Tensor  # scalar: nll_coef * (pairs in the step) / (chosen completion tokens in the step)

    def to(self, device) -> DPOTargets:
        return DPOTargets(self.labels.to(device), self.dpo_labels.to(device), self.ref_logps.to(device),
                          self.nll_weight.to(device))

    @property
    def pairs(self) -> int:
        return self.ref_logps.numel() // 2


def sequences(examples: list[EncodedPreference], tokenizer: Tokenizer, mask_formatting: bool
              ) -> tuple[Tensor, Tensor, Tensor]:
    """``(inputs, labels, dpo_labels)`` of the chosen rows then the rejected rows, right-padded: inputs are the
    prompt + response tokens but the last, labels the next tokens on the response (-100 on the prompt and padding)."""
    full = [ex.prompt + ex.chosen for ex in examples] + [ex.prompt + ex.rejected for ex in examples]
    prompt_lens = [len(ex.prompt) for ex in examples] * 2
    pad = tokenizer.pad_id if tokenizer.pad_id >= 0 else tokenizer.eos_id
    ids = pad_rows(full, pad)
    inputs, labels = ids[:, :-1].clone(), ids[:, 1:].clone()
    positions = torch.arange(labels.size(1))
    lengths = torch.tensor([len(f) for f in full])
    completion = (positions[None, :] >= torch.tensor(prompt_lens)[:, None] - 1) & \
        (positions[None, :] < lengths[:, None] - 1)
    labels[~completion] = IGNORE_INDEX
    dpo_labels = labels.clone()
    if mask_formatting:
        # On the whole sequence (a header's role name is recognised between its two special tokens), then shifted.
        dpo_labels[losses.formatting_token_mask(ids, tokenizer)[:, 1:]] = IGNORE_INDEX
    return inputs, labels, dpo_labels


def collate_dpo(examples: list[EncodedPreference], ref_logps: Tensor, step_chosen_tokens: int, step_pairs: int,
                tokenizer: Tokenizer, cfg: DPORunConfig) -> Batch:
    inputs, labels, dpo_labels = sequences(examples, tokenizer, cfg.dpo.mask_formatting_tokens)
    weight = cfg.dpo.nll_coef * step_pairs / max(step_chosen_tokens, 1)
    n_tokens = sum(2 * len(ex.prompt) + len(ex.chosen) + len(ex.rejected) - 2 for ex in examples)
    return Batch(inputs, DPOTargets(labels, dpo_labels, ref_logps, torch.tensor(weight, dtype=torch.float64)),
                 n_tokens=n_tokens)


def chosen_tokens(ex: EncodedPreference) -> int:
    """Completion tokens of the chosen response that the NLL term trains."""
    return len(ex.chosen)


@torch.inference_mode()
def reference_logprobs(model: torch.nn.Module, examples: list[EncodedPreference], tokenizer: Tokenizer,
                       mask_formatting: bool, batch_size: int = 8, autocast_bf16: bool = False) -> Tensor:
    """``[n, 2]``: the reference model's sequence log-probs (chosen, rejected) of every row's DPO tokens."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        inputs, _, dpo_labels = sequences(chunk, tokenizer, mask_formatting)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast_bf16):
            logps = losses.sequence_logprobs(model(inputs.to(device)), dpo_labels.to(device)).float().cpu()
        out.append(torch.stack(logps.chunk(2), dim=1))
    return torch.cat(out)


class DPOTask:
    def __init__(self, cfg: DPORunConfig, examples: list[EncodedPreference], ref: Tensor, tokenizer: Tokenizer,
                 args: ModelArgs, world: World):
        if world.pp_size > 1 or world.degrees["tp"] > 1:
            raise ConfigError("dpo: parallel.pp and parallel.tp are not supported (use parallel.dp_shard / "
                              "dp_replicate)")
        self.cfg, self.args, self.world = cfg, args, world
        d = cfg.data
        train_idx, val_idx = split_validation(len(examples), d.val_fraction)

        def source(indices: list[int], batch_size: int, shuffle: bool) -> ExampleSource:
            def collate(mine: list[int], step: list[int]) -> Batch:
                rows = [indices[i] for i in mine]
                return collate_dpo([examples[r] for r in rows], torch.cat([ref[rows, 0], ref[rows, 1]]),
                                   sum(chosen_tokens(examples[indices[i]]) for i in step), len(step), tokenizer, cfg)

            return ExampleSource(len(indices), batch_size, collate, d.seed, world.dp_rank, world.dp_size, shuffle)

        self.train_data = source(train_idx, d.batch_size, True)
        self.val_data = source(val_idx, d.batch_size // cfg.train.grad_accum, False) if val_idx else None

    def build_model(self, cfg: DPORunConfig, args: ModelArgs) -> Transformer:
        return build_policy(cfg, args)

    def export(self, model: torch.nn.Module, path: Path, tokenizer: Tokenizer, world: World) -> None:
        export_policy(self.cfg, self.args, model, path, tokenizer, world)

    def model_inputs(self, batch: Batch, device: torch.device) -> dict:
        # Right-padded rows, causal attention: padding never reaches a real token. Logits of the completion tokens
        # only (the DPO and NLL terms read nothing else).
        return {"logits_at": batch.targets.labels.to(device) != IGNORE_INDEX}

    def count(self, targets: DPOTargets) -> Tensor:
        return torch.tensor(targets.pairs)

    def loss(self, logits: Tensor, targets: DPOTargets) -> tuple[Tensor, Tensor]:
        """Sum over this micro-batch's pairs of the DPO loss, plus its chosen tokens' NLL scaled so that the step's
        total divided by the step's pairs is the formula in the module docstring."""
        if logits.dim() == 2:  # [N, vocab]: the completion positions only (``logits_at``), back to [2b, S]
            trained = targets.labels != IGNORE_INDEX
            tokens = torch.zeros(targets.labels.shape, dtype=torch.float32, device=logits.device)
            tokens[trained] = losses.token_logprobs(logits, targets.labels[trained])
        else:
            tokens = losses.token_logprobs(logits, targets.labels)  # 0 where not a completion token
        in_dpo = (targets.dpo_labels != IGNORE_INDEX).to(tokens.dtype)
        policy = (tokens * in_dpo).sum(-1)
        b = targets.pairs
        ref = targets.ref_logps.to(policy.dtype)
        dpo = losses.dpo_loss(policy[:b], policy[b:], ref[:b], ref[b:], self.cfg.dpo.beta)
        nll = -tokens[:b].sum()
        return dpo.sum() + targets.nll_weight.to(nll.dtype) * nll, torch.tensor(b)


# --- the reference pass, stored in the run directory -----------------------------------------------------------
def _fingerprint(cfg: DPORunConfig, examples: list[EncodedPreference]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"init_from": str(cfg.model.init_from), "mask": cfg.dpo.mask_formatting_tokens,
                         "dtype": cfg.train.dtype}).encode())
    for ex in examples:
        h.update(json.dumps([ex.prompt, ex.chosen, ex.rejected]).encode())
    return h.hexdigest()


def load_or_compute_reference(cfg: DPORunConfig, run_dir: Path, examples: list[EncodedPreference],
                              tokenizer: Tokenizer, args: ModelArgs, world: World) -> Tensor:
    """The reference log-probs ``[n, 2]``: read from ``RUN_DIR/dpo_reference.pt``, or computed by rank 0 with the
    initial model (before the policy is built, so one model is in memory at a time) and written atomically."""
    from herd.train.loop import initial_model, resolve_device

    path = run_dir / REFERENCE_FILE
    fingerprint = _fingerprint(cfg, examples)
    if world.is_main and not path.exists():
        device = resolve_device(cfg.train.device)
        bf16 = cfg.train.dtype == "bf16" or (cfg.train.dtype == "auto" and device.type == "cuda")
        model = initial_model(cfg, args).to(device).eval()
        print(f"dpo: reference pass over {len(examples)} preference rows")
        ref = reference_logprobs(model, examples, tokenizer, cfg.dpo.mask_formatting_tokens, cfg.dpo.ref_batch_size,
                                 bf16)
        del model
        buffer = io.BytesIO()
        torch.save({"fingerprint": fingerprint, "ref_logps": ref}, buffer)
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, buffer.getvalue())
    world.barrier()
    stored = torch.load(path, weights_only=True)
    if stored["fingerprint"] != fingerprint:
        raise ConfigError(f"{path} holds reference log-probs of other data or settings (data.path, model.init_from, "
                          f"dpo.mask_formatting_tokens or train.dtype changed); use a new --run-dir")
    return stored["ref_logps"]


def dpo(cfg: DPORunConfig, run_dir: str | Path) -> list[dict]:
    """DPO-train ``model.init_from`` on the preference rows of ``data.path`` in ``run_dir`` (resuming from its latest
    checkpoint and reusing its stored reference log-probs); the per-step metrics records."""
    from herd.train.loop import model_args_for, train

    if cfg.dpo.beta <= 0:
        raise ConfigError(f"dpo.beta must be positive, got {cfg.dpo.beta}")
    run_dir = Path(run_dir)
    tokenizer = open_tokenizer(cfg)
    examples = load_preference_examples(cfg, tokenizer)
    args = model_args_for(cfg, tokenizer.n_words)

    def make_task(world: World) -> DPOTask:
        ref = load_or_compute_reference(cfg, run_dir, examples, tokenizer, args, world)
        return DPOTask(cfg, examples, ref, tokenizer, args, world)

    return train(cfg, run_dir, make_task, tokenizer, name="dpo")
