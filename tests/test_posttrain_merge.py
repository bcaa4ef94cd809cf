"""Model averaging: exact uniform and weighted averages, dtype kept, tokenizer copied, incompatible models refused."""

from __future__ import annotations

import pytest
import torch

import herd
from herd.errors import UserError
from herd.posttrain.merge import average_models, merge_models, normalise_weights, parse_weights


def _model(seed: int, dim: int = 64, n_layers: int = 2, rope_theta: float = 500000.0, tied: bool = True):
    args = herd.ModelArgs(dim=dim, n_layers=n_layers, n_heads=4, n_kv_heads=2, vocab_size=300, multiple_of=32,
                          max_seq_len=64, rope_theta=rope_theta, tie_embeddings=tied)
    model = herd.Transformer(args)
    model.init_weights(seed=seed)
    with torch.no_grad():  # norms away from 1 so they are averaged too
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(seed))
    return model


def _save(model, path, tokenizer=None, dtype=None):
    herd.save_model(model, path, tokenizer=tokenizer, dtype=dtype)
    return path


def test_uniform_average_is_exact(tmp_path):
    a, b = _model(1), _model(2)
    avg = average_models([_save(a, tmp_path / "a"), _save(b, tmp_path / "b")])
    sa, sb = a.state_dict(), b.state_dict()
    for name, t in avg.state_dict().items():
        # 0.5 * x is exact in fp32, so the fp32 sum is the correctly rounded mean: bit-equal to a float64 mean.
        expected = ((sa[name].double() + sb[name].double()) / 2).float()
        assert torch.equal(t, expected), name
    assert avg.output.weight is avg.tok_embeddings.weight  # still tied


def test_weighted_average_is_normalised(tmp_path):
    models = [_model(s) for s in (1, 2, 3)]
    dirs = [_save(m, tmp_path / str(i)) for i, m in enumerate(models)]
    avg = average_models(dirs, weights=[1, 2, 1])  # -> 0.25, 0.5, 0.25
    states = [m.state_dict() for m in models]
    for name, t in avg.state_dict().items():
        terms = [w * s[name].double() for w, s in zip((0.25, 0.5, 0.25), states)]
        # Exactly scaled terms, two fp32 additions: each rounding is at most half an ulp of a partial sum, so the
        # error is at most 2^-24 * 2 * sum |terms|.
        bound = 2 ** -23 * sum(x.abs() for x in terms)
        assert ((t.double() - sum(terms)).abs() <= bound).all(), name
    one_hot = average_models(dirs, weights=[0, 1, 0])
    assert all(torch.equal(t, states[1][k]) for k, t in one_hot.state_dict().items())


def test_merge_writes_a_loadable_directory_in_the_inputs_dtype(tmp_path, small_tokenizer):
    tok, _ = small_tokenizer
    a, b = _model(1), _model(2)
    dirs = [_save(m, tmp_path / n, tokenizer=tok, dtype=torch.bfloat16) for m, n in ((a, "a"), (b, "b"))]
    out = merge_models(dirs, tmp_path / "avg")
    merged = herd.load_model(out)
    assert next(merged.parameters()).dtype == torch.bfloat16
    assert herd.Tokenizer(out).fingerprint() == tok.fingerprint()
    assert (out / "generation_config.json").exists()
    expected = ((a.tok_embeddings.weight.bfloat16().float() + b.tok_embeddings.weight.bfloat16().float()) / 2)
    assert torch.equal(merged.tok_embeddings.weight, expected.bfloat16())


def test_incompatible_models_are_refused(tmp_path):
    base = _save(_model(1), tmp_path / "base")
    wider = _save(_model(2, dim=128), tmp_path / "wider")
    deeper = _save(_model(3, n_layers=3), tmp_path / "deeper")
    other_rope = _save(_model(4, rope_theta=10000.0), tmp_path / "rope")
    with pytest.raises(UserError, match=r"tensor 'tok_embeddings.weight' has shape \(300, 64\) vs \(300, 128\)"):
        average_models([base, wider])
    with pytest.raises(UserError, match="tensor 'layers.2.attention_norm.weight' is missing from .*base"):
        average_models([base, deeper])
    with pytest.raises(UserError, match="config field 'rope_theta'"):
        average_models([base, other_rope])
    with pytest.raises(UserError, match="at least two"):
        average_models([base])


def test_different_tokenizers_are_refused(tmp_path, small_tokenizer):
    tok, _ = small_tokenizer
    last = max(tok.ranks, key=tok.ranks.get)
    one_merge_fewer = herd.Tokenizer(ranks={b: r for b, r in tok.ranks.items() if b != last})
    a = _save(_model(1), tmp_path / "a", tokenizer=tok)
    b = _save(_model(2), tmp_path / "b", tokenizer=one_merge_fewer)
    with pytest.raises(UserError, match="tokenizers differ"):
        merge_models([a, b], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_weights_checks():
    assert normalise_weights(None, 4) == [0.25] * 4
    assert normalise_weights([2, 1, 1], 3) == [0.5, 0.25, 0.25]
    assert parse_weights("1,2.5") == [1.0, 2.5]
    for bad, n, msg in (([1, 2], 3, "2 weight"), ([1, -1], 2, "non-negative"), ([0, 0], 2, "sum to 0"),
                        ([float("nan"), 1], 2, "non-negative")):
        with pytest.raises(UserError, match=msg):
            normalise_weights(bad, n)
    with pytest.raises(UserError, match="comma-separated"):
        parse_weights("1;2")


def test_cli_merge(tmp_path, capsys):
    from herd.cli import main

    a, b = _save(_model(1), tmp_path / "a"), _save(_model(2), tmp_path / "b")
    assert main(["merge", str(a), str(b), "--out", str(tmp_path / "avg"), "--weights", "3,1"]) == 0
    assert "weights 0.75, 0.25" in capsys.readouterr().out
    merged = herd.load_model(tmp_path / "avg")
    expected = 0.75 * _model(1).norm.weight + 0.25 * _model(2).norm.weight
    assert torch.allclose(merged.norm.weight, expected, rtol=2 ** -23, atol=0)
    wider = _save(_model(3, dim=128), tmp_path / "wider")
    assert main(["merge", str(a), str(wider), "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tensor 'tok_embeddings.weight' has shape" in err
