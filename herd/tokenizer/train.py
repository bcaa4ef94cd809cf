"""Train a byte-level BPE tokenizer with Llama 3's pre-tokenization, using the ``tokenizers`` library.

The learned vocabulary is exported as tiktoken ranks (rank = id in the trained model) followed by the 256 Llama 3
special tokens, then ``tokenizer.json`` is regenerated from those ranks, so herd, tiktoken and transformers all
produce the same ids.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from tqdm import tqdm

from herd.data.readers import expand_inputs
from herd.errors import UserError
from herd.tokenizer.tokenizer import PATTERN, Tokenizer, hf_to_bytes

# Documents are fed to the trainer in pieces of at most this many characters, so one huge file never has to be
# pre-tokenized as a single string (the regex never matches across whitespace runs this long anyway).
_PIECE = 1 << 20


def _pieces(docs: Iterable[str], progress: bool) -> Iterator[str]:
    bar = tqdm(desc="reading corpus", unit="B", unit_scale=True, disable=not progress)
    for doc in docs:
        for start in range(0, len(doc), _PIECE):
            piece = doc[start:start + _PIECE]
            bar.update(len(piece))
            yield piece
    bar.close()


def train_bpe(inputs: Iterable[str | Path], vocab_size: int, min_frequency: int = 2, progress: bool = True
              ) -> Tokenizer:
    """Learn ``vocab_size`` BPE ranks (the 256 byte tokens included; special tokens come on top)."""
    from tokenizers import Regex, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    from herd.data.shards import documents  # (herd.data imports the tokenizer: imported here, not at the top)

    if vocab_size < 256:
        raise UserError(f"--vocab-size must be at least 256 (one token per byte), got {vocab_size}")
    inputs = list(inputs)
    files = expand_inputs(inputs)
    hf = HFTokenizer(BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    trainer = BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=progress,
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    hf.train_from_iterator(_pieces(documents(inputs, files), progress), trainer=trainer)
    ranks = {hf_to_bytes(token): rank for token, rank in hf.get_vocab().items()}
    return Tokenizer(ranks=ranks)


def train_and_save(inputs: Iterable[str | Path], vocab_size: int, out: str | Path, progress: bool = True
                   ) -> Tokenizer:
    from herd.io import atomic_directory, check_new_output

    check_new_output(out)  # before training, not after it
    tok = train_bpe(inputs, vocab_size, progress=progress)
    with atomic_directory(out) as tmp:
        tok.save(tmp)
    return tok
