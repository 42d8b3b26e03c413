"""Capacity planner for :class:`partialfc.PartialFC`: per-rank memory of one training step.

Pure Python (no torch): the plan replays, buffer by buffer, what one step of the head allocates
and frees, as written in :mod:`partialfc.head`, :mod:`partialfc.softmax`,
:mod:`partialfc.sampling`, :mod:`partialfc.collectives` and the optimizer, and reports the peak
of the live bytes together with what is live at that moment.

Usage::

    python -m partialfc.plan --classes 10M --world-size 8 --batch-per-rank 128 \\
        --dtype bf16 --optimizer sparse_sgd --sample-rate 0.1 --device-memory 80GiB

Symbols: ``W`` ranks, ``B = W * batch_per_rank`` gathered rows, ``d`` embedding size, ``C`` this
rank's classes (rank 0: the largest shard), ``k`` rows that take part in the step (``C``, or the
Partial FC sample), ``P/M/A/E`` bytes per element of the parameters, of the matrix products, of
the accumulation (fp32; fp64 for fp64 products) and of the embeddings. What one step holds:

==================  =====================================================================
weights             ``C d P``, the shard (``head.weight``)
gradient            the loss' ``(k, d)`` gradient ``grad_w`` in the weight dtype ``P``, the
                    ``(C, d)`` dense gradient scattered from a sample, ``weight.grad``
optimizer_state     momentum ``C d P`` (sgd_momentum, sparse_sgd + a ``C`` bool row mask),
                    ``2 C d P`` (adamw)
logits              materialized: one ``(B, k)`` buffer in ``A`` kept from forward to backward;
                    chunked: one ``(B, chunk)`` block at a time (each is deleted before the next)
mm_temporaries      matmul-dtype copies (``w_mm``, ``x^_mm``, the block product before its cast,
                    ``G'_mm``, ``G'^T x^`` before it is copied into ``grad_w`` when ``M != P``;
                    with ``M == P`` it is written into ``grad_w`` directly), the radial
                    projection's row slices (``VECDOT_ROWS`` rows: the ``linalg.vecdot`` product,
                    and the ``A`` promotions of the slice of ``grad_w`` and of ``w`` when
                    ``P != A``), and on CPU the ``A`` copy that ``vector_norm(weight, dtype=A)``
                    makes of a ``P != A`` weight
embeddings          gathered payload and ``x_global`` (``B (d E + 8)``), ``x^`` and the
                    ``(B, d)`` gradients
sampled_weights     the ``(k, d)`` copy of the sampled rows (``index_select`` / ``F.embedding``)
                    and the ``k`` indices
optimizer_temps     SparseSGD's row gathers (4 ``(k, d)``), AdamW's ``sqrt`` / ``div``
                    results, weight decay's ``grad + wd p``
other               per-class vectors (``1/|w_j|``, column scales, sampling scores)
==================  =====================================================================

Not included: the inputs and their gradient outside the head, the backbone, the CUDA context
and the caching allocator's rounding/fragmentation (pass those as ``reserve``), collective
library buffers, (B,)-sized vectors (a few kB).

Scenarios: ``fwd_bwd`` is forward + backward with no optimizer (the gradient of the previous
step freed first, as ``zero_grad(set_to_none=True)`` does); the full ``step`` adds the
optimizer's persistent state and its ``step()``. ``device="cpu"`` models what the resident set
size sees (``torch.empty`` pages count once written; ``vector_norm`` upcasts on the host; AdamW's
for-loop step); ``device="cuda"`` models ``torch.cuda.max_memory_allocated`` (allocation counts
at once; foreach optimizers).
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from typing import Optional

_VECDOT_ROWS = {"cpu": 4096, "cuda": 65536}  # as partialfc.softmax.VECDOT_ROWS (tests check they agree)
DTYPE_BYTES = {"fp64": 8, "fp32": 4, "bf16": 2, "fp16": 2}
OPTIMIZERS = ("sgd", "sgd_momentum", "sparse_sgd", "adamw")
CATEGORIES = ("weights", "gradient", "optimizer_state", "logits", "mm_temporaries", "embeddings",
              "sampled_weights", "optimizer_temps", "other")
_DTYPE_ALIASES = {"float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16",
                  "float64": "fp64", "double": "fp64"}

__all__ = ["plan_memory", "max_classes", "parse_size", "format_bytes", "CATEGORIES", "OPTIMIZERS"]


# ------------------------------------------------------------------------------------------
def parse_size(text) -> int:
    """``"80GiB"``, ``"80GB"``, ``"80G"`` (= GiB), ``"1.5e9"``, ``1000`` -> bytes."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return int(text)
    m = re.fullmatch(r"\s*([0-9.eE+-]+)\s*([KMGT]?)(i?)(B?)\s*", str(text), flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot read a size from {text!r} (e.g. 80GiB, 40GB, 512MiB)")
    value, unit, i, b = float(m.group(1)), m.group(2).upper(), m.group(3), m.group(4)
    power = "KMGT".index(unit) + 1 if unit else 0
    base = 1000 if (unit and b and not i) else 1024  # "GB" = 10^9, "GiB" and bare "G" = 2^30
    return int(value * base ** power)


def parse_count(text) -> int:
    """``"10M"``, ``"1.4M"``, ``"100k"``, ``"100_000"`` -> int."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    m = re.fullmatch(r"\s*([0-9._eE+-]+)\s*([kKmMgG]?)\s*", str(text))
    if not m:
        raise ValueError(f"cannot read a count from {text!r} (e.g. 1000000, 1M, 100k)")
    scale = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[m.group(2).lower()]
    return int(round(float(m.group(1).replace("_", "")) * scale))


def format_bytes(n: float) -> str:
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def _dtype(name: Optional[str], default: Optional[str] = None) -> str:
    if name is None:
        if default is None:
            raise ValueError("dtype missing")
        return default
    key = str(name).lower().replace("torch.", "")
    key = _DTYPE_ALIASES.get(key, key)
    if key not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {name!r}; one of {sorted(DTYPE_BYTES)}")
    return key


def _shard(num_classes: int, world_size: int, rank: int) -> int:
    """Classes of ``rank`` (the rule of :mod:`partialfc.partition`)."""
    base, extra = divmod(num_classes, world_size)
    return base + (rank < extra)


def sample_rows(classes_local: int, sample_rate: float, global_batch: int) -> int:
    """Rows taking part in a step: ``planned_sample_size`` of :mod:`partialfc.sampling`, raised to
    the largest number of positives ``min(B, C)`` when those could exceed it (worst case)."""
    if sample_rate >= 1.0:
        return classes_local
    k = min(classes_local, max(1, math.ceil(sample_rate * classes_local)))
    if k < min(global_batch, classes_local):
        k = min(global_batch, classes_local)
    return k


# ------------------------------------------------------------------------------------------
class _Timeline:
    """Live buffers by name; the peak of their sum and what was live at the peak."""

    def __init__(self):
        self.live: dict[str, tuple[str, int]] = {}
        self.peak, self.peak_where = 0, ""
        self.peak_live: dict[str, tuple[str, int]] = {}

    def alloc(self, name: str, category: str, nbytes: float, where: str) -> None:
        if name in self.live:
            raise AssertionError(f"plan: buffer {name} allocated twice")
        nbytes = int(nbytes)
        if nbytes <= 0:
            return
        self.live[name] = (category, nbytes)
        total = sum(b for _, b in self.live.values())
        if total > self.peak:
            self.peak, self.peak_where, self.peak_live = total, where, dict(self.live)

    def free(self, *names: Optional[str]) -> None:
        for name in names:
            if name is not None:
                self.live.pop(name, None)

    def breakdown(self) -> dict[str, int]:
        out = {c: 0 for c in CATEGORIES}
        for category, nbytes in self.peak_live.values():
            out[category] += nbytes
        return out


def _simulate(cfg: dict, with_optimizer: bool) -> _Timeline:
    """One steady-state step (weights and optimizer state allocated, no gradient yet)."""
    W, B, Br, d = cfg["world_size"], cfg["global_batch"], cfg["batch_per_rank"], cfg["embedding_size"]
    C, k = cfg["classes_local"], cfg["sampled_classes"]
    P, M, E = DTYPE_BYTES[cfg["dtype"]], DTYPE_BYTES[cfg["mm_dtype"]], DTYPE_BYTES[cfg["embedding_dtype"]]
    A = 8 if cfg["mm_dtype"] == "fp64" else 4
    p_is_a = cfg["dtype"] == ("fp64" if A == 8 else "fp32")
    m_is_a = M == A and cfg["mm_dtype"] in ("fp32", "fp64")
    e_is_a = cfg["embedding_dtype"] == ("fp64" if A == 8 else "fp32")
    p_is_m = cfg["dtype"] == cfg["mm_dtype"]
    cpu = cfg["device"] == "cpu"
    sampled, sparse, opt = cfg["sample_rate"] < 1.0, cfg["sparse_grad"], cfg["optimizer"]
    chunk = k if not cfg["chunk_size"] else min(cfg["chunk_size"], k)
    n_full, rem = divmod(k, chunk)
    # representative blocks: the loop repeats the same pattern; two full blocks show its peak
    blocks = [chunk] * min(n_full, 2) + ([rem] if rem else [])
    materialized = chunk == k

    t = _Timeline()
    t.alloc("weight", "weights", C * d * P, "start")
    if with_optimizer:
        if opt in ("sgd_momentum", "sparse_sgd"):
            t.alloc("momentum", "optimizer_state", C * d * P, "start")
            if opt == "sparse_sgd" and sparse:
                t.alloc("row_initialized", "optimizer_state", C, "start")
        elif opt == "adamw":
            t.alloc("exp_avg", "optimizer_state", C * d * P, "start")
            t.alloc("exp_avg_sq", "optimizer_state", C * d * P, "start")

    # ---- forward: head.forward ----------------------------------------------------------
    where = "forward: gather"
    if W > 1:  # GatherEmbeddings: payload = [x | labels as E], gathered, x_global, labels_global
        t.alloc("payload", "embeddings", Br * (d * E + 8), where)
        t.alloc("gathered", "embeddings", B * (d * E + 8), where)
        t.alloc("x_global", "embeddings", B * d * E, where)
        t.alloc("labels_global", "embeddings", B * 8, where)
        t.free("payload", "gathered")
    if sampled:
        where = "forward: sampling"
        t.alloc("positive", "other", C + 1, where)
        t.alloc("scores", "other", 4 * C, where)
        if cpu:  # CPU topk keeps a (value, index) pair per candidate
            t.alloc("topk_queue", "other", 16 * C, where)
        t.alloc("topk_out", "other", 12 * k, where)
        t.free("topk_queue")
        t.alloc("index", "sampled_weights", 8 * k, where)  # sorted indices (kept: head.sampled_index)
        t.alloc("sort_perm", "other", 8 * k, where)
        t.free("topk_out", "sort_perm")
        t.alloc("where_in_sample", "other", 8 * C, where)
        t.free("positive", "scores", "where_in_sample")
        t.alloc("w_sampled", "sampled_weights", k * d * P, "forward: sampled weight copy")
    elif sparse:
        t.alloc("index", "sampled_weights", 8 * C, "forward: arange")
        t.alloc("w_sampled", "sampled_weights", C * d * P, "forward: F.embedding copy")

    # ---- forward: MarginSoftmaxCrossEntropy ----------------------------------------------
    where = "forward: norms"
    if not e_is_a:
        t.alloc("x_acc", "embeddings", B * d * A, where)
    t.alloc("xhat", "embeddings", B * d * A, where)
    if cpu and not p_is_a:
        t.alloc("norm_upcast", "mm_temporaries", k * d * A, where)
    t.alloc("inv_norm", "other", k * A, where)
    t.alloc("inv_norm_tmp", "other", 2 * k * A, where)
    t.free("norm_upcast", "inv_norm_tmp")
    t.alloc("w_t", "embeddings", B * d * A, where)
    if not m_is_a:
        t.alloc("xhat_mm", "mm_temporaries", B * d * M, where)
    if not p_is_m:
        t.alloc("w_mm", "mm_temporaries", k * d * M, where)
    t.alloc("col_scale", "other", k * A, where)
    previous = None
    for i, cb in enumerate(blocks):
        where = "forward: logits" + ("" if materialized else f" block {i + 1}")
        name = f"z{i}"
        t.free(previous)  # softmax.py deletes each block before forming the next (chunked)
        if not m_is_a:
            t.alloc(name + "_mm", "mm_temporaries", B * cb * M, where)
        t.alloc(name, "logits", B * cb * A, where)
        t.free(name + "_mm")
        previous = name
    if not materialized:  # materialized: the one block is the buffer kept for backward
        t.free(previous)
    t.free("x_acc", "w_t", "xhat_mm", "w_mm", "col_scale")
    if W > 1:
        t.free("x_global", "labels_global")

    # ---- backward: MarginSoftmaxCrossEntropy.backward -------------------------------------
    where = "backward: setup"
    if not m_is_a:
        t.alloc("b_xhat_mm", "mm_temporaries", B * d * M, where)
    if not p_is_m:
        t.alloc("b_w_mm", "mm_temporaries", k * d * M, where)
    t.alloc("grad_xhat", "embeddings", B * d * A, where)
    # grad_w = torch.empty(k, d): counted at once on CUDA; on CPU its pages count once written,
    # block by block (grad_w[c0:c1] = a)
    grad_w_parts = []
    if not cpu:
        t.alloc("grad_w", "gradient", k * d * P, where)  # in the weight's dtype
        grad_w_parts.append("grad_w")

    def grad_block(cb, tag):
        where_ = f"backward: weight-gradient product{tag}"
        if not m_is_a:
            t.alloc("g_mm", "mm_temporaries", B * cb * M, where_)
        t.alloc("gx_part", "embeddings", B * d * M, where_)
        t.free("gx_part")
        # a = grad_w[c0:c1]: G'^T x^ goes straight into the gradient (mm out=) when the product
        # dtype is the accumulation dtype, else through an M-dtype product and a copy
        if not p_is_m:
            t.alloc("a_mm", "mm_temporaries", cb * d * M, where_)
        if cpu:  # the block's pages of grad_w are written here
            name_ = f"grad_w{len(grad_w_parts)}"
            t.alloc(name_, "gradient", cb * d * P, f"backward: grad_w written{tag}")
            grad_w_parts.append(name_)
        t.free("a_mm")
        t.alloc("coef", "other", cb * A, where_)
        # linalg.vecdot(a, w_blk) is (a * w_blk).sum(1), run on slices of VECDOT_ROWS rows
        # (softmax.py): a (min(cb, VECDOT_ROWS), d) product for a moment
        rows = min(cb, _VECDOT_ROWS["cpu" if cpu else "cuda"])
        if not p_is_a:  # the slice of a and of w promoted to the accumulation dtype
            t.alloc("a_slice", "mm_temporaries", rows * d * A, where_)
            t.alloc("w_slice", "mm_temporaries", rows * d * A, where_)
        t.alloc("vecdot_tmp", "mm_temporaries", rows * d * A, where_)
        t.free("a_slice", "w_slice")
        t.free("vecdot_tmp", "g_mm", "coef")

    last_z = "z0"  # materialized: the forward's buffer, turned into G' in place
    if materialized:
        grad_block(k, "")
    else:
        # the loop repeats one pattern and its live set grows only through grad_w on CPU, so
        # the last blocks show the peak: the earlier ones are summarised
        all_blocks = [chunk] * n_full + ([rem] if rem else [])
        shown = all_blocks[-3:]
        earlier = len(all_blocks) - len(shown)
        if earlier:
            if cpu:
                t.alloc("grad_w_earlier", "gradient", earlier * chunk * d * P, "backward: earlier blocks")
                grad_w_parts.append("grad_w_earlier")
            t.alloc("bz_earlier", "logits", B * chunk * A, "backward: earlier blocks")
        prev = "bz_earlier" if earlier else None
        for i, cb in enumerate(shown):
            name = f"bz{i}"
            tag = f" (block {earlier + i + 1} of {len(all_blocks)})"
            t.free(prev)  # softmax.py deletes each block after its gradient step
            if not m_is_a:
                t.alloc(name + "_mm", "mm_temporaries", B * cb * M, "backward: recompute" + tag)
            t.alloc(name, "logits", B * cb * A, "backward: recompute" + tag)
            t.free(name + "_mm")
            prev = name
            grad_block(cb, tag)
        t.free(prev)
        last_z = None
    where = "backward: return"
    t.alloc("grad_x", "embeddings", B * d * A, where)
    if not e_is_a:
        t.alloc("grad_x_e", "embeddings", B * d * E, where)
    # the Function returns; its locals and saved tensors (incl. a sampled weight copy) go
    t.free(last_z, "b_xhat_mm", "b_w_mm", "grad_xhat", "grad_x", "xhat", "inv_norm", "w_sampled")
    grad_k = grad_w_parts  # already in the weight's dtype
    # ---- backward: weight path ------------------------------------------------------------
    if sampled and not sparse:  # IndexSelectBackward: zeros (C, d) + index_add_
        t.alloc("grad_dense", "gradient", C * d * P, "backward: sampled gradient scattered to (C, d)")
        t.free(*grad_k)
    elif sparse:  # EmbeddingBackward: a COO tensor around the same values
        t.alloc("grad_indices", "gradient", 8 * k, "backward: sparse gradient")
    # else: AccumulateGrad takes grad_w itself as weight.grad
    if W > 1:  # GatherEmbeddings.backward: reduce-scatter + scale
        t.alloc("grad_local", "embeddings", Br * d * E, "backward: reduce-scatter")
        t.alloc("grad_local_scaled", "embeddings", Br * d * E, "backward: reduce-scatter")
        t.free("grad_local", "grad_x_e")
    else:
        t.free("grad_x_e")

    # ---- optimizer ------------------------------------------------------------------------
    if with_optimizer:
        rows = k if sparse else C
        where = "optimizer step"
        wd = cfg["weight_decay"] != 0
        if opt == "sparse_sgd" and sparse:
            t.alloc("coalesced", "optimizer_temps", k * d * P + 8 * k, where)
            t.alloc("p_rows", "optimizer_temps", k * d * P, where)
            if wd:
                t.alloc("g_wd", "optimizer_temps", k * d * P, where)
            t.alloc("buf_rows", "optimizer_temps", k * d * P, where)
            t.alloc("buf_rows_where", "optimizer_temps", k * d * P, where)
            t.free("buf_rows")
            t.alloc("p_new", "optimizer_temps", k * d * P, where)
        elif opt == "adamw":
            t.alloc("sqrt", "optimizer_temps", rows * d * P, where)
            if cpu:  # for-loop AdamW: (v.sqrt() / c) holds both results for a moment
                t.alloc("div", "optimizer_temps", rows * d * P, where)
        elif wd:  # SGD: grad.add(p, alpha=wd)
            t.alloc("g_wd", "optimizer_temps", rows * d * P, where)
    return t


# ------------------------------------------------------------------------------------------
def plan_memory(num_classes: Optional[int] = None, embedding_size: int = 512, world_size: int = 1,
                batch_per_rank: int = 128, sample_rate: float = 1.0, dtype: str = "fp32",
                mm_dtype: Optional[str] = None, optimizer: str = "sgd_momentum",
                chunk_size: Optional[int] = None, sparse_grad: Optional[bool] = None,
                embedding_dtype: Optional[str] = None, device: str = "cuda", weight_decay: float = 0.0,
                rank: int = 0, classes_per_rank: Optional[int] = None) -> dict:
    """Per-rank memory of one step of ``PartialFC`` (bytes).

    Give ``num_classes`` (all ranks; ``rank`` 0 holds the largest shard) or ``classes_per_rank``.
    ``dtype`` is the parameters' dtype, ``mm_dtype`` the matrix products' (default ``dtype``;
    another one means autocast), ``embedding_dtype`` the embeddings' (default ``mm_dtype``).
    ``sparse_grad`` defaults to ``optimizer == "sparse_sgd"``.

    Returns a dict: ``peak`` (bytes), ``breakdown`` (category -> bytes live at the peak; the
    values add up to ``peak``), ``peak_phase``, ``weights``, ``above_weights`` (``peak -
    weights``) for the full training step, the same under ``"fwd_bwd"`` for forward + backward
    without an optimizer, and the derived shapes (``classes_local``, ``sampled_classes``,
    ``global_batch``, ``chunk``).
    """
    if (num_classes is None) == (classes_per_rank is None):
        raise ValueError("plan_memory: give exactly one of num_classes and classes_per_rank")
    for name, value in (("embedding_size", embedding_size), ("world_size", world_size),
                        ("batch_per_rank", batch_per_rank)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"plan_memory: {name} must be a positive int, got {value!r}")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"plan_memory: sample_rate must be in (0, 1], got {sample_rate!r}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"plan_memory: optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"plan_memory: chunk_size must be a positive int or None, got {chunk_size!r}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"plan_memory: device must be 'cpu' or 'cuda', got {device!r}")
    if classes_per_rank is not None:
        if classes_per_rank < 1:
            raise ValueError("plan_memory: classes_per_rank must be >= 1")
        classes_local, num_classes = int(classes_per_rank), int(classes_per_rank) * world_size
    else:
        if num_classes < world_size:
            raise ValueError(f"plan_memory: num_classes ({num_classes}) must be >= world_size ({world_size})")
        if not 0 <= rank < world_size:
            raise ValueError(f"plan_memory: rank must be in [0, {world_size})")
        classes_local = _shard(int(num_classes), world_size, rank)
    dtype = _dtype(dtype)
    mm_dtype = _dtype(mm_dtype, dtype)
    embedding_dtype = _dtype(embedding_dtype, mm_dtype)
    if sparse_grad is None:
        sparse_grad = optimizer == "sparse_sgd"
    if sparse_grad and optimizer in ("sgd", "sgd_momentum", "adamw"):
        # torch.optim.SGD/AdamW (dense) do not take the head's sparse rows in this plan
        raise ValueError(f"plan_memory: sparse_grad=True needs optimizer='sparse_sgd', got {optimizer!r}")
    global_batch = world_size * batch_per_rank
    k = sample_rows(classes_local, sample_rate, global_batch)
    cfg = dict(num_classes=int(num_classes), classes_local=classes_local, sampled_classes=k,
               embedding_size=embedding_size, world_size=world_size, batch_per_rank=batch_per_rank,
               global_batch=global_batch, sample_rate=float(sample_rate), dtype=dtype, mm_dtype=mm_dtype,
               embedding_dtype=embedding_dtype, optimizer=optimizer, chunk_size=chunk_size,
               sparse_grad=bool(sparse_grad), device=device, weight_decay=float(weight_decay))
    weights = classes_local * embedding_size * DTYPE_BYTES[dtype]
    out = dict(cfg)
    out["chunk"] = k if not chunk_size else min(chunk_size, k)
    out["weights"] = weights
    for key, with_opt in (("fwd_bwd", False), ("step", True)):
        t = _simulate(cfg, with_opt)
        breakdown = t.breakdown()
        assert sum(breakdown.values()) == t.peak
        out[key] = dict(peak=t.peak, peak_phase=t.peak_where, breakdown=breakdown,
                        above_weights=t.peak - weights)
    out["peak"] = out["step"]["peak"]
    out["breakdown"] = out["step"]["breakdown"]
    out["peak_phase"] = out["step"]["peak_phase"]
    out["above_weights"] = out["step"]["above_weights"]
    return out


def max_classes(device_memory, reserve=0, **kwargs) -> int:
    """Largest total ``num_classes`` whose per-rank step peak plus ``reserve`` fits in
    ``device_memory`` (bytes or a size string); 0 if not even ``world_size`` classes fit.
    ``kwargs`` are those of :func:`plan_memory` except ``num_classes`` / ``classes_per_rank``."""
    budget = parse_size(device_memory) - parse_size(reserve)
    world = kwargs.get("world_size", 1)
    kwargs.pop("num_classes", None)
    kwargs.pop("classes_per_rank", None)
    kwargs.pop("rank", None)

    def fits(n: int) -> bool:
        return plan_memory(num_classes=n, **kwargs)["peak"] <= budget

    if not fits(world):
        return 0
    lo, hi = world, world * 2
    while fits(hi):
        lo, hi = hi, hi * 2
        if hi > 10**15:
            raise ValueError("max_classes: no bound found (is the plan independent of the classes?)")
    while hi - lo > 1:  # fits(lo) and not fits(hi)
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


# ------------------------------------------------------------------------------------------
_LABELS = {
    "weights": "weights (C x d, param dtype)",
    "gradient": "gradient (grad_w, casts, weight.grad)",
    "optimizer_state": "optimizer state",
    "logits": "logits buffer / chunks (accumulation dtype)",
    "mm_temporaries": "matmul-dtype copies, vecdot product",
    "embeddings": "gathered embeddings, x^, (B, d) grads",
    "sampled_weights": "sampled weight copy + indices",
    "optimizer_temps": "optimizer temporaries",
    "other": "per-class vectors, sampling scores",
}


def format_plan(plan: dict) -> str:
    lines = [
        f"classes {plan['num_classes']:,} over {plan['world_size']} rank(s): C_local = {plan['classes_local']:,}, "
        f"rows per step k = {plan['sampled_classes']:,}, block = {plan['chunk']:,}",
        f"d = {plan['embedding_size']}, global batch B = {plan['global_batch']} "
        f"({plan['batch_per_rank']} per rank), params {plan['dtype']}, matmul {plan['mm_dtype']}, "
        f"embeddings {plan['embedding_dtype']}, optimizer {plan['optimizer']}"
        f"{' (sparse rows)' if plan['sparse_grad'] else ''}, device model {plan['device']}",
        "",
        f"{'per rank, live at the peak':46s} {'fwd+bwd':>12s} {'train step':>12s}",
    ]
    for cat in CATEGORIES:
        a, b = plan["fwd_bwd"]["breakdown"][cat], plan["step"]["breakdown"][cat]
        lines.append(f"  {_LABELS[cat]:44s} {format_bytes(a):>12s} {format_bytes(b):>12s}")
    lines.append(f"  {'peak':44s} {format_bytes(plan['fwd_bwd']['peak']):>12s} {format_bytes(plan['peak']):>12s}")
    lines.append(f"  {'above the weights':44s} {format_bytes(plan['fwd_bwd']['above_weights']):>12s} "
                 f"{format_bytes(plan['above_weights']):>12s}")
    lines.append(f"  peak reached at: fwd+bwd '{plan['fwd_bwd']['peak_phase']}', step '{plan['peak_phase']}'")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m partialfc.plan",
        description="Per-rank memory of a PartialFC training step, and the largest class count that fits "
                    "a device. Derived from what partialfc/softmax.py and head.py allocate.",
        epilog="example: python -m partialfc.plan --classes 10M --world-size 8 --batch-per-rank 128 "
               "--dtype bf16 --sample-rate 0.1 --optimizer sparse_sgd --device-memory 80GiB")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--classes", type=parse_count, default=None,
                   help="total number of classes over all ranks (1000000, 1M, 100k); default 1M")
    g.add_argument("--classes-per-rank", type=parse_count, default=None, help="classes held by each rank")
    p.add_argument("--embedding-size", "-d", type=int, default=512, help="embedding size d (default 512)")
    p.add_argument("--world-size", "-w", type=int, default=1, help="ranks the classes are sharded over")
    p.add_argument("--batch-per-rank", "-b", type=int, default=128, help="samples per rank per step")
    p.add_argument("--sample-rate", "-r", type=float, default=1.0, help="Partial FC sample rate in (0, 1]")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPE_BYTES), help="parameter dtype")
    p.add_argument("--mm-dtype", default=None, choices=sorted(DTYPE_BYTES),
                   help="matrix-product dtype (default: --dtype; e.g. bf16 with fp32 params = autocast)")
    p.add_argument("--embedding-dtype", default=None, choices=sorted(DTYPE_BYTES),
                   help="dtype of the embeddings fed to the head (default: --mm-dtype)")
    p.add_argument("--optimizer", default="sgd_momentum", choices=OPTIMIZERS)
    p.add_argument("--weight-decay", type=float, default=0.0, help="adds the optimizer's grad + wd*p temporary")
    p.add_argument("--chunk-size", type=int, default=None, help="PartialFC chunk_size (default: materialized)")
    sg = p.add_mutually_exclusive_group()
    sg.add_argument("--sparse-grad", dest="sparse_grad", action="store_true", default=None,
                    help="sparse row gradients (default with --optimizer sparse_sgd)")
    sg.add_argument("--dense-grad", dest="sparse_grad", action="store_false")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="memory model: CUDA allocator (default) or CPU resident set size")
    p.add_argument("--device-memory", default=None,
                   help="device memory per rank (80GiB, 40GB, ...): also print the largest class count that fits")
    p.add_argument("--reserve", default="0",
                   help="memory per rank not used by the head (backbone, activations, CUDA context), e.g. 8GiB")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    kwargs = dict(embedding_size=args.embedding_size, world_size=args.world_size,
                  batch_per_rank=args.batch_per_rank, sample_rate=args.sample_rate, dtype=args.dtype,
                  mm_dtype=args.mm_dtype, optimizer=args.optimizer, chunk_size=args.chunk_size,
                  sparse_grad=args.sparse_grad, embedding_dtype=args.embedding_dtype, device=args.device,
                  weight_decay=args.weight_decay)
    try:
        if args.classes_per_rank is not None:
            plan = plan_memory(classes_per_rank=args.classes_per_rank, **kwargs)
        else:
            plan = plan_memory(num_classes=args.classes if args.classes is not None else 1_000_000, **kwargs)
        fit = None
        if args.device_memory is not None:
            fit = max_classes(args.device_memory, reserve=args.reserve, **kwargs)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        if fit is not None:
            plan["max_classes"] = fit
        print(json.dumps(plan, indent=2))
        return 0
    print(format_plan(plan))
    if fit is not None:
        budget = parse_size(args.device_memory) - parse_size(args.reserve)
        print(f"\nlargest class count that fits {format_bytes(budget)} per rank "
              f"({args.device_memory} - reserve {args.reserve}): {fit:,} "
              f"({_shard(fit, args.world_size, 0):,} on rank 0)" if fit else
              f"\nnot even {args.world_size} classes fit in {format_bytes(budget)} per rank")
    return 0


if __name__ == "__main__":
    sys.exit(main())
