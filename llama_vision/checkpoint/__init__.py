"""Checkpoint formats: Meta (params.json + consolidated.NN.pth) and Hugging Face Mllama,
text-only Llama trunks and OpenCLIP image encoders as starting points."""
from .hf import hf_config_from_args, hf_to_meta, meta_to_hf, params_from_hf_config
from .hf_io import load_hf_as_meta, load_hf_state_dict, save_hf_checkpoint
from .lora import export_merged, load_base, load_lora, read_lora_config, save_lora
from .load import checkpoint_format, checkpoint_params, convert_checkpoint, load_into, load_model, rank_state_dict
from .meta import CheckpointMismatchError, load_meta_state_dict, read_params, save_meta_checkpoint
from .openclip import OpenClipReport, init_vision_from_openclip, vision_state_dict_from_openclip
from .text_only import init_from_text_checkpoint, llama_hf_to_meta, load_text_trunk_into

__all__ = [
    "CheckpointMismatchError",
    "OpenClipReport",
    "checkpoint_format",
    "checkpoint_params",
    "convert_checkpoint",
    "export_merged",
    "hf_config_from_args",
    "hf_to_meta",
    "init_from_text_checkpoint",
    "init_vision_from_openclip",
    "llama_hf_to_meta",
    "load_hf_as_meta",
    "load_base",
    "load_hf_state_dict",
    "load_into",
    "load_lora",
    "load_meta_state_dict",
    "load_model",
    "load_text_trunk_into",
    "meta_to_hf",
    "params_from_hf_config",
    "rank_state_dict",
    "read_lora_config",
    "read_params",
    "save_hf_checkpoint",
    "save_lora",
    "save_meta_checkpoint",
    "vision_state_dict_from_openclip",
]
