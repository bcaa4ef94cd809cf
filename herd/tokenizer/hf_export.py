"""Export a herd ``Tokenizer`` as Hugging Face files that ``PreTrainedTokenizerFast`` loads with identical ids.

tiktoken has no merges list: a pair is merged when its concatenation is a token, lowest rank first. HF's BPE gets the
same behaviour from a merges list that holds every split (left, right) of every token whose halves are tokens, ordered
by the rank of the result, together with ``ignore_merges=True`` (a whole pre-token that is in the vocabulary is taken
as is, as tiktoken does).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from herd.io import atomic_write_json

if TYPE_CHECKING:
    from herd.tokenizer.tokenizer import Tokenizer

# Llama 3 chat template (Meta's rendering: header, "\n\n", content, <|eot_id|>; content is not trimmed, as in
# Meta's llama-models ChatFormat and herd.ChatFormat).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + ('ipython' if message['role'] == 'tool' else message['role']) + '<|end_header_id|>\n\n'"
    " + message['content'] + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def derive_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    merges: list[tuple[int, int, int, bytes, bytes]] = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort()
    return [(m[3], m[4]) for m in merges]


def build_hf_tokenizer(tok: Tokenizer):
    """A ``tokenizers.Tokenizer`` equivalent to ``tok`` (BOS prepended by the post-processor, as in Llama 3)."""
    from tokenizers import AddedToken, Regex, decoders, pre_tokenizers, processors
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import BPE

    from herd.tokenizer.tokenizer import bytes_to_hf

    vocab = {bytes_to_hf(t): r for t, r in tok.ranks.items()}
    merges = [(bytes_to_hf(a), bytes_to_hf(b)) for a, b in derive_merges(tok.ranks)]
    hf = HFTokenizer(BPE(vocab=vocab, merges=merges, ignore_merges=True, fuse_unk=False, byte_fallback=False))
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(tok.pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in tok.special_tokens])
    bos = "<|begin_of_text|>"
    hf.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                      special_tokens=[(bos, tok.bos_id)]),
    ])
    return hf


def write_hf_files(tok: Tokenizer, directory: Path, model_max_length: int = 131072) -> None:
    from herd.io import atomic_write_text

    hf = build_hf_tokenizer(tok)
    atomic_write_text(directory / "tokenizer.json", hf.to_str(pretty=False))
    atomic_write_json(directory / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|end_of_text|>",
        "pad_token": None,
        "clean_up_tokenization_spaces": False,  # True would alter decoded text versus tiktoken
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": model_max_length,
        "chat_template": CHAT_TEMPLATE,
    })
    atomic_write_json(directory / "special_tokens_map.json",
                      {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"})


__all__ = ["CHAT_TEMPLATE", "build_hf_tokenizer", "derive_merges", "write_hf_files"]
