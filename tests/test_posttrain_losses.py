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
from herd.posttrain.dpo import collate_dpo
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
    t = batch.targets
    g = torch.Generator().manual_seed(0)
    grid = torch.randn(*batch.inputs.shape, tok.n_words, generator=g) * 3  # logits at every position of the rows
    task = DPOTask.__new__(DPOTask)
    task.cfg = cfg
    total, count = task.loss(grid[t.row, t.col], t)

    # Direct. A pair's row is prompt + chosen[:-1] + rejected[:-1]: response token k is predicted at the prompt's last
    # position (k = 0), else at the position of the response's token k - 1. The DPO term drops header/eot tokens,
    # the NLL term keeps every chosen token.
    def direct_logp(i, side, drop_formatting):
        ex = examples[i]
        P, response = len(ex.prompt), (ex.chosen, ex.rejected)[side]
        start = P if side == 0 else P + len(ex.chosen) - 1
        formatting = losses.formatting_token_mask(torch.tensor(ex.prompt + response), tok)
        logp = torch.tensor(0.0)
        for k, token in enumerate(response):
            if drop_formatting and bool(formatting[P + k]):
                continue
            logp = logp + grid[i, P - 1 if k == 0 else start + k - 1].log_softmax(-1)[token]
        return logp

    pol = [direct_logp(i, side, True) for side in (0, 1) for i in range(2)]
    dpo = sum(-F.logsigmoid(0.1 * ((pol[i] - ref[i]) - (pol[i + 2] - ref[i + 2]))) for i in range(2)) / 2
    nll = -sum(direct_logp(i, 0, False) for i in range(2)) / n_chosen
    assert int(count) == 2
    assert (total / count).item() == pytest.approx((dpo + 0.2 * nll).item(), rel=1e-5)

    # Changing the logits at positions that predict formatting tokens leaves the DPO term unchanged.
    formatting = ~t.in_dpo
    assert formatting.any()
    assert set(t.label[formatting].tolist()) <= {128006, 128007, 128009, *tok.encode("user"),
                                                 *tok.encode("assistant")}
    at = set(zip(t.row[formatting].tolist(), t.col[formatting].tolist()))
    assert not at & set(zip(t.row[t.in_dpo].tolist(), t.col[t.in_dpo].tolist()))  # no position predicts both
    changed = grid.clone()
    changed[t.row[formatting], t.col[formatting]] += torch.randn(int(formatting.sum()), tok.n_words, generator=g) * 10
    cfg.dpo.nll_coef = 0.0  # the DPO term alone (the NLL term trains every completion token, formatting included)
    dpo_only = collate_dpo(examples, ref, n_chosen, 2, tok, cfg).targets
    before, _ = task.loss(grid[t.row, t.col], dpo_only)
    after, _ = task.loss(changed[t.row, t.col], dpo_only)
    assert before.item() == pytest.approx(2 * dpo.item(), rel=1e-5)
    assert after.item() == pytest.approx(before.item(), rel=1e-6)
    cfg.dpo.mask_formatting_tokens = False
    assert torch.equal(collate_dpo(examples, ref, n_chosen, 2, tok, cfg).inputs, batch.inputs)


def test_shared_prefix_row_gives_each_response_the_logits_it_has_after_the_prompt_alone():
    """A DPO pair in one row (prompt + chosen + rejected, ``shared_prefix_mask``, positions of each response
    continuing the prompt) gives every response position the logits of its own two-part sequence (1e-5: other
    attention kernels); the FlexAttention block mask used on GPU gives the dense mask's (forward; 1e-5)."""
    import herd
    from herd.model.masks import shared_prefix_block_mask, shared_prefix_mask

    model = herd.Transformer(herd.ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97))
    model.init_weights(seed=3)
    g = torch.Generator().manual_seed(1)
    prompt, chosen, rejected = (torch.randint(0, 97, (n,), generator=g) for n in (20, 30, 25))
    row = torch.cat([prompt, chosen, rejected])[None]
    branch = torch.tensor([[0] * 20 + [1] * 30 + [2] * 25])
    positions = torch.cat([torch.arange(50), torch.arange(20, 45)])[None]
    with torch.no_grad():
        shared = model(row, positions=positions, mask=shared_prefix_mask(branch))
        alone_c = model(torch.cat([prompt, chosen])[None])
        alone_r = model(torch.cat([prompt, rejected])[None])
        flex = model(row, positions=positions, mask=shared_prefix_block_mask(branch))
    torch.testing.assert_close(shared[0, :50], alone_c[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shared[0, 50:], alone_r[0, 20:], rtol=1e-5, atol=1e-5)
    assert (shared - flex).abs().max() < 1e-5


def test_reward_rows_with_a_prompt_and_its_responses_score_each_response_as_alone():
    """Meta's reward-model rows: a prompt and its 2-3 responses in one row. Each response's score equals the score of
    its own prompt + response row (1e-5: other attention kernels), edited included, and the pairs are edited > chosen
    > rejected."""
    import herd
    from herd.posttrain.reward import RewardModel, RewardTask, collate_pairs

    args = herd.ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97)
    lm = herd.Transformer(args)
    lm.init_weights(seed=4)
    model = RewardModel.from_language_model(lm, seed=1)
    g = torch.Generator().manual_seed(2)

    def ids(n):
        return torch.randint(0, 96, (n,), generator=g).tolist()

    examples = [EncodedPreference(ids(12), ids(9), ids(14), ids(7), "x:1"),
                EncodedPreference(ids(20), ids(5), ids(6), None, "x:2")]
    batch = collate_pairs(examples, pad=96)
    task = RewardTask.__new__(RewardTask)
    with torch.no_grad():
        scores = model(batch.inputs, **task.model_inputs(batch, torch.device("cpu")))
        shared = scores[batch.targets.row, batch.targets.col]
        alone = [model(torch.tensor([ex.prompt + r]), lengths=torch.tensor([len(ex.prompt) + len(r)])).item()
                 for ex in examples for r in (ex.chosen, ex.rejected, ex.edited) if r is not None]
    torch.testing.assert_close(shared, torch.tensor(alone), rtol=1e-5, atol=1e-5)
    assert batch.targets.better.tolist() == [0, 2, 2, 3] and batch.targets.worse.tolist() == [1, 0, 1, 4]
    assert batch.n_tokens == sum(len(ex.prompt) + len(ex.chosen) + len(ex.rejected) + len(ex.edited or [])
                                 for ex in examples)
