"""llama_vision: Llama-3-style vision-language models (image + video adapters on a frozen
Llama 3 decoder), exact to Meta's Llama 3.2 Vision reference.

    model = llama_vision.load_model("Llama3.2-11B-Vision-Instruct/")       # Meta or HF dir
    tok = llama_vision.load_tokenizer("Llama3.2-11B-Vision-Instruct/tokenizer.model")
    gen = llama_vision.Generator(model, tok)
    gen.chat([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}], [img])
"""
from .data.image import ImageProcessor
from .generation import Generator
from .model import ModelArgs, VisionLanguageModel, build_model, set_trainable
from .tokenizer import ChatFormat, load_tokenizer


def load_model(path, tp=None, device="cpu", dtype=None):
    """Load a Meta (params.json + consolidated.NN.pth) or Hugging Face Mllama checkpoint dir
    at any tensor-parallel degree; see llama_vision.checkpoint.load_model."""
    import torch

    from .checkpoint import load_model as _load

    return _load(path, tp=tp, device=device, dtype=dtype or torch.float32)


__all__ = [
    "ChatFormat",
    "Generator",
    "ImageProcessor",
    "ModelArgs",
    "VisionLanguageModel",
    "build_model",
    "load_model",
    "load_tokenizer",
    "set_trainable",
]
