"""Post-training data: JSONL dialogs and preference rows (TRL's formats), their Llama 3 encoding, and bad input —
roles out of order, an empty assistant turn, a row missing ``chosen``, a prompt longer than the context — as errors
naming the file and line, or counted skips with ``data.skip_invalid``. Also the tiny model + data the other
post-training tests share (``posttrain_model``, ``write_dialogs``, ``write_preferences``)."""

import json
import random
import subprocess
import sys

import pytest
import torch

import herd
from herd.data.readers import DataError
from herd.posttrain.data import (
    ExampleSource,
    Skips,
    encode_dialog,
    encode_preference,
    encode_preferences,
    read_dialogs,
    read_preferences,
)
from herd.tokenizer import ChatFormat
from herd.train.task import IGNORE_INDEX

from .conftest import ROOT


# --- shared fixtures --------------------------------------------------------------------------------------------
def small_model(vocab_size: int, seed: int, std: float = 0.05) -> herd.Transformer:
    """A 2-layer, dim-64 Llama (GQA 4/2) with weights far enough from zero that logits differ between tokens."""
    model = herd.Transformer(herd.ModelArgs.from_name("tiny", vocab_size=vocab_size, dim=64, n_layers=2, n_heads=4,
                                                      n_kv_heads=2, max_seq_len=256, tie_embeddings=False))
    model.init_weights(seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3 if name == "output.weight" else std, generator=gen)
    return model


@pytest.fixture(scope="session")
def posttrain_model(small_tokenizer, tmp_path_factory):
    """``(policy_dir, reference_dir)``: two random tiny models in HF layout with the small tokenizer."""
    tok, _ = small_tokenizer
    d = tmp_path_factory.mktemp("posttrain_model")
    for name, seed in (("policy", 1), ("reference", 2)):
        herd.save_model(small_model(tok.n_words, seed), d / name, tokenizer=tok)
    return d / "policy", d / "reference"


def arithmetic_dialogs(n: int, seed: int = 0, multi_turn: bool = False) -> list[list[dict]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        messages = [{"role": "system", "content": "Answer with a number."}] if i % 3 == 0 else []
        messages += [{"role": "user", "content": f"What is {a} plus {b}?"},
                     {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]
        if multi_turn and i % 2:
            messages += [{"role": "user", "content": "And times two?"},
                         {"role": "assistant", "content": f"{2 * (a + b)}"}]
        out.append(messages)
    return out


def write_dialogs(path, n: int = 16, seed: int = 0, multi_turn: bool = True):
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in arithmetic_dialogs(n, seed, multi_turn)))
    return path


def preference_rows(n: int, seed: int = 0, edited_every: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        row = {"prompt": [{"role": "user", "content": f"What is {a} plus {b}?"}],
               "chosen": [{"role": "assistant", "content": f"{a + b}"}],
               "rejected": [{"role": "assistant", "content": f"{a + b + rng.randint(1, 20)}, I think"}]}
        if edited_every and i % edited_every == 0:
            row["edited"] = [{"role": "assistant", "content": f"{a} + {b} = {a + b}."}]
        rows.append(row)
    return rows


def write_preferences(path, n: int = 16, seed: int = 0, edited_every: int = 0):
    path.write_text("".join(json.dumps(r) + "\n" for r in preference_rows(n, seed, edited_every)))
    return path


# --- encoding -------------------------------------------------------------------------------------------------------
def test_encode_dialog_trains_assistant_content_and_eot(llama3_tokenizer):
    chat = ChatFormat(llama3_tokenizer)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Bye."}]
    ids, labels = encode_dialog(chat, messages)
    assert len(ids) == len(labels) and ids[0] == 128000
    trained = [t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    tok = llama3_tokenizer
    # Both assistant turns' content, each followed by <|eot_id|> (128009); never a header, a role name or a user turn.
    assert trained == tok.encode("Hello!") + [128009] + tok.encode("Bye.") + [128009]
    assert all(lab in (IGNORE_INDEX, t) for t, lab in zip(ids, labels))
    _, last = encode_dialog(chat, messages, train_on="last")
    assert [t for t, lab in zip(ids, last) if lab != IGNORE_INDEX] == tok.encode("Bye.") + [128009]


def test_encode_preference_conversational_and_plain(llama3_tokenizer):
    chat = ChatFormat(llama3_tokenizer)
    tok = llama3_tokenizer
    row = read_preferences_from([{"prompt": [{"role": "user", "content": "2+2?"}],
                                  "chosen": [{"role": "assistant", "content": "4"}],
                                  "rejected": [{"role": "assistant", "content": "5"}]}])[0]
    enc = encode_preference(chat, row)
    # TRL: the prompt ends with the open assistant header; the completion is the content and <|eot_id|>.
    assert enc.prompt == chat.encode_dialog_prompt([{"role": "user", "content": "2+2?"}])
    assert enc.chosen == tok.encode("4") + [tok.eot_id] and enc.rejected == tok.encode("5") + [tok.eot_id]
    plain = encode_preference(chat, read_preferences_from([{"prompt": "2+2=", "chosen": "4", "rejected": "5"}])[0])
    # TRL (non-conversational): BOS + tokens of prompt+response, EOS appended, split where the prompt's tokens end.
    assert plain.prompt == [tok.bos_id] + tok.encode("2+2=")
    assert plain.chosen == tok.encode("2+2=4")[len(tok.encode("2+2=")):] + [tok.eos_id]


def read_preferences_from(rows, tmp=None):
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "p.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return read_preferences(path)


# --- bad input ----------------------------------------------------------------------------------------------------
BAD_DIALOGS = {
    "roles out of order": ([{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}],
                           "message 0 is 'assistant' after 'the start'"),
    "two users in a row": ([{"role": "user", "content": "x"}, {"role": "user", "content": "y"},
                            {"role": "assistant", "content": "z"}], "message 1 is 'user' after 'user'"),
    "empty assistant turn": ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "  "}],
                             "message 1 is an empty assistant turn"),
    "no assistant": ([{"role": "user", "content": "x"}], "no assistant turn"),
}


@pytest.mark.parametrize("case", BAD_DIALOGS, ids=list(BAD_DIALOGS))
def test_bad_dialog_names_file_and_line(tmp_path, case):
    messages, message = BAD_DIALOGS[case]
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps({"messages": messages}) + "\n")
    with pytest.raises(DataError) as e:
        read_dialogs(path)
    assert str(e.value).startswith(f"{path}:3: ") and message in str(e.value)


def test_bad_preference_rows(tmp_path):
    path = tmp_path / "p.jsonl"
    good = {"prompt": "a", "chosen": "b", "rejected": "c"}
    path.write_text(json.dumps(good) + "\n" + json.dumps({"prompt": "a", "rejected": "c"}) + "\n")
    with pytest.raises(DataError, match=rf"^{path}:2: missing 'chosen'"):
        read_preferences(path)
    path.write_text(json.dumps({"prompt": [{"role": "user", "content": "q"}], "chosen": "b", "rejected": "c"}) + "\n")
    with pytest.raises(DataError, match=rf"^{path}:1: 'chosen' must be a list of messages"):
        read_preferences(path)
    path.write_text("{not json\n")
    with pytest.raises(DataError, match=rf"^{path}:1: invalid JSON"):
        read_preferences(path)


def test_skip_invalid_counts_and_too_long_prompt(tmp_path, llama3_tokenizer, capsys):
    path = tmp_path / "p.jsonl"
    rows = [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "rejected": "c"},
            {"prompt": "word " * 100, "chosen": "b", "rejected": "c"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    chat = ChatFormat(llama3_tokenizer)
    with pytest.raises(DataError, match=rf"^{path}:3: prompt \(101 tokens\) \+ response \(2\) is longer than "
                                        r"data.seq_len=64"):
        encode_preferences(chat, read_preferences(path, Skips(True)), 64, Skips(False))
    skips = Skips(True)
    kept = encode_preferences(chat, read_preferences(path, skips), 64, skips)
    assert len(kept) == 1 and len(skips.reasons) == 2
    skips.report("preference rows")
    assert "skipped 2 invalid preference rows" in capsys.readouterr().err


def test_cli_bad_input_exits_2_naming_the_line(tmp_path, posttrain_model):
    policy, _ = posttrain_model
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "x"}]}) + "\n")
    r = subprocess.run([sys.executable, "-m", "herd", "sft", "--config", str(ROOT / "configs" / "sft-tiny-cpu.toml"),
                        "--run-dir", str(tmp_path / "run"), f"--model.init_from={policy}", f"--data.path={data}"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and f"{data}:1: no assistant turn" in r.stderr, r.stderr


# --- batches --------------------------------------------------------------------------------------------------------
def test_example_source_resumes_and_shards():
    def collate(mine, step):
        return mine

    one = ExampleSource(10, 4, collate, seed=3)
    seen = [one.next_batch(1)[0] for _ in range(5)]  # crosses two epochs
    assert sorted(seen[0] + seen[1] + seen[2][:2]) == list(range(10))
    resumed = ExampleSource(10, 4, collate, seed=3)
    resumed.load_state_dict({"consumed": 8, "n": 10, "seed": 3})
    assert resumed.next_batch(1)[0] == seen[2]
    # Two data-parallel ranks read the two halves of the same global batch.
    fresh = [ExampleSource(10, 4, collate, seed=3, rank=r, world_size=2) for r in range(2)]
    assert sum((r.next_batch(1)[0] for r in fresh), []) == seen[0]


@pytest.mark.parametrize("name", ["sft-tiny-cpu", "reward-tiny-cpu", "dpo-tiny-cpu", "sft-llama3-8b",
                                  "reward-llama3-8b", "dpo-llama3-8b"])
def test_shipped_configs_load(name):
    from herd.config import load_config
    from herd.posttrain.config import DPORunConfig, RewardRunConfig, SFTRunConfig

    cls = {"sft": SFTRunConfig, "reward": RewardRunConfig, "dpo": DPORunConfig}[name.split("-")[0]]
    cfg = load_config(ROOT / "configs" / f"{name}.toml", ["--model.init_from=M", "--data.path=D"], cls=cls)
    assert cfg.model.init_from == "M" and cfg.data.path == "D"
    if name.startswith("dpo"):
        assert (cfg.dpo.beta, cfg.dpo.nll_coef, cfg.dpo.mask_formatting_tokens) == (0.1, 0.2, True)
    if name.endswith("8b"):
        assert cfg.train.lr == 1e-5 and cfg.train.dtype == "bf16"


def test_packed_rows_split_one_dialog_per_row_train_identically(small_tokenizer):
    """SFT on CPU lays a packed batch out one dialog per row (``collate_rows(split=True)``): with document masks and
    per-document positions that is the same computation, so loss and gradients equal the packed layout's (1e-5: the
    same sums in another order, attention with and without padding)."""
    from herd.posttrain.sft import collate_rows, pack
    from herd.train.task import LanguageModelTask

    tok, _ = small_tokenizer
    chat = ChatFormat(tok)
    examples = []
    for messages in arithmetic_dialogs(12, seed=3, multi_turn=True):
        ids, labels = encode_dialog(chat, messages)
        examples.append((ids[:-1], labels[1:]))
    rows = pack([len(x) for x, _ in examples], 250, seed=0)
    assert any(len(r) > 1 for r in rows)  # the test needs rows with several dialogs
    task = LanguageModelTask(None, document_masking=True, per_document_positions=True)
    results = []
    for split in (False, True):
        batch = collate_rows(rows, examples, tok.eos_id, 250, split=split)
        assert (batch.doc_ids is None) == split
        model = small_model(tok.n_words, seed=5)
        total, count = task.loss(model(batch.inputs, **task.model_inputs(batch, torch.device("cpu"))), batch.targets)
        (total / count).backward()
        results.append((total.item(), int(count), {n: p.grad for n, p in model.named_parameters()}))
    (packed_sum, packed_n, packed_g), (split_sum, split_n, split_g) = results
    assert packed_n == split_n and split_sum == pytest.approx(packed_sum, rel=1e-5)
    for name, g in packed_g.items():
        torch.testing.assert_close(split_g[name], g, rtol=1e-5, atol=1e-6)


def test_logits_of_trained_positions_only_give_the_same_loss_and_gradients(small_tokenizer):
    """``trained_logits_only`` (the model's ``logits_at``): the output layer and cross-entropy run on the response
    tokens alone. Same loss and gradients as the full ``[B, S, vocab]`` logits (1e-6: the same sums, other blocking)."""
    from herd.posttrain.sft import collate_rows, pack
    from herd.train.task import LanguageModelTask

    tok, _ = small_tokenizer
    chat = ChatFormat(tok)
    examples = [(ids[:-1], labels[1:]) for ids, labels in
                (encode_dialog(chat, m) for m in arithmetic_dialogs(8, seed=4, multi_turn=True))]
    batch = collate_rows(pack([len(x) for x, _ in examples], 250, seed=0), examples, tok.eos_id, 250)
    results = []
    for trained_only in (False, True):
        task = LanguageModelTask(None, per_document_positions=True, trained_logits_only=trained_only)
        model = small_model(tok.n_words, seed=6)
        out = model(batch.inputs, **task.model_inputs(batch, torch.device("cpu")))
        assert out.dim() == (2 if trained_only else 3)
        total, count = task.loss(out, batch.targets)
        (total / count).backward()
        results.append((total.item(), int(count), {n: p.grad for n, p in model.named_parameters()}))
    (full_sum, full_n, full_g), (sum_, n, g) = results
    assert n == full_n == int((batch.targets != IGNORE_INDEX).sum()) and sum_ == pytest.approx(full_sum, rel=1e-6)
    for name in full_g:
        torch.testing.assert_close(g[name], full_g[name], rtol=1e-5, atol=1e-7)
