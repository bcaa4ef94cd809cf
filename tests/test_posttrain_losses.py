"""``herd.posttrain.losses`` against direct computations: sequence log-probs, the sigmoid DPO loss (the reference's
hand-checked vector), Bradley–Terry without margin, and Meta's formatting-token mask on a real Llama 3 dialog (which
ids it excludes, and that the DPO loss with the mask ignores those tokens' logits). The DPO task's loss through the
loop (mask on, NLL term normalised over the step) equals a direct computation written here."""

import math

import pytest
import torch
import torch.nn.functional as F

from herd.posttrain import losses
from herd.posttrain.config import DPORunConfig
from herd.posttrain.data import EncodedPreference
from herd.posttrain.dpo import collate_dpo, sequences
from herd.tokenizer import ChatFormat
from herd.train.task import IGNORE_INDEX


def test_sequence_logprobs_sum_over_labelled_tokens():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g)
    labels = torch.randint(0, 11, (3, 5), generator=g)
    labels[0, :2] = IGNORE_INDEX
    labels[2] = IGNORE_INDEX
    direct = torch.stack([sum((logits[b, t].log_softmax(-1)[labels[b, t]] for t in range(5)
                               if labels[b, t] != IGNORE_INDEX), torch.tensor(0.0)) for b in range(3)])
    assert torch.allclose(losses.sequence_logprobs(logits, labels), direct, rtol=1e-6, atol=1e-6)
    assert losses.sequence_logprobs(logits, labels)[2] == 0
    n = (labels != IGNORE_INDEX).sum()
    assert torch.allclose(losses.nll_loss(logits, labels), -direct.sum() / n, rtol=1e-6)
    assert torch.allclose(losses.nll_loss(logits, labels, "sum"), -direct.sum(), rtol=1e-6)


def test_dpo_loss_hand_checked_vector():
    # scaling-and-preference.md §2b: beta 0.1, logp(w) -10, logp(l) -12, ref -11 / -11 -> Delta 2 -> log(1 + e^-0.2).
    loss = losses.dpo_loss(torch.tensor([-10.0]), torch.tensor([-12.0]), torch.tensor([-11.0]),
                           torch.tensor([-11.0]), beta=0.1)
    assert loss.item() == pytest.approx(0.5981389, abs=1e-7)
    assert losses.dpo_rewards(torch.tensor([-10.0]), torch.tensor([-11.0])).item() == pytest.approx(0.1)
    # Plus TRL's "sft" term at weight 0.2 with chosen-token log-probs (-2, -3, -5): mean NLL 10/3.
    assert (loss + 0.2 * (10 / 3)).item() == pytest.approx(1.2648055, abs=1e-6)


def test_dpo_loss_is_per_pair_and_matches_formula():
    g = torch.Generator().manual_seed(1)
    pc, pr, rc, rr = (torch.randn(6, generator=g) * 5 for _ in range(4))
    direct = torch.tensor([-math.log(1 / (1 + math.exp(-0.3 * ((a - c) - (b - d)))))
                           for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist())])
    assert torch.allclose(losses.dpo_loss(pc, pr, rc, rr, beta=0.3), direct, rtol=1e-5)


def test_reward_loss_is_bradley_terry_without_margin():
    chosen, rejected = torch.tensor([1.0, -0.5, 3.0]), torch.tensor([0.0, 0.5, 3.0])
    direct = torch.tensor([math.log(1 + math.exp(-(c - r))) for c, r in zip(chosen.tolist(), rejected.tolist())])
    assert torch.allclose(losses.reward_loss(chosen, rejected), direct, rtol=1e-6)
    assert losses.reward_loss(chosen, rejected)[2].item() == pytest.approx(math.log(2))


DIALOG = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Capital of France?"},
          {"role": "assistant", "content": "Paris."}]


def test_formatting_token_mask_on_a_llama3_dialog(llama3_tokenizer):
    tok = llama3_tokenizer
    ids = torch.tensor([tok.bos_id] + [t for m in DIALOG for t in ChatFormat(tok).encode_message(m)])
    mask = losses.formatting_token_mask(ids, tok)
    excluded = ids[mask].tolist()
    # Each header is <|start_header_id|> role <|end_header_id|>; each turn ends with <|eot_id|>.
    role = {r: tok.encode(r) for r in ("system", "user", "assistant")}
    assert excluded == ([128006, *role["system"], 128007, 128009] + [128006, *role["user"], 128007, 128009]
                        + [128006, *role["assistant"], 128007, 128009])
    kept = tok.decode(ids[~mask].tolist())
    assert kept == "<|begin_of_text|>\n\nYou are terse.\n\nCapital of France?\n\nParis."
    # Batched, along the last dimension.
    assert torch.equal(losses.formatting_token_mask(torch.stack([ids, ids]), tok)[1], mask)


def _pairs(tok):
    chat = ChatFormat(tok)
    prompt = chat.encode_dialog_prompt(DIALOG[:2])
    chosen = [t for m in [DIALOG[2], {"role": "user", "content": "And Spain?"},
                          {"role": "assistant", "content": "Madrid."}] for t in chat.encode_message(m)]
    chosen = chosen[len(chat.encode_header("assistant")):]  # the completion starts after the assistant header
    rejected = tok.encode("Lyon, I believe.") + [tok.eot_id]
    return [EncodedPreference(prompt, chosen, rejected, None, "x:1"),
            EncodedPreference(prompt, tok.encode("Paris") + [tok.eot_id],
                              tok.encode("London") + [tok.eot_id], None, "x:2")]


def test_dpo_task_loss_with_mask_matches_direct_computation(llama3_tokenizer):
    from herd.posttrain.dpo import DPOTask

    tok = llama3_tokenizer
    examples = _pairs(tok)
    cfg = DPORunConfig()
    cfg.dpo.beta, cfg.dpo.nll_coef = 0.1, 0.2
    ref = torch.tensor([-30.0, -41.0, -12.0, -9.5])  # chosen 1, chosen 2, rejected 1, rejected 2
    n_chosen = sum(len(e.chosen) for e in examples)
    batch = collate_dpo(examples, ref, n_chosen, 2, tok, cfg)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(*batch.inputs.shape, tok.n_words, generator=g) * 3
    task = DPOTask.__new__(DPOTask)
    task.cfg = cfg
    total, count = task.loss(logits, batch.targets)

    # Direct: per row, the completion tokens minus header/eot tokens for DPO, all completion tokens for the NLL.
    def direct_logp(row, full, prompt_len, drop_formatting):
        logp = torch.tensor(0.0)
        for t in range(prompt_len, len(full)):
            token = full[t]
            if drop_formatting and bool(losses.formatting_token_mask(torch.tensor(full), tok)[t]):
                continue
            logp = logp + logits[row, t - 1].log_softmax(-1)[token]
        return logp

    fulls = [e.prompt + e.chosen for e in examples] + [e.prompt + e.rejected for e in examples]
    plen = [len(e.prompt) for e in examples] * 2
    pol = [direct_logp(r, fulls[r], plen[r], True) for r in range(4)]
    dpo = sum(-F.logsigmoid(0.1 * ((pol[i] - ref[i]) - (pol[i + 2] - ref[i + 2]))) for i in range(2)) / 2
    nll = -sum(direct_logp(r, fulls[r], plen[r], False) for r in range(2)) / n_chosen
    assert int(count) == 2
    assert (total / count).item() == pytest.approx((dpo + 0.2 * nll).item(), rel=1e-5)

    # Changing the logits at positions that predict formatting tokens leaves the DPO term unchanged.
    _, labels, dpo_labels = sequences(examples, tok, mask_formatting=True)
    formatting = (labels != IGNORE_INDEX) & (dpo_labels == IGNORE_INDEX)
    assert formatting.any()
    assert set(labels[formatting].tolist()) <= {128006, 128007, 128009, *tok.encode("user"),
                                                *tok.encode("assistant")}
    changed = logits.clone()
    changed[formatting] += torch.randn(int(formatting.sum()), tok.n_words, generator=g) * 10
    cfg.dpo.nll_coef = 0.0  # the DPO term alone (the NLL term trains every completion token, formatting included)
    dpo_only = collate_dpo(examples, ref, n_chosen, 2, tok, cfg).targets
    before, _ = task.loss(logits, dpo_only)
    after, _ = task.loss(changed, dpo_only)
    assert before.item() == pytest.approx(2 * dpo.item(), rel=1e-5)
    assert after.item() == pytest.approx(before.item(), rel=1e-6)
    nomask, _, _ = sequences(examples, tok, mask_formatting=False)
    assert torch.equal(nomask, batch.inputs)
