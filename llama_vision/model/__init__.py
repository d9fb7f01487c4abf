from .args import ModelArgs, fusion_schedule
from .cross_attention import GatedCrossAttentionBlock, MediaState
from .modality import MediaTokens, Modality, every_kth, zero_gates
from .model import VisionLanguageModel, build_model, init_weights
from .text import KVCache
from .trainability import set_trainable, trainable_groups

__all__ = [
    "GatedCrossAttentionBlock",
    "KVCache",
    "MediaState",
    "MediaTokens",
    "Modality",
    "ModelArgs",
    "VisionLanguageModel",
    "build_model",
    "every_kth",
    "fusion_schedule",
    "init_weights",
    "set_trainable",
    "trainable_groups",
    "zero_gates",
]
