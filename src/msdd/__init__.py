"""msdd: an image tokenizer with a multi-scale flow-matching diffusion decoder, distilled to one step
per scale. `from msdd import Tokenizer, load_config`."""

from msdd.config import Config, ModelConfig, load_config, preset_names
from msdd.tokenizer import Tokenizer

__all__ = ["Config", "ModelConfig", "Tokenizer", "load_config", "preset_names"]
__version__ = "0.1.0"
