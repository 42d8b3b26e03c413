"""partialfc: an exact, model-parallel combined-margin softmax head with Partial FC sampling."""
from .margin import CombinedMargin
from .adaface import AdaFace
from .curricularface import CurricularFace
from .factory import margin_from_config
from .head import HeadStats, PartialFC
from .predict import sharded_topk
from .subcenter import angles_to_dominant, clean_sub_centers, keep_dominant, sub_center_counts
from .partition import owner_of, shard_bounds, shard_sizes
from .softmax import MarginSoftmaxCrossEntropy, margin_softmax_cross_entropy
from .collectives import gather_embeddings
from .init import init_weight_rows_
from .optim import SparseSGD
from .clip import clip_grad_norm_
from .wrapping import head_parameters, head_state_names, ignore_heads_for_ddp
from .state import (OptimizerCheckpoint, consolidate_optimizer_state, consolidate_state_dict,
                    keep_all_shards_in_accelerate, load_head_shards, shard_optimizer_state)

__all__ = [
    "CombinedMargin",
    "AdaFace",
    "CurricularFace",
    "margin_from_config",
    "PartialFC",
    "HeadStats",
    "sharded_topk",
    "sub_center_counts",
    "angles_to_dominant",
    "keep_dominant",
    "clean_sub_centers",
    "shard_bounds",
    "shard_sizes",
    "owner_of",
    "margin_softmax_cross_entropy",
    "MarginSoftmaxCrossEntropy",
    "gather_embeddings",
    "init_weight_rows_",
    "SparseSGD",
    "clip_grad_norm_",
    "head_parameters",
    "head_state_names",
    "ignore_heads_for_ddp",
    "consolidate_state_dict",
    "consolidate_optimizer_state",
    "shard_optimizer_state",
    "load_head_shards",
    "OptimizerCheckpoint",
    "keep_all_shards_in_accelerate",
]
__version__ = "0.1.0"
