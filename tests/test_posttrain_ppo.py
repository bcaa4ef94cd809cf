"""PPO: the loss pieces against direct computations, the rollout alignment, and PPO through the training loop
(rollouts from the engine, a verifiable reward, export, exact resume)."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

import herd
from herd.posttrain.ppo import (
    gae,
    kl_penalty,
    policy_loss,
    response_labels,
    value_loss,
    whiten,
)
from herd.train.task import IGNORE_INDEX

GEN = torch.Generator().manual_seed(0)


def _masked_rows(B=4, T=9):
    """Rows whose response occupies a contiguous span [start, end) (prompt before, padding after)."""
    mask = torch.zeros(B, T, dtype=torch.bool)
    spans = [(2, 7), (0, 9), (4, 5), (1, 6)][:B]
    for b, (s, e) in enumerate(spans):
        mask[b, s:e] = True
    return mask, spans


def test_kl_estimators():
    logp = torch.randn(3, 5, generator=GEN) - 2
    ref = torch.randn(3, 5, generator=GEN) - 2
    assert torch.allclose(kl_penalty(logp, ref, "k1"), logp - ref)
    ratio = torch.exp(ref - logp)  # pi_ref / pi
    k3 = kl_penalty(logp, ref, "k3")
    assert torch.allclose(k3, ratio - 1 - torch.log(ratio), atol=1e-6) and (k3 >= 0).all()
    # Both are unbiased: over samples of pi, their mean is KL(pi || pi_ref).
    logits, ref_logits = torch.randn(6, generator=GEN), torch.randn(6, generator=GEN)
    p, lp, lr = logits.softmax(0), logits.log_softmax(0), ref_logits.log_softmax(0)
    exact = (p * (lp - lr)).sum()
    for est in ("k1", "k3"):
        assert torch.allclose((p * kl_penalty(lp, lr, est)).sum(), exact, atol=1e-6)
    with pytest.raises(ValueError):
        kl_penalty(logp, ref, "k2")


def test_whiten_uses_only_masked_entries():
    mask, _ = _masked_rows()
    x = torch.randn(4, 9, generator=GEN) * 3 + 1
    x_garbage = x.masked_fill(~mask, 1e6)  # unmasked entries must not matter
    chosen = x[mask]
    expected = (chosen - chosen.mean()) / torch.sqrt(chosen.var(unbiased=True) + 1e-8)
    assert torch.allclose(whiten(x_garbage, mask)[mask], expected, atol=1e-5)
    assert torch.allclose(whiten(x, mask, shift_mean=False)[mask], expected + chosen.mean(), atol=1e-5)


def test_gae_matches_a_direct_computation():
    mask, spans = _masked_rows()
    rewards = torch.randn(4, 9, generator=GEN)
    values = torch.randn(4, 9, generator=GEN)
    gamma, lam = 0.9, 0.8
    adv, ret = gae(rewards, values, mask, gamma, lam)
    for b, (s, e) in enumerate(spans):
        r, v = rewards[b, s:e].tolist(), values[b, s:e].tolist() + [0.0]  # V after the last token: 0
        expected = []
        for t in range(len(r)):  # A_t = sum_l (gamma lam)^l delta_{t+l}
            expected.append(sum((gamma * lam) ** k * (r[t + k] + gamma * v[t + k + 1] - v[t + k])
                                for k in range(len(r) - t)))
        assert torch.allclose(adv[b, s:e], torch.tensor(expected), atol=1e-5)
        assert torch.allclose(ret[b, s:e], torch.tensor(expected) + values[b, s:e], atol=1e-5)
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()
    # gamma = lam = 1: the advantage is the sum of the remaining rewards minus the value (Monte Carlo).
    adv1, _ = gae(rewards, values, mask, 1.0, 1.0)
    s, e = spans[0]
    assert torch.allclose(adv1[0, s], rewards[0, s:e].sum() - values[0, s], atol=1e-5)


@pytest.mark.parametrize("adv, ratio, expected", [
    (2.0, 1.5, -2.0 * 1.2),   # good action, already more likely: the gain is clipped at 1 + eps
    (2.0, 0.5, -2.0 * 0.5),   # good action, less likely: unclipped (max picks the pessimistic term)
    (-1.0, 0.5, 1.0 * 0.8),   # bad action, already less likely: clipped at 1 - eps
    (-1.0, 1.5, 1.0 * 1.5),   # bad action, more likely: unclipped, full penalty
    (3.0, 1.0, -3.0),
])
def test_policy_loss_values(adv, ratio, expected):
    old = torch.tensor([-1.3])
    new = old + math.log(ratio)
    assert policy_loss(new, old, torch.tensor([adv]), clip=0.2).item() == pytest.approx(expected, rel=1e-6)


def test_policy_loss_gradient_vanishes_when_clipped():
    old = torch.tensor([-1.0, -1.0])
    new = (old + torch.tensor([math.log(1.5), math.log(1.1)])).requires_grad_()
    policy_loss(new, old, torch.tensor([2.0, 2.0]), clip=0.2).sum().backward()
    assert new.grad[0] == 0  # clipped: no incentive to push further
    assert new.grad[1] == pytest.approx(-2.0 * 1.1, rel=1e-5)  # d(-A rho)/dlogp = -A rho


@pytest.mark.parametrize("v, old, ret, expected", [
    (1.0, 0.9, 0.0, 0.5),   # inside the clip range: 1/2 (V - R)^2
    (2.0, 1.0, 0.0, 2.0),   # clipped V 1.2 is nearer R: the max keeps the unclipped error 1/2 * 4
    (0.0, 1.0, 2.0, 2.0),   # clipped V 0.8 is nearer R: unclipped 1/2 * 4
    (1.5, 1.0, 2.0, 0.32),  # clipped V 1.2 is farther from R: 1/2 * 0.8^2 (no credit for leaving the range)
])
def test_value_loss_values(v, old, ret, expected):
    got = value_loss(torch.tensor([v]), torch.tensor([old]), torch.tensor([ret]), clip=0.2).item()
    assert got == pytest.approx(expected, rel=1e-5)


def test_response_labels_align_with_next_token_logits():
    seqs = [[1, 5, 6, 7, 8], [1, 9, 3]]
    inputs, labels = response_labels(seqs, prompt_lengths=[3, 2], width=4)
    assert inputs.tolist() == [[1, 5, 6, 7], [1, 9, 0, 0]]
    # position t predicts token t + 1: the responses [7, 8] and [3] sit at positions 2-3 and 1
    assert labels.tolist() == [[IGNORE_INDEX, IGNORE_INDEX, 7, 8], [IGNORE_INDEX, 3, IGNORE_INDEX, IGNORE_INDEX]]


# --- PPO through the training loop -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory, small_tokenizer):
    tok, _ = small_tokenizer
    d = tmp_path_factory.mktemp("ppo")
    args = herd.ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.n_words, multiple_of=32,
                          max_seq_len=128)
    model = herd.Transformer(args)
    model.init_weights(seed=0)
    herd.save_model(model, d / "policy", tokenizer=tok)
    from herd.posttrain.demo import prompts

    (d / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompts(16, seed=0)))
    return d


def _run(policy_dir, run_dir, *extra):
    from herd.config import load_config
    from herd.posttrain.ppo import PPORunConfig, ppo

    overrides = [f"--model.init_from={policy_dir / 'policy'}", f"--data.path={policy_dir / 'prompts.jsonl'}",
                 "--ppo.reward_function=tests.test_posttrain_ppo:text_length", "--log.progress=false",
                 "--log.tensorboard=false",
                 *extra]
    cfg = load_config(herd_root() / "configs" / "ppo-tiny-cpu.toml", overrides, cls=PPORunConfig)
    return ppo(cfg, run_dir)


def text_length(prompt_messages, response: str) -> float:
    """A reward that differs between the samples of an untrained model (the demo's checker gives it only zeros)."""
    return float(len(response))


def herd_root():
    from pathlib import Path

    return Path(__file__).resolve().parents[1]


PPO_SMALL = ("--train.steps=4", "--ppo.rollout_batch=8", "--data.batch_size=4", "--ppo.epochs=1",
             "--ppo.max_new_tokens=6", "--checkpoint.interval=2", "--train.device=cpu", "--data.seq_len=128")


@pytest.mark.slow
def test_ppo_trains_through_the_loop_and_resumes_exactly(policy_dir, tmp_path):
    records = _run(policy_dir, tmp_path / "a", *PPO_SMALL)
    assert [r["step"] for r in records] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in records)
    rollouts = [json.loads(line) for line in (tmp_path / "a" / "rollouts.jsonl").read_text().splitlines()]
    assert len(rollouts) == 2 and rollouts[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # first rollout: policy = ref
    model = herd.load_model(tmp_path / "a" / "model")
    start = herd.load_model(policy_dir / "policy")
    assert list(model.state_dict()) == list(start.state_dict())  # the policy alone, no value head
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), start.state_dict().values()))

    # Resume: a second run loses its last checkpoint and export, and redoes steps 3-4 from step 2.
    _run(policy_dir, tmp_path / "b", *PPO_SMALL)
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-4")
    shutil.rmtree(tmp_path / "b" / "model")
    resumed = _run(policy_dir, tmp_path / "b", *PPO_SMALL)
    assert [r["step"] for r in resumed] == [3, 4]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in records[2:]]
    again = herd.load_model(tmp_path / "b" / "model")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_ppo_config_errors(policy_dir, tmp_path):
    from herd.config import ConfigError

    with pytest.raises(ConfigError, match="exactly one of ppo.reward_model"):
        _run(policy_dir, tmp_path / "x", *PPO_SMALL, "--ppo.reward_model=somewhere")
    with pytest.raises(ConfigError, match="not a multiple"):
        _run(policy_dir, tmp_path / "y", "--ppo.rollout_batch=6", "--data.batch_size=4")
    with pytest.raises(ConfigError, match="cannot import"):
        _run(policy_dir, tmp_path / "z", "--ppo.reward_function=herd.nothing:here")


def test_reward_model_scores_the_rollouts(policy_dir, small_tokenizer, tmp_path):
    """With ppo.reward_model, a rollout's scores are the reward model's scores of prompt + response."""
    from herd.config import load_config
    from herd.posttrain.ppo import PolicyWithValue, PPORunConfig, PPOTask
    from herd.posttrain.rejection import read_prompts
    from herd.posttrain.reward import RewardModel, save_reward_model, score_dialogs

    tok, _ = small_tokenizer
    policy = herd.load_model(policy_dir / "policy")
    rm = RewardModel.from_language_model(policy, seed=1)
    save_reward_model(rm, tmp_path / "rm", tokenizer=tok)
    cfg = load_config(None, [f"--ppo.reward_model={tmp_path / 'rm'}"], cls=PPORunConfig)
    prompts = read_prompts(policy_dir / "prompts.jsonl")[:3]
    task = PPOTask(cfg, prompts, tok, tmp_path)
    task.model = PolicyWithValue(policy)
    responses = ["12", "seven", "3 + 4"]
    expected = score_dialogs(rm, tok, [p + [{"role": "assistant", "content": r}] for p, r in zip(prompts, responses)])
    assert task.score(prompts, responses) == pytest.approx(expected, abs=1e-5)
    assert len(set(expected)) == 3
