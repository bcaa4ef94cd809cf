"""Rejection sampling: K seeded samples per prompt from the engine, the reward model's best kept, SFT-format output."""

from __future__ import annotations

import json

import pytest
import torch

import herd
from herd.data.readers import DataError
from herd.posttrain.rejection import read_prompts, rejection_sample, select_best

from .test_posttrain_lora import random_model


@pytest.fixture(scope="module")
def models(tmp_path_factory, small_tokenizer):
    from herd.posttrain.reward import RewardModel, save_reward_model

    tok, _ = small_tokenizer
    d = tmp_path_factory.mktemp("rs")
    policy = random_model(seed=0, vocab_size=tok.n_words)
    with torch.no_grad():  # logit 0 for the stop ids, far below the top logits: no empty samples
        policy.output.weight[tok.stop_tokens] = 0.0
    herd.save_model(policy, d / "policy", tokenizer=tok)
    rm = RewardModel.from_language_model(random_model(seed=1, vocab_size=tok.n_words), seed=2)
    with torch.no_grad():
        rm.score.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(3))  # scores that differ
    save_reward_model(rm, d / "reward", tokenizer=tok)
    prompts = d / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Name a colour."}) + "\n\n"
                       + json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                                                  {"role": "user", "content": "Count to three."}]}) + "\n"
                       + json.dumps({"prompt": "Say hello"}) + "\n")
    return d, tok


def test_keeps_the_reward_models_best_of_k(models, tmp_path):
    from herd.posttrain.reward import load_reward_model, score_dialogs

    d, tok = models
    out = tmp_path / "best.jsonl"
    summary = rejection_sample(d / "policy", d / "reward", d / "prompts.jsonl", k=4, out=out, temperature=1.0,
                               max_tokens=6, batch_size=5, seed=7)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary["samples"] == 12 and summary["kept"] == len(rows) == 3 and summary["samples_per_s"] > 0
    prompts = read_prompts(d / "prompts.jsonl")
    rm, rm_tok = load_reward_model(d / "reward")
    for prompt, row in zip(prompts, rows):
        assert row["messages"][:-1] == prompt and row["messages"][-1]["role"] == "assistant"
        assert len(row["scores"]) == 4 and len(set(row["scores"])) > 1  # different samples, different scores
        assert row["score"] == max(row["scores"])  # (no sample is empty: see the fixture)
        # The kept dialog, scored alone, has the score that selected it (batching does not change a score).
        (alone,) = score_dialogs(rm, rm_tok, [row["messages"]], batch_size=1)
        assert alone == pytest.approx(row["score"], abs=1e-4)
    # Seeded: the same samples again, even with another batch size (the engine is batch-invariant; the scores of
    # another scoring batch differ only by rounding).
    again = tmp_path / "again.jsonl"
    rejection_sample(d / "policy", d / "reward", d / "prompts.jsonl", k=4, out=again, temperature=1.0, max_tokens=6,
                     batch_size=3, seed=7)
    rows_again = [json.loads(line) for line in again.read_text().splitlines()]
    assert [r["messages"] for r in rows_again] == [r["messages"] for r in rows]
    assert [r["scores"] for r in rows_again] == [pytest.approx(r["scores"], abs=1e-4) for r in rows]


def test_select_best_skips_empty_responses_and_keeps_the_first_of_ties():
    prompts = [[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}],
               [{"role": "user", "content": "c"}]]
    responses = [["x", "", "zz"], ["  ", ""], ["p", "q"]]
    table = {"x": 1.0, "": 9.0, "zz": 2.0, "  ": 5.0, "p": 3.0, "q": 3.0}
    picked = select_best(prompts, responses, lambda dialogs: [table[d[-1]["content"]] for d in dialogs])
    assert [s.best for s in picked] == [2, None, 0]
    assert picked[0].row() == {"messages": prompts[0] + [{"role": "assistant", "content": "zz"}], "score": 2.0,
                               "scores": [1.0, 9.0, 2.0]}


@pytest.mark.parametrize("line, message", [
    ('{"text": "hi"}', r"prompts.jsonl:1: expected an object with 'messages'"),
    ('{"prompt": "  "}', r"prompts.jsonl:1: 'prompt' is empty"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}',
     r"prompts.jsonl:1: the prompt ends with a 'assistant' message"),
    ('{"messages": [{"role": "assistant", "content": "a"}]}', r"prompts.jsonl:1: message 0 is 'assistant'"),
])
def test_bad_prompts_name_the_line(tmp_path, line, message):
    path = tmp_path / "prompts.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(DataError, match=message):
        read_prompts(path)


def test_cli(models, tmp_path, capsys):
    from herd.cli import main

    d, _ = models
    out = tmp_path / "rs.jsonl"
    common = ["rejection-sample", "--policy", str(d / "policy"), "--reward", str(d / "reward"), "--samples", "2",
              "--out", str(out), "--max-tokens", "3", "--device", "cpu"]
    assert main(common + ["--prompts", str(d / "prompts.jsonl")]) == 0
    assert "samples/s" in capsys.readouterr().out and len(out.read_text().splitlines()) == 3
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"messages": "no"}\n')
    assert main(common + ["--prompts", str(bad)]) == 2
    assert "bad.jsonl:2: 'messages' must be a non-empty list" in capsys.readouterr().err
