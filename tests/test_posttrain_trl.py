"""Parity with TRL 1.x (in the test extra) on the same tiny model, data and settings, in fp32:

- SFT: TRL tokenises prompt/completion dialogs exactly as herd does (same ids, same trained tokens, <|eot_id|>
  included); herd's loss and gradients through the training loop (packed rows, document masks) equal TRL
  ``SFTTrainer``'s completion-only loss on the same tokens, one dialog per padded row.
- DPO (formatting mask off): TRL ``DPOTrainer`` tokenises the preference rows as herd does, and with
  ``loss_type=["sigmoid", "sft"]``, ``loss_weights=[1.0, 0.2]``, ``beta=0.1`` and a separate reference model its loss
  and gradients equal herd's through the loop (reference log-probs from herd's pass).
- Reward model: the loss equals TRL ``RewardTrainer``'s on the same model; the saved directory loads in transformers'
  ``LlamaForSequenceClassification`` and scores padded batches as herd does.

Tolerances: 1e-5 relative on losses (fp32; the two implementations differ only in summation order and attention
kernels: herd packs rows with a document mask, TRL pads), gradients 1e-4 relative to their norm per tensor.
"""

import json

import pytest
import torch

from herd.checkpoint import hf
from herd.config import load_config
from herd.model.args import ModelArgs
from herd.posttrain.config import DPORunConfig, RewardRunConfig, SFTRunConfig
from herd.posttrain.data import Skips, encode_dialog, encode_preferences, read_preferences
from herd.posttrain.dpo import DPOTask, reference_logprobs
from herd.posttrain.reward import RewardTask, load_reward_model, save_reward_model, score_dialogs
from herd.posttrain.sft import encode_sft_examples, open_tokenizer, pack, sft_task
from herd.tokenizer import ChatFormat
from herd.train.loop import Trainer, initial_model, model_args_for
from herd.train.parallelize import World

from .conftest import ROOT
from .masked_task import full_grads
from .test_posttrain_data import posttrain_model, preference_rows, write_dialogs, write_preferences  # noqa: F401

pytest.importorskip("trl")
pytestmark = pytest.mark.filterwarnings("ignore")


def _trl_args(cls, tmp_path, **kw):
    # fp32 throughout: TRL's configs default to bf16 autocast (which reaches the prepared reference model).
    return cls(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, max_length=None, bf16=False, **kw)


def _hf_grads(model, args: ModelArgs) -> dict[str, torch.Tensor]:
    """An HF model's gradients under herd's names and layout (q/k rows back from rotate-half order)."""
    out = {}
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        herd_name = hf.from_hf_name(name)
        g = p.grad
        if herd_name.endswith("attention.wq.weight"):
            g = hf.permute_from_hf(g, args.n_heads)
        elif herd_name.endswith("attention.wk.weight"):
            g = hf.permute_from_hf(g, args.n_kv_heads)
        out[herd_name] = g
    return out


def _assert_grads_close(herd_grads, hf_grads):
    assert set(herd_grads) == set(hf_grads)
    for name, g in herd_grads.items():
        err = (g - hf_grads[name]).norm() / hf_grads[name].norm().clamp(min=1e-12)
        assert err < 1e-4, f"{name}: relative gradient error {err:.2e}"


def _loop_step(cfg, task, tokenizer, args, tmp_path):
    """One forward/backward of the task's first batch through the training loop: (loss, gradients)."""
    trainer = Trainer(cfg, tmp_path / "run", task, tokenizer, args, World(), torch.device("cpu"), "test")
    loss, _ = trainer.forward_backward(task.train_data.next_batch(cfg.train.grad_accum), step=1)
    return loss, full_grads(trainer.model)


def test_sft_matches_trl(tmp_path, posttrain_model):  # noqa: F811
    from datasets import Dataset
    from transformers import AutoTokenizer, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    policy, _ = posttrain_model
    data = write_dialogs(tmp_path / "sft.jsonl", n=6, multi_turn=True)
    cfg = load_config(ROOT / "configs" / "sft-tiny-cpu.toml",
                      [f"--model.init_from={policy}", f"--data.path={data}", "--data.seq_len=128",
                       "--data.val_fraction=0", "--train.grad_accum=2"], cls=SFTRunConfig)
    tok = open_tokenizer(cfg)
    dialogs = [json.loads(line)["messages"] for line in data.read_text().splitlines()]
    hf_tok = AutoTokenizer.from_pretrained(policy)

    # Tokenisation: TRL's prompt/completion format renders the last assistant turn as herd's train_on="last" does.
    trl_rows = [{"prompt": d[:-1], "completion": d[-1:]} for d in dialogs]
    trainer = SFTTrainer(model=LlamaForCausalLM.from_pretrained(policy), processing_class=hf_tok,
                         train_dataset=Dataset.from_list(trl_rows),
                         args=_trl_args(SFTConfig, tmp_path, completion_only_loss=True))
    for d, ex in zip(dialogs, trainer.train_dataset):
        ids, labels = encode_dialog(ChatFormat(tok), d, train_on="last")
        assert ex["input_ids"] == ids and ex["labels"] == labels

    # Loss and gradients: every assistant turn trained (herd's default), the same tokens given to TRL pre-tokenised.
    examples = encode_sft_examples(cfg, tok, Skips(False))
    rows = pack([len(x) for x, _ in examples], cfg.data.seq_len, cfg.data.seed)
    assert len(rows) < len(examples)  # several dialogs share a row: the document mask is exercised
    # The step's global batch is the whole epoch (twice when the row count is odd: grad_accum=2 needs it even).
    cfg.data.batch_size = len(rows) if len(rows) % 2 == 0 else 2 * len(rows)
    args = model_args_for(cfg, tok.n_words)
    loss, grads = _loop_step(cfg, sft_task(cfg, examples, tok, args, World()), tok, args, tmp_path)

    encoded = [encode_dialog(ChatFormat(tok), d) for d in dialogs]
    pretokenised = [{"input_ids": ids, "completion_mask": [int(lab != -100) for lab in labels]}
                    for ids, labels in encoded]
    if cfg.data.batch_size != len(rows):  # odd number of rows: the batch saw every dialog twice
        pretokenised = pretokenised * 2
    hf_model = LlamaForCausalLM.from_pretrained(policy)
    trainer = SFTTrainer(model=hf_model, processing_class=hf_tok, train_dataset=Dataset.from_list(pretokenised),
                         args=_trl_args(SFTConfig, tmp_path, completion_only_loss=True))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(pretokenised))])
    trl_loss = trainer.compute_loss(hf_model, batch)
    trl_loss.backward()
    assert loss == pytest.approx(trl_loss.item(), rel=1e-5)
    _assert_grads_close(grads, _hf_grads(hf_model, args))

    # Without packing (one dialog per row, plain causal attention): the same loss.
    cfg.data.packing, cfg.data.batch_size = False, len(examples)
    unpacked, _ = _loop_step(cfg, sft_task(cfg, examples, tok, args, World()), tok, args, tmp_path / "unpacked")
    assert unpacked == pytest.approx(loss, rel=1e-5)


def _preferences(tmp_path, policy, verb, cls, seed, *overrides):
    """4 preference rows (TRL's conversational format) for ``verb``'s tiny config: the rows, the config, the
    tokenizer, herd's encoding of the rows and the model's shape."""
    rows = preference_rows(4, seed=seed)
    data = write_preferences(tmp_path / "pref.jsonl", n=4, seed=seed)
    cfg = load_config(ROOT / "configs" / f"{verb}-tiny-cpu.toml",
                      [f"--model.init_from={policy}", f"--data.path={data}", "--data.batch_size=4",
                       "--data.seq_len=128", *overrides], cls=cls)
    tok = open_tokenizer(cfg)
    examples = encode_preferences(ChatFormat(tok), read_preferences(data), cfg.data.seq_len, Skips(False))
    return rows, cfg, tok, examples, model_args_for(cfg, tok.n_words)


def test_dpo_matches_trl_sigmoid_plus_sft(tmp_path, posttrain_model):  # noqa: F811
    from datasets import Dataset
    from transformers import AutoTokenizer, LlamaForCausalLM
    from trl import DPOConfig, DPOTrainer

    policy, reference = posttrain_model
    rows, cfg, tok, examples, args = _preferences(tmp_path, policy, "dpo", DPORunConfig, 3,
                                                  "--dpo.mask_formatting_tokens=false")
    ref_cfg = load_config(None, [f"--model.init_from={reference}"], cls=DPORunConfig)
    ref = reference_logprobs(initial_model(ref_cfg, args), examples, tok, mask_formatting=False)
    loss, grads = _loop_step(cfg, DPOTask(cfg, examples, ref, tok, args, World()), tok, args, tmp_path)

    hf_model = LlamaForCausalLM.from_pretrained(policy)
    trainer = DPOTrainer(model=hf_model, ref_model=LlamaForCausalLM.from_pretrained(reference),
                         processing_class=AutoTokenizer.from_pretrained(policy),
                         train_dataset=Dataset.from_list(rows),
                         args=_trl_args(DPOConfig, tmp_path, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.2],
                                        beta=0.1, per_device_train_batch_size=4))
    trl_examples = [trainer.train_dataset[i] for i in range(4)]
    for ex, trl_ex in zip(examples, trl_examples):  # TRL tokenises the rows as herd does
        assert (ex.prompt, ex.chosen, ex.rejected) == (trl_ex["prompt_ids"], trl_ex["chosen_ids"],
                                                       trl_ex["rejected_ids"])
    trl_loss = trainer.compute_loss(hf_model, trainer.data_collator(trl_examples))
    trl_loss.backward()
    assert loss == pytest.approx(trl_loss.item(), rel=1e-5)
    _assert_grads_close(grads, _hf_grads(hf_model, args))


def test_reward_model_matches_trl_and_round_trips_through_transformers(tmp_path, posttrain_model):  # noqa: F811
    from datasets import Dataset
    from transformers import AutoTokenizer, LlamaForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    policy, _ = posttrain_model
    rows, cfg, tok, examples, args = _preferences(tmp_path, policy, "reward", RewardRunConfig, 5,
                                                  "--data.val_fraction=0")
    task = RewardTask(cfg, examples, tok, World(), args)
    model = task.build_model(cfg, args)
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(0))  # scores of order 1
    save_reward_model(model, tmp_path / "rm", tok)

    # herd's loader and transformers read the same directory; scores agree on a right-padded batch.
    dialogs = [r["prompt"] + r[k] for r in rows for k in ("chosen", "rejected")]
    loaded, loaded_tok = load_reward_model(tmp_path / "rm")
    herd_scores = torch.tensor(score_dialogs(loaded, loaded_tok, dialogs, batch_size=8))
    hf_model = LlamaForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "rm")
    enc = [hf_tok.apply_chat_template(d, tokenize=True, return_dict=False) for d in dialogs]
    width = max(len(e) for e in enc)
    ids = torch.tensor([e + [hf_model.config.pad_token_id] * (width - len(e)) for e in enc])
    with torch.no_grad():
        hf_scores = hf_model(input_ids=ids).logits.squeeze(-1)
    assert torch.allclose(herd_scores, hf_scores, rtol=1e-5, atol=1e-5)

    # The loss through the loop (Bradley-Terry, no margin) equals TRL RewardTrainer's on the same model and rows.
    cfg.model.init_from = str(tmp_path / "rm")
    loss, grads = _loop_step(cfg, RewardTask(cfg, examples, tok, World(), args), tok, args, tmp_path)
    direct = -torch.nn.functional.logsigmoid(herd_scores[0::2] - herd_scores[1::2]).mean()
    assert loss == pytest.approx(direct.item(), rel=1e-5)
    trl_rows = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows]
    hf_model.train()
    trainer = RewardTrainer(model=hf_model, processing_class=hf_tok, train_dataset=Dataset.from_list(trl_rows),
                            args=_trl_args(RewardConfig, tmp_path, per_device_train_batch_size=4))
    trl_loss = trainer.compute_loss(hf_model, trainer.data_collator([trainer.train_dataset[i] for i in range(4)]))
    assert loss == pytest.approx(trl_loss.item(), rel=1e-5)
