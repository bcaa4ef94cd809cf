"""Generation: batched KV-cache decoding against full recomputation and against transformers' greedy generate."""

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
