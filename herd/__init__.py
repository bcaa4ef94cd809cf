"""herd: the Llama 3 system in PyTorch, from raw text to a served model."""

from herd.checkpoint import CheckpointError, load_model, save_model
from herd.inference.engine import Engine
from herd.inference.generate import complete, generate, stream
from herd.inference.sampling import SamplingParams
from herd.model import ModelArgs, Transformer
from herd.tokenizer import ChatFormat, Tokenizer

__version__ = "0.1.0"

__all__ = ["ChatFormat", "CheckpointError", "Engine", "ModelArgs", "SamplingParams", "Tokenizer", "Transformer",
           "complete", "generate", "load_model", "save_model", "stream", "__version__"]
