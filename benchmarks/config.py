"""What one benchmark case is made of: the configuration, the variant names and the dtypes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

#: what a run measures unless ``--variants`` says otherwise
DEFAULT_VARIANTS = ("materialized", "chunked", "sampled_dense", "sampled_sparse", "baseline")
#: every variant: the default ones and the margins beyond the combined one (materialized, like the first)
MARGIN_VARIANTS = ("adaface", "curricularface", "subcenter")
#: opt-in implementations of the head (need extra packages / a GPU): PartialFC(impl="triton")
IMPL_VARIANTS = ("triton",)
#: opt-in: certified gradient filtering (PartialFC(grad_filter=...)), materialized; dense SGD / SparseSGD; chunked
FILTER_VARIANTS = ("filtered", "filtered_sparse", "filtered_chunked")
VARIANTS = DEFAULT_VARIANTS + MARGIN_VARIANTS + IMPL_VARIANTS + FILTER_VARIANTS
SUB_CENTERS = 3  # rows per class of the subcenter variant
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
MiB = 2 ** 20


@dataclass
class BenchConfig:
    """Shapes and settings of one (classes per rank) point of a run; every variant shares it."""

    classes_per_rank: int = 100_000
    embedding_size: int = 512
    batch_per_rank: int = 256
    sample_rate: float = 0.1
    chunk_size: int = 8192
    dtype: str = "fp32"
    amp: str = "none"  # autocast dtype for the head's forward ("none", "bf16", "fp16")
    world_size: int = 2
    lr: float = 0.01
    momentum: float = 0.9
    validate: bool = False
    seed: int = 0
    target_angle: Optional[float] = None  # degrees: embeddings this far from their class row (trained-like)
    grad_filter: Optional[float] = None  # eps of the filtered variants; None: the library's default
    grad_filter_block: int = 256

    @property
    def num_classes(self) -> int:
        """Classes over all ranks."""
        return self.classes_per_rank * self.world_size

    @property
    def global_batch(self) -> int:
        """Embeddings over all ranks (what every rank's logits have as rows)."""
        return self.batch_per_rank * self.world_size

    @property
    def mm_dtype(self) -> str:
        """The dtype the matrix products run in (the autocast dtype when there is one)."""
        return self.dtype if self.amp == "none" else self.amp


def nbytes(t: torch.Tensor) -> int:
    """Bytes of a tensor's elements."""
    return t.numel() * t.element_size()
