"""Checkpoint formats: Meta (params.json + consolidated.NN.pth) and Hugging Face Mllama."""
from .hf import hf_config_from_args, hf_to_meta, meta_to_hf, params_from_hf_config

__all__ = ["hf_config_from_args", "hf_to_meta", "meta_to_hf", "params_from_hf_config"]
