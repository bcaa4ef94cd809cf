import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# Meta's real Llama 3 rank file lives in ../shared beside the checkout (CI always has it; a fresh clone may not).
LLAMA3_TOKENIZER = Path(os.environ.get("HERD_LLAMA3_TOKENIZER", ROOT.parent / "shared" / "llama3" / "tokenizer.model"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def llama3_tokenizer():
    if not LLAMA3_TOKENIZER.exists():
        pytest.skip(f"Meta's tokenizer.model not found at {LLAMA3_TOKENIZER}")
    from herd import Tokenizer

    return Tokenizer(LLAMA3_TOKENIZER)


@pytest.fixture(scope="session")
def small_tokenizer(tmp_path_factory):
    """A BPE tokenizer trained here on a synthetic multilingual corpus (hermetic: no files from outside)."""
    from herd.tokenizer.train import train_bpe

    from .corpus import MULTILINGUAL

    d = tmp_path_factory.mktemp("tok")
    corpus = d / "corpus.txt"
    corpus.write_text("\n\n".join(MULTILINGUAL * 20), encoding="utf-8")
    tok = train_bpe([corpus], vocab_size=1000, progress=False)
    tok.save(d / "out")
    return tok, d / "out"
