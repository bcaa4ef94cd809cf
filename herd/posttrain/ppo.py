"""PPO for language models (Ouyang et al. 2022; "The N implementation details of RLHF with PPO", as TRL's
``PPOTrainer`` and torchtune's PPO recipe implement it), through the one training loop.

``herd ppo --config FILE.toml --run-dir DIR`` with ``model.init_from`` (the policy, also the frozen reference),
``data.path`` (prompts JSONL: ``{"messages": [...]}`` or ``{"prompt": str}``) and a reward: ``ppo.reward_model`` (a
reward-model directory, ``herd reward``) or ``ppo.reward_function`` (``"module:function"``, called as
``f(prompt_messages, response_text) -> float``: a verifiable reward such as ``herd.posttrain.demo:reward``).

One rollout: ``ppo.rollout_batch`` prompts are sampled with the current policy weights through herd's engine
(temperature ``ppo.temperature``), scored, and turned into per-token advantages; the loop then takes
``ppo.epochs`` passes over the rollout in shuffled minibatches of ``data.batch_size`` samples, one optimizer step each,
before the next rollout. The policy's value head reads the final-norm hidden state (one trunk, as TRL's
``AutoModelForCausalLMWithValueHead``). Everything is seeded, and the rollout in progress is part of the data source's
state, so a resumed run continues exactly. One process only (no data, tensor or pipeline parallelism yet).

The pieces, each a pure function tested against a direct computation (per-token tensors ``[B, T]`` with a
``mask`` of the response tokens):

- ``kl_penalty``: k1 = log π(a) − log π_ref(a) (TRL's default) or k3 = (r − 1) − log r with r = π_ref(a) / π(a);
- rewards: r_t = −β·KL_t on every response token, plus the reward model's score on the last one;
- ``gae``: δ_t = r_t + γ V_{t+1} − V_t (V after the last token is 0), A_t = δ_t + γλ A_{t+1}, returns R_t = A_t + V_t;
- ``whiten``: (x − mean) / sqrt(var + 1e-8) over the masked tokens of the rollout;
- ``policy_loss``: max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)) with ρ = exp(log π − log π_old);
- ``value_loss``: ½·max((V − R)², (clip(V, V_old − c, V_old + c) − R)²);
- per step: Σ (policy_loss + vf_coef · value_loss) over the step's response tokens / their number.

Log-probabilities use logits / temperature (the distribution the samples were drawn from), as TRL does.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from herd.config import ConfigError, PretrainConfig
from herd.data.loader import Batch
from herd.model.args import ModelArgs
from herd.model.transformer import Transformer
from herd.posttrain.config import LoraConfig, PosttrainDataConfig
from herd.posttrain.losses import token_logprobs
from herd.tokenizer import ChatFormat, Tokenizer
from herd.train.parallelize import World
from herd.train.task import IGNORE_INDEX


# --- the loss pieces ------------------------------------------------------------------------------------------------
def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token estimate of KL(π || π_ref) from samples of π: ``k1`` = log π − log π_ref (unbiased, can be negative),
    ``k3`` = (π_ref/π − 1) − log(π_ref/π) (unbiased, never negative; Schulman's estimator)."""
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"kl estimator must be 'k1' or 'k3', got {estimator!r}")


def whiten(values: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """``(x − mean) / sqrt(var + 1e-8)`` with the mean and the (unbiased) variance over the masked entries; with
    ``shift_mean=False`` the mean is added back (TRL's ``masked_whiten``)."""
    mask = mask.to(values.dtype)
    n = mask.sum()
    mean = (values * mask).sum() / n
    var = (((values - mean) * mask) ** 2).sum() / (n - 1).clamp(min=1)
    out = (values - mean) * torch.rsqrt(var + 1e-8)
    return out if shift_mean else out + mean


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95
        ) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over each row's masked tokens (a contiguous response; the value after its
    last token is 0): ``(advantages, returns)``, both 0 outside the mask."""
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    next_value = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.size(1))):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
        next_value = values[:, t]
    return advantages, (advantages + values) * mask


def policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, clip: float = 0.2) -> Tensor:
    """Per-token clipped surrogate: ``max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε))``, ρ = exp(log π − log π_old)."""
    ratio = torch.exp(logprobs - old_logprobs)
    return torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - clip, 1 + clip))


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, clip: float = 0.2) -> Tensor:
    """Per-token clipped value loss: ``½·max((V − R)², (clip(V, V_old − c, V_old + c) − R)²)``."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)


# --- configuration --------------------------------------------------------------------------------------------------
@dataclass
class PPOConfig:
    reward_model: str = ""  # a reward-model directory (herd reward), or
    reward_function: str = ""  # "module:function", f(prompt_messages, response) -> float (a verifiable reward)
    rollout_batch: int = 64  # prompts sampled per rollout (a multiple of data.batch_size)
    epochs: int = 4  # passes over each rollout (TRL num_ppo_epochs)
    max_new_tokens: int = 53  # longest response (TRL response_length)
    temperature: float = 0.7  # sampling temperature (TRL's default)
    kl_coef: float = 0.05  # β of the per-token KL penalty (TRL)
    kl_estimator: str = "k1"  # k1 | k3
    clip_ratio: float = 0.2  # ε (TRL cliprange)
    clip_value: float = 0.2  # c (TRL cliprange_value)
    vf_coef: float = 0.1  # weight of the value loss (TRL)
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    score_batch_size: int = 16  # dialogs per reward-model forward


@dataclass
class PPORunConfig(PretrainConfig):
    data: PosttrainDataConfig = field(default_factory=PosttrainDataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)


# --- the model: policy + value head ---------------------------------------------------------------------------------
class PolicyWithValue(nn.Module):
    """The policy and a scalar value head on its final-norm hidden state: ``forward -> (logits, values [B, S])``."""

    def __init__(self, policy: Transformer):
        super().__init__()
        self.policy = policy
        self.value_head = nn.Linear(policy.args.dim, 1, bias=False)
        nn.init.zeros_(self.value_head.weight)  # values start at 0: the first advantages are the rewards
        self._hidden: Tensor | None = None
        policy.norm.register_forward_hook(self._keep_hidden)

    def _keep_hidden(self, module, inputs, output) -> None:
        self._hidden = output

    def forward(self, tokens: Tensor, positions: Tensor | None = None, mask=None) -> tuple[Tensor, Tensor]:
        logits = self.policy(tokens, positions=positions, mask=mask)
        hidden, self._hidden = self._hidden, None
        return logits, self.value_head(hidden).squeeze(-1).float()


@dataclass
class PPOTargets:
    """One micro-batch's rollout data, aligned with the logits: ``labels[b, t]`` is the response token that position
    ``t`` predicts (``IGNORE_INDEX`` elsewhere)."""

    labels: Tensor
    old_logprobs: Tensor
    old_values: Tensor
    advantages: Tensor
    returns: Tensor

    def to(self, device) -> PPOTargets:
        return PPOTargets(*(getattr(self, f.name).to(device) for f in dataclasses.fields(self)))


def response_labels(sequences: list[list[int]], prompt_lengths: list[int], width: int) -> tuple[Tensor, Tensor]:
    """``inputs [N, width]`` (each sequence minus its last token, right-padded with 0) and ``labels`` (the response
    tokens at the positions that predict them, ``IGNORE_INDEX`` elsewhere)."""
    inputs = torch.zeros(len(sequences), width, dtype=torch.long)
    labels = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    for i, (seq, p) in enumerate(zip(sequences, prompt_lengths)):
        ids = torch.tensor(seq, dtype=torch.long)
        inputs[i, :len(seq) - 1] = ids[:-1]
        labels[i, p - 1:len(seq) - 1] = ids[p:]
    return inputs, labels


def load_reward_function(spec: str) -> Callable[[list[dict], str], float]:
    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        raise ConfigError(f"ppo.reward_function: cannot import {spec!r} (expected 'module:function')") from None


# --- rollouts as a resumable batch source ---------------------------------------------------------------------------
class RolloutSource:
    """Optimizer-step batches of PPO minibatches; a new rollout with the task's current policy when one is used up.

    The state (steps consumed, the current rollout's tensors and minibatch order) round-trips through
    ``state_dict``, so a resumed run trains on the same minibatches."""

    def __init__(self, task: PPOTask):
        self.task = task
        self.steps = 0
        self.rollouts = 0
        self.buffer: dict[str, Tensor] | None = None
        self.order: list[list[int]] = []  # remaining minibatches (sample indices) of the current rollout

    @property
    def position(self) -> int:
        return self.steps

    def next_batch(self, micro_batches: int = 1) -> list[Batch]:
        if not self.order:
            self.buffer, self.order = self.task.rollout(self.rollouts)
            self.rollouts += 1
        minibatch = self.order.pop(0)
        self.steps += 1
        if len(minibatch) % micro_batches:
            raise ConfigError(f"data.batch_size={len(minibatch)} is not divisible by train.grad_accum={micro_batches}")
        size = len(minibatch) // micro_batches
        return [self._collate(minibatch[i:i + size]) for i in range(0, len(minibatch), size)]

    def _collate(self, indices: list[int]) -> Batch:
        b, idx = self.buffer, torch.tensor(indices)
        width = int((b["labels"][idx] != IGNORE_INDEX).nonzero()[:, 1].max()) + 1
        take = {k: v[idx, :width] for k, v in b.items()}
        return Batch(take["inputs"], PPOTargets(take["labels"], take["old_logprobs"], take["old_values"],
                                                take["advantages"], take["returns"]))

    def skip_batch(self) -> None:
        self.next_batch(1)

    def rewind(self) -> None:
        # The loop rewinds only validation sources; rollouts are made fresh from the current policy, never replayed.
        raise RuntimeError("a PPO rollout source is never rewound (PPO has no validation data)")

    def state_dict(self) -> dict:
        return {"steps": self.steps, "rollouts": self.rollouts, "buffer": self.buffer, "order": self.order}

    def load_state_dict(self, state: dict) -> None:
        self.steps, self.rollouts = state["steps"], state["rollouts"]
        self.buffer, self.order = state["buffer"], [list(m) for m in state["order"]]


class PPOTask:
    def __init__(self, cfg: PPORunConfig, prompts: list[list[dict]], tokenizer: Tokenizer, run_dir: Path):
        self.cfg, self.prompts, self.tokenizer, self.run_dir = cfg, prompts, tokenizer, run_dir
        self.chat = ChatFormat(tokenizer)
        self.encoded = [self.chat.encode_dialog_prompt(p) for p in prompts]
        self.model: PolicyWithValue | None = None  # the module the loop trains (set by build_model)
        self.reference: Transformer | None = None
        self.score = self._scorer()
        self.train_data = RolloutSource(self)
        self.val_data = None

    # --- hooks of the training loop ---
    def build_model(self, cfg: PPORunConfig, args: ModelArgs) -> PolicyWithValue:
        from herd.posttrain.sft import build_policy

        policy = build_policy(cfg, args)
        self.reference = copy.deepcopy(policy).eval().requires_grad_(False)  # the initial policy, frozen
        self.model = PolicyWithValue(policy)
        return self.model

    def export(self, model: nn.Module, path: Path, tokenizer: Tokenizer, world: World) -> None:
        from herd.posttrain.sft import export_policy

        export_policy(self.cfg, model.policy.args, model.policy, path, tokenizer, world)

    def model_inputs(self, batch: Batch, device: torch.device) -> dict:
        return {}  # right-padded sequences, causal attention, positions 0..S-1

    def count(self, targets: PPOTargets) -> Tensor:
        return (targets.labels != IGNORE_INDEX).sum()

    def loss(self, output: tuple[Tensor, Tensor], targets: PPOTargets) -> tuple[Tensor, Tensor]:
        p = self.cfg.ppo
        logits, values = output
        mask = targets.labels != IGNORE_INDEX
        logprobs = token_logprobs(logits.float() / p.temperature, targets.labels)
        per_token = policy_loss(logprobs, targets.old_logprobs, targets.advantages, p.clip_ratio) \
            + p.vf_coef * value_loss(values, targets.old_values, targets.returns, p.clip_value)
        return (per_token * mask).sum(), mask.sum()

    # --- rollouts ---
    def _scorer(self) -> Callable[[list[list[dict]], list[str]], list[float]]:
        p = self.cfg.ppo
        if p.reward_function:
            fn = load_reward_function(p.reward_function)
            return lambda prompts, responses: [float(fn(q, r)) for q, r in zip(prompts, responses)]
        from herd.posttrain.reward import load_reward_model, score_dialogs

        rm, rm_tok = load_reward_model(p.reward_model)
        return lambda prompts, responses: score_dialogs(
            rm.to(self.device), rm_tok, [q + [{"role": "assistant", "content": r}] for q, r in zip(prompts, responses)],
            batch_size=p.score_batch_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _prompt_indices(self, rollout: int) -> list[int]:
        """The prompts of rollout ``rollout``: consecutive slices of a seeded permutation per pass over the file."""
        n, k = len(self.prompts), self.cfg.ppo.rollout_batch
        orders: dict[int, np.ndarray] = {}
        out = []
        for j in range(rollout * k, (rollout + 1) * k):
            epoch, i = divmod(j, n)
            if epoch not in orders:
                orders[epoch] = np.random.default_rng([self.cfg.data.seed, epoch]).permutation(n)
            out.append(int(orders[epoch][i]))
        return out

    @torch.no_grad()
    def _sample(self, indices: list[int], rollout: int) -> tuple[list[list[int]], list[str]]:
        """Full token sequences (prompt + response, with its stop token when it stopped) and response texts."""
        from herd.inference.engine import Engine
        from herd.inference.sampling import SamplingParams

        p, policy = self.cfg.ppo, self.model.policy
        prompts = [self.encoded[i] for i in indices]
        max_len = min(max(len(x) for x in prompts) + p.max_new_tokens + 1, policy.args.max_seq_len)
        engine = Engine(policy, self.tokenizer, max_batch=min(64, len(prompts)), max_len=max_len,
                        max_waiting=len(prompts))
        base = (self.cfg.data.seed * 1_000_003 + rollout) * len(prompts)
        try:
            seqs = [engine.submit(ids, SamplingParams(max_new_tokens=p.max_new_tokens, temperature=p.temperature,
                                                      seed=base + j, logprobs=0,
                                                      stop_ids=tuple(self.tokenizer.stop_tokens)))
                    for j, ids in enumerate(prompts)]
            engine.run()
        finally:
            engine.close()
        sequences = []
        for ids, s in zip(prompts, seqs):
            stop = [s.logprobs[-1].token] if s.finish_reason == "stop" and s.logprobs else []
            sequences.append(ids + s.output + stop)
        return sequences, [s.text for s in seqs]

    @torch.no_grad()
    def _forward_logprobs(self, model: nn.Module, inputs: Tensor, labels: Tensor, with_values: bool
                          ) -> tuple[Tensor, Tensor | None]:
        dev, chunk = self.device, max(1, self.cfg.data.batch_size // self.cfg.train.grad_accum)
        logps, values = [], []
        for i in range(0, inputs.size(0), chunk):
            x, y = inputs[i:i + chunk].to(dev), labels[i:i + chunk].to(dev)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                out = model(x)
            logits = out[0] if with_values else out
            logps.append(token_logprobs(logits.float() / self.cfg.ppo.temperature, y).cpu())
            if with_values:
                values.append(out[1].float().cpu())
        return torch.cat(logps), torch.cat(values) if with_values else None

    def rollout(self, index: int) -> tuple[dict[str, Tensor], list[list[int]]]:
        """Sample, score and compute the advantages of rollout ``index`` with the current weights; the rollout's
        tensors and its minibatches (``ppo.epochs`` seeded shuffles, ``data.batch_size`` samples each)."""
        p, t0 = self.cfg.ppo, time.perf_counter()
        was_training = self.model.training
        self.model.eval()
        self.reference.to(self.device)
        indices = self._prompt_indices(index)
        sequences, texts = self._sample(indices, index)
        t_sample = time.perf_counter() - t0
        scores = torch.tensor(self.score([self.prompts[i] for i in indices], texts), dtype=torch.float32)
        width = max(len(s) for s in sequences) - 1
        inputs, labels = response_labels(sequences, [len(self.encoded[i]) for i in indices], width)
        old_logprobs, old_values = self._forward_logprobs(self.model, inputs, labels, with_values=True)
        ref_logprobs, _ = self._forward_logprobs(self.reference, inputs, labels, with_values=False)
        self.model.train(was_training)

        mask = labels != IGNORE_INDEX
        kl = kl_penalty(old_logprobs, ref_logprobs, p.kl_estimator) * mask
        rewards = -p.kl_coef * kl
        last = torch.tensor([len(s) - 2 for s in sequences])  # the position that predicts the final token
        rewards[torch.arange(len(sequences)), last] += scores
        old_values = old_values * mask
        advantages, returns = gae(rewards, old_values, mask, p.gamma, p.lam)
        if p.whiten_advantages:
            advantages = whiten(advantages, mask) * mask
        buffer = {"inputs": inputs, "labels": labels, "old_logprobs": old_logprobs, "old_values": old_values,
                  "advantages": advantages, "returns": returns}
        rng = np.random.default_rng([self.cfg.data.seed, index, 1])
        bs = self.cfg.data.batch_size
        order = [perm[i:i + bs].tolist() for _ in range(p.epochs)
                 for perm in [rng.permutation(len(sequences))] for i in range(0, len(sequences), bs)]
        stats = {"rollout": index + 1, "mean_score": scores.mean().item(),
                 "kl": kl.sum(1).mean().item(), "response_tokens": mask.sum(1).float().mean().item(),
                 "sample_s": t_sample, "rollout_s": time.perf_counter() - t0}
        with open(self.run_dir / "rollouts.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(stats) + "\n")
        print(f"rollout {index + 1}: mean score {stats['mean_score']:.3f}, KL {stats['kl']:.4f}, "
              f"{stats['response_tokens']:.1f} response tokens, {stats['rollout_s']:.1f} s", file=sys.stderr,
              flush=True)
        return buffer, order


def ppo(cfg: PPORunConfig, run_dir: str | Path) -> list[dict]:
    """PPO on ``data.path``'s prompts from ``model.init_from`` in ``run_dir`` (resuming from its latest checkpoint)."""
    from herd.posttrain.rejection import read_prompts
    from herd.posttrain.sft import open_tokenizer
    from herd.train.loop import train

    p, run_dir = cfg.ppo, Path(run_dir)
    if not cfg.data.path:
        raise ConfigError("data.path is not set (JSONL prompts)")
    if cfg.parallel.dp_shard * cfg.parallel.dp_replicate * cfg.parallel.tp * cfg.parallel.pp != 1:
        raise ConfigError("herd ppo runs in one process (no parallel layout yet)")
    if p.rollout_batch % cfg.data.batch_size:
        raise ConfigError(f"ppo.rollout_batch={p.rollout_batch} is not a multiple of data.batch_size="
                          f"{cfg.data.batch_size}")
    if p.temperature <= 0:
        raise ConfigError("ppo.temperature must be positive (PPO samples from the policy)")
    if p.kl_estimator not in ("k1", "k3"):
        raise ConfigError(f"ppo.kl_estimator must be 'k1' or 'k3', got {p.kl_estimator!r}")
    if bool(p.reward_model) == bool(p.reward_function):
        raise ConfigError("set exactly one of ppo.reward_model (a reward-model directory) and "
                          "ppo.reward_function ('module:function')")
    if p.reward_function:
        load_reward_function(p.reward_function)
    elif not Path(p.reward_model).exists():
        raise ConfigError(f"ppo.reward_model: {p.reward_model} does not exist")
    tokenizer = open_tokenizer(cfg)
    prompts = read_prompts(cfg.data.path)
    run_dir.mkdir(parents=True, exist_ok=True)
    return train(cfg, run_dir, lambda world: PPOTask(cfg, prompts, tokenizer, run_dir), tokenizer, name="ppo")
