"""The demo's synthetic task: files the post-training verbs read, the answer checker (PPO's verifiable reward), and
the accuracy evaluator."""

from __future__ import annotations

import json
import random

import herd
from herd.posttrain import demo
from herd.posttrain.data import read_dialogs, read_preferences
from herd.posttrain.rejection import read_prompts


def _untrained(tok, seed: int):
    args = herd.ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.n_words, multiple_of=32,
                          max_seq_len=128)
    model = herd.Transformer(args).eval()
    model.init_weights(seed=seed)
    return model


def test_files_are_what_the_verbs_read(tmp_path):
    paths = demo.write_demo_data(tmp_path, n_pretrain_docs=3, n_sft=20, n_pairs=20, n_prompts=5)
    dialogs = read_dialogs(paths["sft"])
    assert len(dialogs) == 20
    for d in dialogs:
        p = demo.parse_question(d[0]["content"])
        assert d[1] == {"role": "assistant", "content": str(p.a + p.b)}
    for row in read_preferences(paths["pairs"]):
        p = demo.parse_question(row.prompt[-1]["content"])
        assert demo.reward(row.prompt, row.chosen[0]["content"]) == 1.0
        assert demo.reward(row.prompt, row.rejected[0]["content"]) == 0.0
        assert int(row.rejected[0]["content"]) >= 0
    assert len(read_prompts(paths["prompts"])) == 5
    lines = [json.loads(x)["text"] for x in paths["pretrain"].read_text().splitlines()]
    for line in lines[0].splitlines():  # plain "a+b=c" lines, all correct
        a, rest = line.split("+")
        b, c = rest.split("=")
        assert int(a) + int(b) == int(c)
    # Everything is a function of the seed.
    again = demo.write_demo_data(tmp_path / "again", n_pretrain_docs=3, n_sft=20, n_pairs=20, n_prompts=5)
    assert all(paths[k].read_text() == again[k].read_text() for k in paths)


def test_checker_is_exact():
    p = demo.Problem(17, 8)
    prompt = p.messages()
    assert demo.reward(prompt, "25") == 1.0 and demo.reward(prompt, " 25\n") == 1.0
    for wrong in ("24", "2 5", "25.", "The answer is 25", "", "025"):
        assert demo.reward(prompt, wrong) == 0.0, wrong
    assert demo.reward([{"role": "user", "content": "hello"}], "25") == 0.0  # no question: no reward
    rng = random.Random(0)
    for q in demo.problems(200, seed=1):
        wrong = demo.wrong_answer(q, rng)
        assert wrong != q.answer and int(wrong) >= 0


def test_accuracy_counts_exact_answers(monkeypatch):
    problems = demo.eval_problems(10)
    answers = [p.answer if i % 2 == 0 else p.answer + "0" for i, p in enumerate(problems)]
    monkeypatch.setattr(demo, "answers", lambda model, tok, ps, **kw: answers)
    assert demo.accuracy(None, None, problems) == 0.5


def test_answers_come_from_the_engine(small_tokenizer):
    tok, _ = small_tokenizer
    model = _untrained(tok, seed=0)
    problems = demo.eval_problems(5)
    outs = demo.answers(model, tok, problems, max_new_tokens=4)
    # Greedy answers equal a direct greedy completion of the same chat prompts.
    chat = herd.ChatFormat(tok)
    direct = herd.complete(model, [chat.encode_dialog_prompt(p.messages()) for p in problems],
                           herd.SamplingParams(max_new_tokens=4, stop_ids=tuple(tok.stop_tokens)), tok)
    assert outs == [s.text for s in direct]
    assert demo.accuracy(model, tok, problems) == sum(demo.is_correct(p, o) for p, o in zip(problems, outs)) / 5


def test_on_policy_pairs_reject_the_policys_own_mistakes(small_tokenizer):
    tok, _ = small_tokenizer
    model = _untrained(tok, seed=1)
    rows, own = demo.on_policy_pairs(model, tok, n=6, seed=0)
    sampled = demo.answers(model, tok, demo.problems(6, 0), temperature=1.0, seed=0)
    assert own == sum(bool(s.strip()) for s in sampled)  # an untrained model is never right
    for row, s in zip(rows, sampled):
        assert row["chosen"][0]["content"] == demo.parse_question(row["prompt"][0]["content"]).answer
        assert row["rejected"][0]["content"] == (s.strip() or row["rejected"][0]["content"])
        assert row["rejected"][0]["content"] != row["chosen"][0]["content"]
