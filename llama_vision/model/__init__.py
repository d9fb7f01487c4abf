from .args import ModelArgs, fusion_schedule
from .cross_attention import GatedCrossAttentionBlock, MediaState
from .modality import MediaTokens, Modality, every_kth, zero_gates
from .builder import build_model
from .init import init_weights
from .model import VisionLanguageModel
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
