"""Generation: batched KV-cache decoding against full recomputation and against transformers' greedy generate."""

import io
import subprocess
import sys

import torch

import herd
from herd.inference.generate import generate
from herd.inference.sampling import sample

from .helpers import make_hf_model


def test_batched_greedy_equals_full_recomputation_and_transformers(tmp_path):
    hf_model = make_hf_model(tmp_path, dim=128, n_heads=4, n_kv_heads=2)
    model = herd.load_model(tmp_path).eval()
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 320, (n,), generator=gen).tolist() for n in (3, 11, 7)]
    outs = generate(model, prompts, max_new_tokens=12)
    for prompt, out in zip(prompts, outs):
        assert len(out) == 12
        # Full recomputation: the greedy token after each prefix, with no cache and no padding.
        seq = list(prompt)
        with torch.no_grad():
            for _ in range(12):
                seq.append(model(torch.tensor([seq]))[0, -1].argmax().item())
        assert out == seq[len(prompt):]
        ref = hf_model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, min_new_tokens=12,
                                attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        assert out == ref[0, len(prompt):].tolist()


def test_stop_ids_seed_and_sampling_rules():
    model = herd.Transformer(herd.ModelArgs.from_name("tiny", vocab_size=300)).eval()
    model.init_weights(seed=0)
    greedy = generate(model, [[1, 2, 3]], max_new_tokens=8)[0]
    stopped = generate(model, [[1, 2, 3]], max_new_tokens=8, stop_ids=[greedy[2]])[0]
    assert stopped == greedy[: greedy.index(greedy[2])]
    a = generate(model, [[5, 6]], 10, temperature=1.0, top_p=0.9, seed=3)
    b = generate(model, [[5, 6]], 10, temperature=1.0, top_p=0.9, seed=3)
    assert a == b
    logits = torch.tensor([[0.0, 1.0, 5.0, 2.0]])
    assert sample(logits).item() == 2
    assert sample(logits, temperature=1.0, top_k=1).item() == 2
    # top-p keeps the smallest set whose preceding mass is <= p: here only the 0.84-probability token.
    assert all(sample(logits, temperature=1.0, top_p=0.5).item() == 2 for _ in range(20))



def test_complete_takes_more_prompts_than_batch_rows():
    """``complete`` decodes at most ``max_batch`` sequences together; 300 prompts (beyond the engine's default queue of
    256) through 16 rows give each prompt what it gets alone (seeded sampling: prompt i draws with seed + i)."""
    from herd.inference.generate import complete
    from herd.inference.sampling import SamplingParams

    model = herd.Transformer(herd.ModelArgs.from_name("tiny", vocab_size=300, max_seq_len=64)).eval()
    model.init_weights(seed=0)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 300, (int(n),), generator=gen).tolist() for n in torch.randint(2, 9, (300,))]
    params = SamplingParams(max_new_tokens=5, temperature=1.0, seed=7)
    together = complete(model, prompts, params, max_batch=16)
    assert [len(s.output) for s in together] == [5] * 300
    for i in (0, 17, 299):
        alone = complete(model, [prompts[i]], SamplingParams(max_new_tokens=5, temperature=1.0, seed=7 + i))
        assert together[i].output == alone[0].output

def test_chat_repl_history_reset_and_system_prompt(small_tokenizer):
    from herd.inference.chat_repl import chat_repl
    from herd.inference.generate import complete
    from herd.inference.sampling import SamplingParams
    from herd.tokenizer import ChatFormat

    from .helpers import random_model

    tok, _ = small_tokenizer
    model = random_model(vocab_size=tok.n_words)
    params = SamplingParams(max_new_tokens=12, stop_ids=tuple(tok.stop_tokens))
    lines = iter(["hello", "/reset", "/system Be brief.", "first", "second", "/exit"])
    out = io.StringIO()
    dialog = chat_repl(model, tok, params, read=lambda _: next(lines), out=out)
    assert out.getvalue().count("(conversation reset)") == 2
    assert [m["role"] for m in dialog] == ["system", "user", "assistant", "user", "assistant"]
    assert dialog[0]["content"] == "Be brief." and dialog[3]["content"] == "second"
    # Every reply is the greedy completion of the whole dialog so far.
    prompt = ChatFormat(tok).encode_dialog_prompt(dialog[:4])
    assert dialog[4]["content"] == complete(model, [prompt], params, tok)[0].text
    assert dialog[4]["content"] in out.getvalue()


def test_cli_generate_streams_a_completion(small_tokenizer, tmp_path):
    from .helpers import random_model

    tok, _ = small_tokenizer
    herd.save_model(random_model(vocab_size=tok.n_words), tmp_path / "m", tokenizer=tok)
    cmd = [sys.executable, "-m", "herd", "generate", "--model", str(tmp_path / "m"), "--prompt", "Hello",
           "--temperature", "0", "--max-new-tokens", "10", "--stop", "\u2603"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    model = herd.load_model(tmp_path / "m")
    want = tok.decode(generate(model, [tok.encode("Hello", bos=True)], 10, stop_ids=tok.stop_tokens)[0])
    assert r.stdout == "Hello" + want + "\n"
    bad = subprocess.run(cmd[:-4] + ["--temperature", "-1"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "temperature" in bad.stderr
