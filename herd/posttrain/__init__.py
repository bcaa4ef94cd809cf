"""Post-training the Llama 3 way, through the one training loop: SFT (``sft``), reward model (``reward``), DPO with
Meta's formatting-token mask and NLL term (``dpo``), LoRA (``lora``), model averaging (``merge``), rejection sampling
(``rejection``) and PPO (``ppo``). The losses are pure functions in ``herd.posttrain.losses``."""
