"""Everything that touches torch.distributed and fairscale lives here.

Model code builds its projections through the factories in `layers` and never talks to a
process group itself, so the same modules run single-device (TP=1, plain `nn.Linear`) and
tensor-parallel (TP=N, fairscale's Column/RowParallelLinear and VocabParallelEmbedding).
"""
from .groups import (
    barrier,
    broadcast_object,
    destroy_model_parallel,
    device_mesh,
    dp_group,
    dp_rank,
    dp_size,
    init_model_parallel,
    is_model_parallel,
    process_device,
    tp_broadcast_object,
    tp_group,
    tp_rank,
    tp_size,
)
from .layers import (
    column_parallel_linear,
    copy_to_tp,
    gather_from_tp,
    is_linear,
    kv_parallel_linear,
    reduce_from_tp,
    row_parallel_linear,
    vocab_parallel_embedding,
)
from .consistency import assert_same_across_tp
from .dcp import checkpoint_process_group, global_rank, global_view, load_tensors, read_whole_tensors, save_tensors, saved_tensor_shapes
from .fsdp import full_state_dict, is_fsdp, local_tensor, shard_data_parallel
from .grads import all_gather_object, all_reduce_max, all_reduce_sum, global_grad_norm, sync_gradients, zero_redundancy_adamw
from .sharding import merge_shards, shard_plan, shard_state_dict, split_state_dict

__all__ = [
    "assert_same_across_tp",
    "broadcast_object",
    "all_gather_object",
    "all_reduce_max",
    "all_reduce_sum",
    "global_grad_norm",
    "checkpoint_process_group",
    "global_rank",
    "global_view",
    "load_tensors",
    "read_whole_tensors",
    "save_tensors",
    "saved_tensor_shapes",
    "sync_gradients",
    "zero_redundancy_adamw",
    "barrier",
    "column_parallel_linear",
    "copy_to_tp",
    "destroy_model_parallel",
    "device_mesh",
    "full_state_dict",
    "is_fsdp",
    "local_tensor",
    "shard_data_parallel",
    "dp_group",
    "dp_rank",
    "dp_size",
    "gather_from_tp",
    "is_linear",
    "init_model_parallel",
    "kv_parallel_linear",
    "is_model_parallel",
    "process_device",
    "merge_shards",
    "reduce_from_tp",
    "row_parallel_linear",
    "shard_plan",
    "shard_state_dict",
    "split_state_dict",
    "tp_broadcast_object",
    "tp_group",
    "tp_rank",
    "tp_size",
    "vocab_parallel_embedding",
]
