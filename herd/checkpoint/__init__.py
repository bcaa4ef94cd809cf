from herd.checkpoint.errors import CheckpointError
from herd.checkpoint.loader import (
    check_tokenizer,
    detect_format,
    load_model,
    read_args,
    read_generation_config,
    save_model,
)

__all__ = ["CheckpointError", "check_tokenizer", "detect_format", "load_model", "read_args", "read_generation_config",
           "save_model"]
