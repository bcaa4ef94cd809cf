from herd.model.args import PRESETS, ModelArgs
from herd.model.transformer import Transformer

__all__ = ["PRESETS", "ModelArgs", "Transformer"]
