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
from torch.distributed.tensor import DTensor, Shard

from herd.config import ConfigError
from herd.data.loader import Batch
from herd.io import atomic_write_bytes
from herd.model.args import ModelArgs
from herd.model.transformer import Transformer
from herd.posttrain import losses
from herd.posttrain.config import DPORunConfig
from herd.posttrain.data import (
    EncodedPreference,
    ExampleSource,
    SharedPrefixRows,
    load_preference_examples,
    prefix_attention,
    prefix_rows,
    split_validation,
)
from herd.posttrain.sft import build_policy, export_policy, open_tokenizer
from herd.tokenizer import Tokenizer
from herd.train.parallelize import World

REFERENCE_FILE = "dpo_reference.pt"


@dataclass
class DPOTargets:
    """A micro-batch's targets, one entry per scored token ("site") of its ``b`` pairs: the row and column whose logits
    predict it, the token, the side (0 chosen, 1 rejected) and whether it is in the DPO term."""

    row: Tensor  # [N] the pair's row
    col: Tensor  # [N] the position whose logits predict the token
    label: Tensor  # [N] the token
    side: Tensor  # [N] 0 = chosen, 1 = rejected
    in_dpo: Tensor  # [N] bool: in the DPO term (False for formatting tokens when masked); the NLL term takes all
    ref_logps: Tensor  # [2b] reference sequence log-probs (chosen rows, then rejected)
    nll_weight: Tensor  # scalar: nll_coef * (pairs in the step) / (chosen completion tokens in the step)

    def to(self, device) -> DPOTargets:
        return DPOTargets(*(t.to(device) for t in (self.row, self.col, self.label, self.side, self.in_dpo,
                                                   self.ref_logps, self.nll_weight)))

    @property
    def pairs(self) -> int:
        return self.ref_logps.numel() // 2


@dataclass
class PairRows:
    """Preference pairs laid out one per row (``data.prefix_rows``): the prompt once, then ``chosen[:-1]``, then
    ``rejected[:-1]`` (a response's last token is only ever a label), and the sites to score."""

    rows: SharedPrefixRows
    sites: tuple[Tensor, Tensor, Tensor, Tensor, Tensor]  # row, col, label, side, in_dpo (``DPOTargets``' first five)


def pair_rows(examples: list[EncodedPreference], tokenizer: Tokenizer, mask_formatting: bool,
              multiple_of: int = 1) -> PairRows:
    pad = tokenizer.pad_id if tokenizer.pad_id >= 0 else tokenizer.eos_id
    rows = prefix_rows([(ex.prompt, [ex.chosen[:-1], ex.rejected[:-1]]) for ex in examples], pad, multiple_of)
    site_row, site_col, site_label, site_side, site_in_dpo = [], [], [], [], []
    for r, ex in enumerate(examples):
        P = len(ex.prompt)
        for side, response in enumerate((ex.chosen, ex.rejected)):
            # Token k of a response is predicted at the prompt's last position (k = 0), else at its own token k - 1.
            start = rows.starts[r][side]
            if mask_formatting:  # on the whole sequence (a header's role is recognised between its special tokens)
                formatting = losses.formatting_token_mask(torch.tensor(ex.prompt + response), tokenizer)[P:].tolist()
            else:
                formatting = [False] * len(response)
            site_row += [r] * len(response)
            site_col += [P - 1] + list(range(start, start + len(response) - 1))
            site_label += response
            site_side += [side] * len(response)
            site_in_dpo += [not f for f in formatting]
    return PairRows(rows, (torch.tensor(site_row), torch.tensor(site_col), torch.tensor(site_label),
                           torch.tensor(site_side), torch.tensor(site_in_dpo)))


def pair_inputs(positions: Tensor, branch: Tensor, targets: DPOTargets, device: torch.device,
                sites_only: bool = True) -> dict:
    """The model's keyword inputs for pair rows: positions, the shared-prefix mask and (``sites_only``) the logits to
    compute, the sites'."""
    inputs = {"positions": positions.to(device), "mask": prefix_attention(branch, device)}
    if sites_only:
        inputs["logits_at"] = (targets.row.to(device), targets.col.to(device))
    return inputs


def site_logprobs(logits: Tensor, targets: DPOTargets) -> Tensor:
    """``[N]`` log-probabilities of the sites' tokens. ``logits`` are the sites' own ``[N, vocab]`` (``logits_at``),
    or, under tensor parallelism, the full ``[B, S, vocab]`` sharded on the vocabulary (a DTensor): each rank picks
    the sites from its shard and the cross-entropy runs on the sharded rows (the loop's ``loss_parallel``), so the
    full vocabulary is never gathered."""
    if isinstance(logits, DTensor):
        picked = DTensor.from_local(logits.to_local()[targets.row, targets.col], logits.device_mesh, [Shard(1)])
        return losses.token_logprobs(picked, targets.label).full_tensor()
    if logits.dim() == 3:
        logits = logits[targets.row, targets.col]
    return losses.token_logprobs(logits, targets.label)


def sequence_sums(site_logps: Tensor, targets: DPOTargets) -> tuple[Tensor, Tensor]:
    """``(policy [2b], nll)``: each sequence's log-prob over its DPO tokens (chosen rows, then rejected), and the sum
    of −log p over every chosen token."""
    b = targets.pairs
    policy = torch.zeros(2 * b, dtype=site_logps.dtype, device=site_logps.device)
    policy = policy.index_add(0, targets.side * b + targets.row, site_logps * targets.in_dpo.to(site_logps.dtype))
    nll = -(site_logps * (targets.side == 0).to(site_logps.dtype)).sum()
    return policy, nll


def collate_dpo(examples: list[EncodedPreference], ref_logps: Tensor, step_chosen_tokens: int, step_pairs: int,
                tokenizer: Tokenizer, cfg: DPORunConfig, multiple_of: int = 1) -> Batch:
    pairs = pair_rows(examples, tokenizer, cfg.dpo.mask_formatting_tokens, multiple_of)
    weight = cfg.dpo.nll_coef * step_pairs / max(step_chosen_tokens, 1)
    targets = DPOTargets(*pairs.sites, ref_logps, torch.tensor(weight, dtype=torch.float64))
    rows = pairs.rows  # Batch.doc_ids carries the rows' branches (prompt, chosen, rejected, padding)
    return Batch(rows.inputs, targets, rows.branch, rows.positions, rows.n_tokens)


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
        pairs = pair_rows(examples[i:i + batch_size], tokenizer, mask_formatting)
        rows = pairs.rows
        targets = DPOTargets(*pairs.sites, torch.zeros(2 * rows.inputs.size(0)), torch.tensor(0.0)).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast_bf16):
            logits = model(rows.inputs.to(device), **pair_inputs(rows.positions, rows.branch, targets, device))
            site_logps = site_logprobs(logits, targets).float()
        policy, _ = sequence_sums(site_logps, targets)
        out.append(torch.stack(policy.cpu().chunk(2), dim=1))
    return torch.cat(out)


class DPOTask:
    def __init__(self, cfg: DPORunConfig, examples: list[EncodedPreference], ref: Tensor, tokenizer: Tokenizer,
                 args: ModelArgs, world: World):
        if world.pp_size > 1:
            raise ConfigError("dpo: parallel.pp is not supported (use parallel.tp, dp_shard, dp_replicate)")
        self.cfg, self.args, self.world = cfg, args, world
        tp = world.degrees["tp"]
        d = cfg.data
        train_idx, val_idx = split_validation(len(examples), d.val_fraction)

        def source(indices: list[int], batch_size: int, shuffle: bool) -> ExampleSource:
            def collate(mine: list[int], step: list[int]) -> Batch:
                rows = [indices[i] for i in mine]
                return collate_dpo([examples[r] for r in rows], torch.cat([ref[rows, 0], ref[rows, 1]]),
                                   sum(chosen_tokens(examples[indices[i]]) for i in step), len(step), tokenizer, cfg,
                                   multiple_of=tp)

            return ExampleSource(len(indices), batch_size, collate, d.seed, world.dp_rank, world.dp_size, shuffle)

        self.train_data = source(train_idx, d.batch_size, True)
        self.val_data = source(val_idx, d.batch_size // cfg.train.grad_accum, False) if val_idx else None

    def build_model(self, cfg: DPORunConfig, args: ModelArgs) -> Transformer:
        return build_policy(cfg, args)

    def export(self, model: torch.nn.Module, path: Path, tokenizer: Tokenizer, world: World) -> None:
        export_policy(self.cfg, self.args, model, path, tokenizer, world)

    def model_inputs(self, batch: Batch, device: torch.device) -> dict:
        # doc_ids: the rows' branches. Under tensor parallelism the hidden states are sequence shards: full logits.
        return pair_inputs(batch.positions, batch.doc_ids, batch.targets, device,
                           sites_only=self.world.degrees["tp"] == 1)

    def count(self, targets: DPOTargets) -> Tensor:
        return torch.tensor(targets.pairs)

    def loss(self, logits: Tensor, targets: DPOTargets) -> tuple[Tensor, Tensor]:
        """Sum over this micro-batch's pairs of the DPO loss, plus its chosen tokens' NLL scaled so that the step's
        total divided by the step's pairs is the formula in the module docstring. ``logits [N, vocab]`` are those of
        the sites (``DPOTargets``), in their order (or all positions' under tensor parallelism: ``site_logprobs``)."""
        policy, nll = sequence_sums(site_logprobs(logits, targets), targets)
        b = targets.pairs
        ref = targets.ref_logps.to(policy.dtype)
        dpo = losses.dpo_loss(policy[:b], policy[b:], ref[:b], ref[b:], self.cfg.dpo.beta)
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
