"""Tokenizer: Meta's ids, agreement with tiktoken and transformers, streaming, chunking, training, bad input."""

import base64
import subprocess
import sys

import pytest
import tiktoken
from hypothesis import given, settings
from hypothesis import strategies as st

import herd
from herd.tokenizer import TokenizerError
from herd.tokenizer.tokenizer import MAX_RUN, PATTERN, read_ranks

from .corpus import MULTILINGUAL


def _tiktoken_reference(tok):
    """Raw tiktoken with the same ranks and pattern: the reference for ordinary text."""
    return tiktoken.Encoding("ref", pat_str=PATTERN, mergeable_ranks=tok.ranks, special_tokens={})


# --- Meta's published ids ---------------------------------------------------------------------------------------
def test_meta_test_vectors(llama3_tokenizer):
    tok = llama3_tokenizer
    assert tok.encode("This is a test sentence.") == [2028, 374, 264, 1296, 11914, 13]
    assert tok.encode("This is a test sentence.", bos=True, eos=True) == [128000, 2028, 374, 264, 1296, 11914, 13,
                                                                          128001]
    assert tok.encode(" 12345") == [220, 4513, 1774]
    assert tok.decode([2028, 374, 264, 1296, 11914, 13]) == "This is a test sentence."
    st_ = tok.special_tokens
    assert (st_["<|eot_id|>"], st_["<|eom_id|>"], st_["<|python_tag|>"], st_["<|start_header_id|>"]) == (
        128009, 128008, 128010, 128006)
    assert (tok.bos_id, tok.eos_id, tok.n_words) == (128000, 128001, 128256)
    assert st_["<|finetune_right_pad_id|>"] == 128004 and st_["<|step_id|>"] == 128005
    assert st_["<|reserved_special_token_246|>"] == 128255


def test_special_text_is_plain_unless_allowed(llama3_tokenizer):
    tok = llama3_tokenizer
    ids = tok.encode("<|eot_id|>")
    assert 128009 not in ids and tok.decode(ids) == "<|eot_id|>"
    assert tok.encode("<|eot_id|>", allowed_special="all") == [128009]
    assert tok.encode("a<|eot_id|>", allowed_special={"<|eot_id|>"})[-1] == 128009


# --- agreement with tiktoken and transformers ---------------------------------------------------------------------
def test_matches_tiktoken_and_transformers_on_multilingual_corpus(llama3_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tok = llama3_tokenizer
    ref = _tiktoken_reference(tok)
    tok.save(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    for text in MULTILINGUAL + ["".join(MULTILINGUAL)]:
        ids = tok.encode(text)
        assert ids == ref.encode_ordinary(text)
        assert ids == hf(text, add_special_tokens=False)["input_ids"]
        assert hf(text)["input_ids"] == tok.encode(text, bos=True)  # HF's post-processor prepends BOS
        assert hf.decode(ids) == tok.decode(ids) == text
    assert hf.bos_token_id == 128000 and hf.eos_token_id == 128001


def test_hf_tokenizer_json_loads_back(llama3_tokenizer, tmp_path):
    llama3_tokenizer.save(tmp_path)
    again = herd.Tokenizer(tmp_path / "tokenizer.json")
    assert again.ranks == llama3_tokenizer.ranks
    assert again.special_tokens == llama3_tokenizer.special_tokens
    assert again.encode(MULTILINGUAL[3]) == llama3_tokenizer.encode(MULTILINGUAL[3])


def test_chat_template_in_transformers_matches_chatformat(llama3_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    llama3_tokenizer.save(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there 😀"}]
    ours = herd.ChatFormat(llama3_tokenizer).encode_dialog_prompt(dialog)
    theirs = hf.apply_chat_template(dialog, add_generation_prompt=True, tokenize=True)
    theirs = theirs["input_ids"] if hasattr(theirs, "keys") else theirs
    assert theirs == ours


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_roundtrip_arbitrary_unicode(text):
    tok = _shared["tok"]
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert ids == _shared["ref"].encode_ordinary(text)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=120))
def test_streaming_decode_equals_full_decode(text):
    tok = _shared["tok"]
    ids = tok.encode(text)
    dec = tok.stream_decoder()
    assert "".join(dec.push(i) for i in ids) + dec.flush() == tok.decode(ids)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 300), max_size=40))
def test_decode_never_raises_on_split_characters(ids):
    tok = _shared["tok"]
    text = tok.decode(ids)  # arbitrary byte tokens, often invalid UTF-8
    dec = tok.stream_decoder()
    assert "".join(dec.push(i) for i in ids) + dec.flush() == text


_shared = {}


@pytest.fixture(autouse=True, scope="module")
def _share(small_tokenizer, llama3_tokenizer_or_none):
    tok = llama3_tokenizer_or_none or small_tokenizer[0]
    _shared.update(tok=tok, ref=_tiktoken_reference(tok))


@pytest.fixture(scope="module")
def llama3_tokenizer_or_none():
    from .conftest import LLAMA3_TOKENIZER

    return herd.Tokenizer(LLAMA3_TOKENIZER) if LLAMA3_TOKENIZER.exists() else None


def test_stream_decoder_holds_partial_characters(llama3_tokenizer):
    tok = llama3_tokenizer
    ids = tok.encode("😀")
    assert len(ids) > 1  # the emoji is split over byte tokens
    dec = tok.stream_decoder()
    pieces = [dec.push(i) for i in ids]
    assert pieces[:-1] == [""] * (len(ids) - 1) and pieces[-1] == "😀"
    assert "\ufffd" in tok.decode(ids[:1])


# --- long inputs ------------------------------------------------------------------------------------------------
def test_huge_and_pathological_inputs(llama3_tokenizer):
    tok = llama3_tokenizer
    run = "a" * (3 * MAX_RUN + 17)
    ids = tok.encode(run)
    assert tok.decode(ids) == run
    spaces = " " * (2 * MAX_RUN + 5) + "x"
    assert tok.decode(tok.encode(spaces)) == spaces
    big = ("Lorem ipsum dolor sit amet. " * 20_000)  # 560k characters: crosses a 400k window boundary
    assert tok.decode(tok.encode(big)) == big


def test_chunking_cuts_exactly_like_meta():
    """Our regex-driven cuts equal Meta's character-by-character loop."""
    from herd.tokenizer.tokenizer import _chunks

    def meta_split(s, max_len):
        if not s:
            yield s
            return
        current_len, current_space, start = 0, s[0].isspace(), 0
        for i, ch in enumerate(s):
            is_space = ch.isspace()
            if current_space ^ is_space:
                current_len, current_space = 1, is_space
            else:
                current_len += 1
                if current_len > max_len:
                    yield s[start:i]
                    start, current_len = i, 1
        yield s[start:]

    text = "ab " * 10 + "x" * 60_123 + " " * 25_001 + "yz" + "\n" * 50_000 + "end"
    assert list(_chunks(text)) == list(meta_split(text, MAX_RUN))


def test_encode_batch_matches_encode(llama3_tokenizer):
    assert llama3_tokenizer.encode_batch(MULTILINGUAL, bos=True) == [llama3_tokenizer.encode(t, bos=True)
                                                                     for t in MULTILINGUAL]


# --- training -------------------------------------------------------------------------------------------------------
def test_trained_tokenizer_agrees_across_herd_tiktoken_transformers(small_tokenizer):
    from transformers import AutoTokenizer

    tok, out = small_tokenizer
    assert 700 <= len(tok.ranks) <= 1000 and tok.n_words == len(tok.ranks) + 256
    assert tok.bos_id == len(tok.ranks)  # special tokens come after the learned ranks
    loaded = herd.Tokenizer(out)
    tk = tiktoken.Encoding("t", pat_str=PATTERN, mergeable_ranks=read_ranks(out / "tokenizer.model"),
                           special_tokens={})
    hf = AutoTokenizer.from_pretrained(out)
    for text in MULTILINGUAL + ["unseen words: zyxwv qrstuvw 987654321 ¿¡"]:
        ids = loaded.encode(text)
        assert ids == tok.encode(text) == tk.encode_ordinary(text) == hf(text, add_special_tokens=False)["input_ids"]
        assert loaded.decode(ids) == text
    # It learned something: English compresses much better than one token per byte.
    assert len(tok.encode(MULTILINGUAL[0])) < 0.5 * len(MULTILINGUAL[0].encode())


def test_cli_tokenizer_train_jsonl_and_stats(tmp_path):
    import json

    data = tmp_path / "docs.jsonl"
    data.write_text("\n".join(json.dumps({"text": t}) for t in MULTILINGUAL * 10), encoding="utf-8")
    r = subprocess.run([sys.executable, "-m", "herd", "tokenizer", "train", "--input", str(data), "--vocab-size",
                        "600", "--out", str(tmp_path / "tok"), "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert herd.Tokenizer(tmp_path / "tok").n_words == 600 + 256
    r = subprocess.run([sys.executable, "-m", "herd", "tokenizer", "stats", "--tokenizer", str(tmp_path / "tok"),
                        "--input", str(data), "--sentencepiece-vocab", "600", "--json", str(tmp_path / "s.json")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "s.json").read_text())
    tokens = report["total"]["tokens"]
    assert len(tokens) == 2 and all(n > 0 for n in tokens.values())
    assert "fewer tokens than sentencepiece-bpe" in r.stdout


# --- bad input ------------------------------------------------------------------------------------------------------
def _ranks_file(tmp_path, lines):
    p = tmp_path / "tokenizer.model"
    p.write_bytes(b"\n".join(lines) + b"\n")
    return p


def _byte_lines():
    return [base64.b64encode(bytes([b])) + b" %d" % b for b in range(256)]


def test_bad_rank_files(tmp_path):
    with pytest.raises(TokenizerError, match="file not found"):
        herd.Tokenizer(tmp_path / "missing.model")
    with pytest.raises(TokenizerError, match=r"tokenizer.model:3: invalid base64"):
        herd.Tokenizer(_ranks_file(tmp_path, _byte_lines()[:2] + [b"@@@ 2"]))
    with pytest.raises(TokenizerError, match=r"tokenizer.model:257: duplicate token"):
        herd.Tokenizer(_ranks_file(tmp_path, _byte_lines() + [base64.b64encode(b"a") + b" 256"]))
    with pytest.raises(TokenizerError, match=r"tokenizer.model:257: duplicate rank 3"):
        herd.Tokenizer(_ranks_file(tmp_path, _byte_lines() + [base64.b64encode(b"ab") + b" 3"]))
    with pytest.raises(TokenizerError, match="rank 256 is missing"):
        herd.Tokenizer(_ranks_file(tmp_path, _byte_lines() + [base64.b64encode(b"ab") + b" 257"]))
    with pytest.raises(TokenizerError, match="single-byte token"):
        lines = [base64.b64encode(bytes([b])) + b" %d" % (b - 1) for b in range(1, 256)]
        herd.Tokenizer(_ranks_file(tmp_path, lines + [base64.b64encode(b"ab") + b" 255"]))
    with pytest.raises(TokenizerError, match="holds neither"):
        herd.Tokenizer(tmp_path / "..")


def test_bad_corpora(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"fine line\nsecond \xff\xfe line\n")
    r = subprocess.run([sys.executable, "-m", "herd", "tokenizer", "train", "--input", str(tmp_path / "bad.txt"),
                        "--vocab-size", "300", "--out", str(tmp_path / "o1"), "--quiet"], capture_output=True, text=True)
    assert r.returncode == 2 and "bad.txt:2: not valid UTF-8" in r.stderr
    (tmp_path / "empty.jsonl").write_text("\n")
    r = subprocess.run([sys.executable, "-m", "herd", "tokenizer", "train", "--input", str(tmp_path / "empty.jsonl"),
                        "--vocab-size", "300", "--out", str(tmp_path / "o2"), "--quiet"], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "empty corpus" in r.stderr
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_decode_rejects_out_of_range_ids(llama3_tokenizer):
    with pytest.raises(ValueError, match="token id 999999"):
        llama3_tokenizer.decode([1, 999999])
