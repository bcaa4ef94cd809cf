"""herd: the Llama 3 system in PyTorch, from raw text to a served model."""

from herd.checkpoint import CheckpointError, load_model, save_model
from herd.model import ModelArgs, Transformer
from herd.tokenizer import ChatFormat, Tokenizer

__version__ = "0.1.0"

__all__ = ["ChatFormat", "CheckpointError", "ModelArgs", "Tokenizer", "Transformer", "load_model", "save_model",
           "__version__"]
