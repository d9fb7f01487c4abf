"""llama_vision: Llama-3-style vision-language models (image + video adapters on a frozen
Llama 3 decoder), exact to Meta's Llama 3.2 Vision reference."""
from .model import ModelArgs, VisionLanguageModel, build_model, set_trainable

__all__ = ["ModelArgs", "VisionLanguageModel", "build_model", "set_trainable"]
