"""``herd sft | reward | dpo`` (and the other post-training verbs): thin verbs over herd.posttrain; libraries are
imported inside each verb, so the CLI starts fast."""

from __future__ import annotations

import argparse


def cmd_sft(a: argparse.Namespace, overrides: list[str]) -> None:
    from herd.config import load_config
    from herd.posttrain.config import SFTRunConfig
    from herd.posttrain.sft import sft

    sft(load_config(a.config, overrides, cls=SFTRunConfig), a.run_dir)


def cmd_reward(a: argparse.Namespace, overrides: list[str]) -> None:
    from herd.config import load_config
    from herd.posttrain.config import RewardRunConfig
    from herd.posttrain.reward import train_reward

    train_reward(load_config(a.config, overrides, cls=RewardRunConfig), a.run_dir)


def cmd_dpo(a: argparse.Namespace, overrides: list[str]) -> None:
    from herd.config import load_config
    from herd.posttrain.config import DPORunConfig
    from herd.posttrain.dpo import dpo

    dpo(load_config(a.config, overrides, cls=DPORunConfig), a.run_dir)


def _training_verb(sub, name: str, help: str, fn) -> argparse.ArgumentParser:
    s = sub.add_parser(name, help=help, description="Extra --section.key=value arguments override the config file; "
                                                    "starting again in the same --run-dir resumes.")
    s.add_argument("--config", default=None, help="TOML file (see configs/)")
    s.add_argument("--run-dir", required=True)
    s.set_defaults(fn=fn, takes_overrides=True)
    return s


def register(sub, groups: dict) -> None:
    _training_verb(sub, "sft", "supervised fine-tuning on JSONL dialogs (loss on assistant turns)", cmd_sft)
    _training_verb(sub, "reward", "train a reward model on preference rows (Bradley-Terry, no margin)", cmd_reward)
    _training_verb(sub, "dpo", "DPO on preference rows (Llama 3: formatting-token mask, NLL term)", cmd_dpo)
    # --- more post-training verbs (merge, rejection-sample, ppo) register below this line ---
    _training_verb(sub, "ppo", "PPO with rollouts from the engine and a reward model or a verifiable reward", cmd_ppo)
    s = sub.add_parser("merge", help="average compatible model directories (uniform or weighted)")
    s.add_argument("models", nargs="+", metavar="DIR", help="HF or Meta model directories with the same config")
    s.add_argument("--out", required=True, help="output model directory (HF layout, first model's tokenizer)")
    s.add_argument("--weights", default=None, help="comma-separated, one per model; normalised to sum to 1")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(fn=cmd_merge)
    s = sub.add_parser("rejection-sample", help="K samples per prompt, the reward model keeps the best (SFT data)")
    s.add_argument("--policy", required=True, help="model directory to sample from")
    s.add_argument("--reward", required=True, help="reward model directory (herd reward / LlamaForSequenceClassif.)")
    s.add_argument("--prompts", required=True, help='JSONL: {"messages": [...]} or {"prompt": str} per line')
    s.add_argument("--samples", type=int, required=True, help="K samples per prompt (Llama 3: 10-30)")
    s.add_argument("--out", required=True, help='JSONL of {"messages": [...], "score": s, "scores": [...]}')
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--max-tokens", type=int, default=256, help="longest response")
    s.add_argument("--batch-size", type=int, default=32, help="sequences decoded together; dialogs per scoring pass")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    s.set_defaults(fn=cmd_rejection_sample)


def cmd_ppo(a: argparse.Namespace, overrides: list[str]) -> None:
    from herd.config import load_config
    from herd.posttrain.ppo import PPORunConfig, ppo

    ppo(load_config(a.config, overrides, cls=PPORunConfig), a.run_dir)


def cmd_merge(a: argparse.Namespace) -> None:
    from herd.posttrain.merge import merge_models, normalise_weights, parse_weights

    weights = normalise_weights(parse_weights(a.weights), len(a.models))
    out = merge_models(a.models, a.out, weights, overwrite=a.overwrite)
    print(f"wrote the average of {len(a.models)} models (weights {', '.join(f'{w:.4g}' for w in weights)}) to {out}")


def cmd_rejection_sample(a: argparse.Namespace) -> None:
    from herd.posttrain.rejection import rejection_sample

    s = rejection_sample(a.policy, a.reward, a.prompts, a.samples, a.out, temperature=a.temperature, top_p=a.top_p,
                         max_tokens=a.max_tokens, batch_size=a.batch_size, seed=a.seed, device=a.device)
    print(f"{s['samples']} samples for {s['prompts']} prompts in {s['sample_s']:.1f} s ({s['samples_per_s']:.2f} "
          f"samples/s, {s['tokens_per_s']:.1f} tokens/s); scored at {s['scored_per_s']:.1f} dialogs/s; "
          f"mean score {s['mean_score']:.3f}, mean best {s['mean_best_score']:.3f}; "
          f"wrote {s['kept']} dialogs to {a.out}" + (f" ({s['all_empty']} prompts had only empty samples)"
                                                      if s["all_empty"] else ""))
