"""Capacity planner for :class:`partialfc.PartialFC`: per-rank memory of one training step, measured.

Nothing here models the head. The planner builds the real head on the ``meta`` device, gives it
storage with ``to_empty`` under :class:`~torch._subclasses.fake_tensor.FakeTensorMode` (fake
tensors: shapes, dtypes and devices, no data, nothing allocated), joins a fake process group of
``world_size`` ranks as rank 0 (the heaviest shard: the first ``C % W`` ranks hold one more row)
and runs forward, backward and the optimizer step under
:class:`~torch.distributed._tools.mem_tracker.MemTracker`, which records every tensor the step
creates and frees. A 10M-class shard takes about a second and no host memory; any change of
:mod:`partialfc.head`, :mod:`partialfc.softmax` or the optimizers shows in the next plan.

Usage::

    python -m partialfc.plan --classes 10M --world-size 8 --batch-per-rank 128 \\
        --dtype bf16 --optimizer sparse_sgd --sample-rate 0.1 --device-memory 80GiB

Two scenarios: ``fwd_bwd`` is forward + backward without optimizer state (the previous gradient
freed, as ``zero_grad(set_to_none=True)`` does); ``step`` is the steady-state training step: the
optimizer state exists (one step was taken before), then forward, backward and ``step()``.
What is live at the peak is split by kind (:data:`CATEGORIES`, MemTracker's categories): the
weights (params), the weight gradient (grads; the loss' backward creates it, autograd then hands
it to the parameter), tensors created in forward (activations: the saved logits, the gathered
embeddings, the sampled rows, forward temporaries), tensors created in backward or by the
optimizer step and freed again (temporaries), and the optimizer state.

How the options are realised: ``dtype`` is the parameters' dtype, ``embedding_dtype`` the
embeddings' (default ``mm_dtype``); a ``mm_dtype`` that the embeddings and weights do not give
by type promotion runs the forward under ``torch.autocast`` with that dtype. ``device="cuda"``
(the default) runs on fake CPU tensors with what the code chooses by device type set as on
CUDA: the row slices of :data:`partialfc.softmax.VECDOT_ROWS` and torch's foreach optimizers
(on CUDA their default; fake tensors run in this process on any machine, with or without a GPU).
``device="cpu"`` keeps the CPU choices (for-loop optimizers). ``impl`` is the head's
(``"torch"``, the default, or ``"triton"``: the fused kernels, measured through their custom ops'
fake implementations, so it needs the triton package but no GPU and no interpreter; a real run
with ``impl="auto"`` on CUDA takes the triton path when triton is installed).

Not included (pass them as ``reserve``): the inputs outside the head and the backbone, the CUDA
context, the caching allocator's rounding and fragmentation, collective library buffers, memory a
kernel uses inside itself (e.g. on CPU, ``vector_norm(w, dtype=float32)`` of a bf16 weight
upcasts the whole shard for a moment), and the few bytes of the input validation (the plan runs
the head with ``validate=False, uniform_batch=True``). When the planned sample is smaller than
the global batch, the head reads the number of positives on the host; a fake run cannot, so
the plan takes the worst case (all ``min(B, C_local)`` rows are positives).
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import re
import subprocess
import sys
import time
import weakref
from typing import Optional

import torch

_DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_BYTES = {name: dt.itemsize for name, dt in _DTYPES.items()}
OPTIMIZERS = ("sgd", "sgd_momentum", "sparse_sgd", "adamw")
IMPLS = ("torch", "triton")
CATEGORIES = ("params", "grads", "activations", "temporaries", "optimizer_state", "other")
_DTYPE_ALIASES = {"float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16",
                  "float64": "fp64", "double": "fp64"}

__all__ = ["plan_memory", "max_classes", "parse_size", "parse_count", "format_bytes", "format_plan", "main",
           "CATEGORIES", "OPTIMIZERS"]


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
    """``3145728`` -> ``"3.00 MiB"`` (B, KiB, MiB, GiB)."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def _dtype(name: Optional[str], default: Optional[str] = None) -> str:
    """A dtype name (``"bf16"``, ``"bfloat16"``, ``torch.bfloat16``) -> its short name."""
    if name is None:
        if default is None:
            raise ValueError("dtype missing")
        return default
    key = str(name).lower().replace("torch.", "")
    key = _DTYPE_ALIASES.get(key, key)
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; one of {sorted(_DTYPES)}")
    return key


# ------------------------------------------------------------------------------------------
def _check_ints(**values) -> None:
    """Raise unless every value is a positive int."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"plan_memory: {name} must be a positive int, got {value!r}")


def _check_options(sample_rate, optimizer, chunk_size, device, sparse_grad) -> None:
    """Raise on a value the head, the planner's optimizers or its device models do not take."""
    if not 0 < sample_rate <= 1:
        raise ValueError(f"plan_memory: sample_rate must be in (0, 1], got {sample_rate!r}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"plan_memory: optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if chunk_size is not None:
        _check_ints(chunk_size=chunk_size)
    if device not in ("cpu", "cuda"):
        raise ValueError(f"plan_memory: device must be 'cpu' or 'cuda', got {device!r}")
    if sparse_grad and optimizer != "sparse_sgd":
        # torch.optim.SGD/AdamW (dense) do not take the head's sparse rows
        raise ValueError(f"plan_memory: sparse_grad=True needs optimizer='sparse_sgd', got {optimizer!r}")


def _classes(num_classes, classes_per_rank, world_size, rank) -> int:
    """The total class count (``classes_per_rank`` -> ``W`` equal shards), checked."""
    if (num_classes is None) == (classes_per_rank is None):
        raise ValueError("plan_memory: give exactly one of num_classes and classes_per_rank")
    if classes_per_rank is not None:
        _check_ints(classes_per_rank=classes_per_rank)
        return classes_per_rank * world_size
    _check_ints(num_classes=num_classes)
    if num_classes < world_size:
        raise ValueError(f"plan_memory: num_classes ({num_classes}) must be >= world_size ({world_size})")
    if not 0 <= rank < world_size:
        raise ValueError(f"plan_memory: rank must be in [0, {world_size})")
    return num_classes


def _mm_plan(dtype: str, mm_dtype: str, embedding_dtype: str) -> Optional[str]:
    """The autocast dtype that makes the head multiply in ``mm_dtype`` (None: type promotion does)."""
    if torch.promote_types(_DTYPES[embedding_dtype], _DTYPES[dtype]) == _DTYPES[mm_dtype]:
        return None
    if mm_dtype not in ("bf16", "fp16"):
        raise ValueError(f"plan_memory: mm_dtype {mm_dtype} needs autocast, which takes bf16 or fp16 only "
                         f"(params {dtype}, embeddings {embedding_dtype})")
    return mm_dtype


def plan_memory(num_classes: Optional[int] = None, embedding_size: int = 512, world_size: int = 1,
                batch_per_rank: int = 128, sample_rate: float = 1.0, dtype: str = "fp32",
                mm_dtype: Optional[str] = None, optimizer: str = "sgd_momentum",
                chunk_size: Optional[int] = None, sparse_grad: Optional[bool] = None,
                embedding_dtype: Optional[str] = None, device: str = "cuda", weight_decay: float = 0.0,
                rank: int = 0, classes_per_rank: Optional[int] = None, sub_centers: int = 1,
                impl: str = "torch") -> dict:
    """Per-rank memory of one step of ``PartialFC`` (bytes), measured on fake tensors.

    Give ``num_classes`` (all ranks; ``rank`` 0 holds the largest shard) or ``classes_per_rank``.
    ``dtype`` is the parameters' dtype, ``mm_dtype`` the matrix products' (default ``dtype``;
    another one means autocast), ``embedding_dtype`` the embeddings' (default ``mm_dtype``).
    ``sparse_grad`` defaults to ``optimizer == "sparse_sgd"``. ``sub_centers``: rows per class.
    ``impl``: the head's ``"torch"`` or ``"triton"`` path.

    Returns a dict: ``peak`` (bytes), ``breakdown`` (category -> bytes live at the peak; the
    values add up to ``peak``), ``peak_phase``, ``weights``, ``above_weights`` (``peak -
    weights``) for the full training step, the same under ``"fwd_bwd"`` for forward + backward
    without an optimizer, the shapes (``classes_local``, ``sampled_classes``, ``global_batch``,
    ``chunk``), ``seconds`` (time of the measurement) and ``ops`` (ops it dispatched).
    """
    return _measure(_config(**locals()))


def _config(num_classes, embedding_size, world_size, batch_per_rank, sample_rate, dtype, mm_dtype, optimizer,
            chunk_size, sparse_grad, embedding_dtype, device, weight_decay, rank, classes_per_rank,
            sub_centers=1, impl="torch") -> dict:
    """The checked arguments of :func:`plan_memory` as a JSON-able dict."""
    _check_ints(embedding_size=embedding_size, world_size=world_size, batch_per_rank=batch_per_rank,
                sub_centers=sub_centers)
    if impl not in IMPLS:
        raise ValueError(f"plan_memory: impl must be one of {IMPLS}, got {impl!r}")
    if sparse_grad is None:
        sparse_grad = optimizer == "sparse_sgd"
    _check_options(sample_rate, optimizer, chunk_size, device, sparse_grad)
    num_classes = _classes(num_classes, classes_per_rank, world_size, rank)
    dtype = _dtype(dtype)
    mm_dtype = _dtype(mm_dtype, dtype)
    embedding_dtype = _dtype(embedding_dtype, mm_dtype)
    _mm_plan(dtype, mm_dtype, embedding_dtype)
    return dict(num_classes=int(num_classes), embedding_size=embedding_size, world_size=world_size,
                batch_per_rank=batch_per_rank, global_batch=world_size * batch_per_rank,
                sample_rate=float(sample_rate), dtype=dtype, mm_dtype=mm_dtype, embedding_dtype=embedding_dtype,
                optimizer=optimizer, chunk_size=chunk_size, sparse_grad=bool(sparse_grad), device=device,
                weight_decay=float(weight_decay), rank=0 if classes_per_rank is not None else int(rank),
                sub_centers=sub_centers, impl=impl)


# ------------------------------------------------------------------------------------------
def _measure(cfg: dict) -> dict:
    """The plan of one checked configuration: measured in this process, or in a fresh one when
    ``torch.distributed`` is initialised here (the fake process group must not replace it)."""
    if _distributed_here():
        return _in_fresh_process("_measure", cfg=cfg)
    with _fake_world(cfg["world_size"], cfg["rank"]):
        return _plan_one(cfg)


def _distributed_here() -> bool:
    """Whether this process has a ``torch.distributed`` default group."""
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def _fake_world(world_size: int, rank: int):
    """A fake default process group (collectives on fake tensors move nothing) for the block."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _in_fresh_process(name: str, **kwargs):
    """``name(**kwargs)`` of this module (JSON in and out) in a fresh interpreter that imports this
    same copy of ``partialfc`` and is no rank of the caller's job."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "TORCHELASTIC_RUN_ID"):
        env.pop(key, None)
    code = ("import json, sys; from partialfc import plan; name, kw = json.load(sys.stdin); "
            "print(json.dumps(getattr(plan, name)(**kw)))")
    out = subprocess.run([sys.executable, "-c", code], input=json.dumps([name, kwargs]), env=env,
                         capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"partialfc.plan: the measuring subprocess failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------
def _plan_one(cfg: dict) -> dict:
    """Measure one configuration; the worst-case sample when the head would read it on the host."""
    from torch._subclasses.fake_tensor import DataDependentOutputException
    start = time.perf_counter()
    try:
        run = _fake_run(cfg, cfg["sample_rate"])
    except DataDependentOutputException:
        rate = _worst_case_rate(cfg)
        if rate is None:
            raise
        run = _fake_run(cfg, rate)
    return _result(cfg, run, time.perf_counter() - start)


def _worst_case_rate(cfg: dict) -> Optional[float]:
    """A sample rate whose planned sample holds ``min(B, C_local)`` rows: the largest the head
    can draw when every row of the global batch has a different positive class of this shard.
    None when sampling is off (then the host read has another cause)."""
    from .partition import shard_bounds
    from .sampling import planned_sample_size
    if cfg["sample_rate"] >= 1.0:
        return None
    start, end = shard_bounds(cfg["num_classes"], cfg["world_size"], cfg["rank"])
    rows = min(cfg["global_batch"], end - start)
    rate = rows / (end - start)
    while planned_sample_size(end - start, rate) > rows:  # float rounding of rate * C
        rate = rate * (1 - 1e-12)
    return rate


def _fake_run(cfg: dict, sample_rate: float) -> dict:
    """Build the head and its optimizer on fake tensors; measure forward + backward (first step,
    no optimizer state), then a whole step of the steady state."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    head = _meta_head(cfg, sample_rate)
    with _device_settings(cfg["device"]), FakeTensorMode(allow_non_fake_inputs=True):
        head.to_empty(device="cpu")  # fake storage: nothing is allocated
        head.reset_parameters()  # no data to fill: a no-op on fake (and meta) weights
        x = torch.randn(cfg["batch_per_rank"], cfg["embedding_size"], dtype=_DTYPES[cfg["embedding_dtype"]],
                        requires_grad=True)
        labels = torch.randint(0, cfg["num_classes"], (cfg["batch_per_rank"],))
        opt = _optimizer(cfg, head)
        out = {"fwd_bwd": _scenario(cfg, head, x, labels, None)}
        out["ops"] = _first_step(opt, x)
        out["step"] = _scenario(cfg, head, x, labels, opt)
        out["classes_local"] = head.num_local
        out["sampled_classes"] = head.num_local if head.sampled_index is None else head.sampled_index.shape[0]
        return out


def _meta_head(cfg: dict, sample_rate: float):
    """The real head of ``cfg`` on the ``meta`` device, as large models are built (in the fake
    process group: rank ``cfg["rank"]`` of ``world_size``)."""
    from .head import PartialFC
    return PartialFC(cfg["embedding_size"], cfg["num_classes"], sample_rate=sample_rate,
                     chunk_size=cfg["chunk_size"], sparse_grad=cfg["sparse_grad"], validate=False,
                     uniform_batch=True, sub_centers=cfg.get("sub_centers", 1), device="meta",
                     dtype=_DTYPES[cfg["dtype"]], impl=cfg.get("impl", "torch"))


@contextlib.contextmanager
def _device_settings(device: str):
    """Fake tensors run on the CPU device; for the CUDA model, what the head looks up by device
    type is set to its CUDA entry for the block (:data:`partialfc.softmax.VECDOT_ROWS`)."""
    from unittest import mock
    from . import softmax
    if device == "cpu":
        yield
        return
    cuda_rows = softmax.VECDOT_ROWS.get("cuda", softmax.VECDOT_ROWS_DEFAULT)
    with mock.patch.dict(softmax.VECDOT_ROWS, {"cpu": cuda_rows}):
        yield


def _optimizer(cfg: dict, head):
    """The optimizer of ``cfg``: foreach implementations for the CUDA model (torch's default on
    CUDA tensors), for-loop ones for the CPU model (its default there)."""
    from .optim import SparseSGD
    params, wd, opt = [head.weight], cfg["weight_decay"], cfg["optimizer"]
    foreach = cfg["device"] == "cuda"
    if opt == "sparse_sgd":
        return SparseSGD(params, lr=0.1, momentum=0.9, weight_decay=wd)
    if opt == "adamw":
        return torch.optim.AdamW(params, lr=1e-3, weight_decay=wd, foreach=foreach)
    momentum = 0.9 if opt == "sgd_momentum" else 0.0
    return torch.optim.SGD(params, lr=0.1, momentum=momentum, weight_decay=wd, foreach=foreach)


def _forward(cfg: dict, head, x, labels):
    """``head(x, labels)``, under autocast when the requested matmul dtype needs it."""
    amp = _mm_plan(cfg["dtype"], cfg["mm_dtype"], cfg["embedding_dtype"])
    if amp is None:
        return head(x, labels)
    with torch.autocast("cpu", dtype=_DTYPES[amp]):
        return head(x, labels)


def _first_step(opt, x) -> int:
    """The optimizer step after the first backward, not counted: it makes the optimizer state of
    the steady state; then the gradients are dropped (under a tracker all the same: it corrects
    fake sparse tensors)."""
    with _new_tracker() as tracker:
        opt.step()
    opt.zero_grad(set_to_none=True)
    x.grad = None
    return tracker.ops


# ------------------------------------------------------------------------------------------
def _new_tracker():
    """A new peak tracker (its class is made on first use: MemTracker's import takes seconds)."""
    global _PeakTracker
    if _PeakTracker is None:
        _PeakTracker = _make_tracker_class()
    return _PeakTracker()


_PeakTracker = None


def _make_tracker_class():
    """:class:`MemTracker` with what the plan needs (see the class doc)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    class PeakTracker(MemTracker):
        """MemTracker that remembers the storages live at the peak, so that each is counted under
        the kind it ends up as (:func:`_breakdown`); that runs ops as a run without a dispatch
        mode would (:func:`_as_in_a_plain_run`); and that counts a sparse tensor by its index and
        value tensors."""

        def __init__(self):
            super().__init__()
            self.peak_live, self.peak_op, self._op, self._fresh, self.ops = [], "", "", None, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            """Track ``func``'s outputs; remember the output of a ``zeros`` for the next op."""
            func = _as_in_a_plain_run(func, args, self._fresh)
            self._op, self.ops = getattr(func, "__name__", str(func)), self.ops + 1
            out = super().__torch_dispatch__(func, types, args, kwargs)
            self._fresh = weakref.ref(out) if func in _FRESH_ZEROS else None
            return out

        def _update_peak_stats(self, peak_state) -> None:
            """On a new peak, also keep ``(info, storage ref, bytes)`` of every live storage."""
            before = self.peak_total()
            super()._update_peak_stats(peak_state)
            if self.peak_total() > before:
                self.peak_live = [(w, ref, w.mem_consumed) for w, ref in self._WINFO.values()]
                self.peak_op = self._op

        def _track(self, reftype, t) -> None:
            """Track ``t``'s storages (a sparse tensor's: those of its indices and values)."""
            for part in _dense_parts(t):
                super()._track(reftype, part)

        def _update_and_maybe_create_winfos(self, t, reftype, update_existing=False):
            """As MemTracker's, through a sparse tensor's indices and values."""
            parent = super(PeakTracker, self)._update_and_maybe_create_winfos
            return set().union(*(parent(p, reftype, update_existing) for p in _dense_parts(t)))

        def peak_total(self) -> int:
            """Bytes live at the peak so far."""
            return sum(self._peak_mem.values())

        def breakdown(self) -> dict:
            """:data:`CATEGORIES` -> bytes live at the peak."""
            return _breakdown(self.peak_live, self.peak_total())

    return PeakTracker


def _breakdown(peak_live, total: int) -> dict:
    """What was live at the peak, by the kind each storage has now: MemTracker's categories,
    except that an optimizer tensor which is gone after the step was one of its temporaries."""
    from torch.distributed._tools.mem_tracker import _MemRefType as Ref
    kinds = {Ref.PARAM: "params", Ref.BUFFER: "other", Ref.GRAD: "grads", Ref.ACT: "activations",
             Ref.TEMP: "temporaries", Ref.OTH: "other"}
    out = dict.fromkeys(CATEGORIES, 0)
    for winfo, ref, nbytes in peak_live:
        if winfo.reftype == Ref.OPT:
            out["optimizer_state" if ref() is not None else "temporaries"] += nbytes
        else:
            out[kinds[winfo.reftype]] += nbytes
    assert sum(out.values()) == total, (out, total)
    return out


def _dense_parts(t: torch.Tensor) -> list:
    """The tensors that hold ``t``'s memory: itself, or a sparse COO tensor's indices and values."""
    return [t._indices(), t._values()] if t.is_sparse else [t]


def _sparse_clone(t: torch.Tensor, **_kwargs) -> torch.Tensor:
    """``t.clone()`` of a sparse COO tensor: fake kernels drop the entries, this keeps them."""
    return torch.sparse_coo_tensor(t._indices().clone(), t._values().clone(), t.shape,
                                   is_coalesced=t.is_coalesced(), check_invariants=False)


def _sparse_coalesce(t: torch.Tensor) -> torch.Tensor:
    """``t.coalesce()`` of a sparse COO tensor without duplicate rows (the head's rows are distinct):
    fake kernels cannot know how many rows stay and keep none; the real kernel keeps all."""
    return torch.sparse_coo_tensor(t._indices().clone(), t._values().clone(), t.shape, is_coalesced=True,
                                   check_invariants=False)


def _index_add_in_place(t: torch.Tensor, dim, index, source, *, alpha=1) -> torch.Tensor:
    """``index_add`` on a buffer just made by ``new_zeros``, done in place as without a mode."""
    return t.index_add_(dim, index, source, alpha=alpha)


def _as_in_a_plain_run(func, args, fresh):
    """The op a run without a dispatch mode would run for ``func``. Two differences of a fake run:
    fake kernels keep no entries of a sparse tensor they clone or coalesce, and while a dispatch
    mode is active autograd formulas take functional variants (``index_select``'s backward
    ``new_zeros(...).index_add(...)``, in place without a mode)."""
    if func in _SPARSE_FIXES and isinstance(args[0], torch.Tensor) and args[0].is_sparse:
        return _SPARSE_FIXES[func]
    if func is torch.ops.aten.index_add.default and fresh is not None and args[0] is fresh():
        return _index_add_in_place
    return func


_FRESH_ZEROS = (torch.ops.aten.new_zeros.default, torch.ops.aten.zeros.default)
_SPARSE_FIXES = {torch.ops.aten.clone.default: _sparse_clone, torch.ops.aten._coalesce.default: _sparse_coalesce,
                 torch.ops.aten.coalesce.default: _sparse_coalesce}


def _scenario(cfg: dict, head, x, labels, opt) -> dict:
    """Track forward, backward (and ``opt.step()``): peak, phase and what is live at the peak."""
    tracker = _new_tracker()
    tracker.track_external(head, *([opt] if opt is not None else []))
    phases = []
    with tracker:
        loss = _forward(cfg, head, x, labels)
        phases.append(("forward", tracker.peak_total()))
        loss.backward()
        phases.append(("backward", tracker.peak_total()))
        if opt is not None:
            opt.step()
            phases.append(("optimizer step", tracker.peak_total()))
    del loss
    breakdown = tracker.breakdown()  # an optimizer tensor that is gone now was a temporary
    phase = next(name for name, total in phases if total == tracker.peak_total())
    return dict(peak=tracker.peak_total(), peak_phase=f"{phase} ({tracker.peak_op})", breakdown=breakdown,
                ops=tracker.ops)


def _result(cfg: dict, run: dict, seconds: float) -> dict:
    """The plan dict of :func:`plan_memory` from a fake run."""
    out, k = dict(cfg), run["sampled_classes"]
    weights = run["step"]["breakdown"]["params"]
    out.update(classes_local=run["classes_local"], sampled_classes=k, weights=weights,
               chunk=k if not cfg["chunk_size"] else min(cfg["chunk_size"], k), seconds=round(seconds, 3),
               ops=run["ops"] + run["fwd_bwd"].pop("ops") + run["step"].pop("ops"))
    for key in ("fwd_bwd", "step"):
        out[key] = dict(run[key], above_weights=run[key]["peak"] - weights)
    out.update({key: out["step"][key] for key in ("peak", "breakdown", "peak_phase", "above_weights")})
    return out


# ------------------------------------------------------------------------------------------
_VERIFY_OPS = 60_000  # max_classes measures a size only when its run dispatches fewer ops (0.2-0.4 ms each)


def max_classes(device_memory, reserve=0, details: bool = False, **kwargs):
    """Largest total ``num_classes`` whose per-rank step peak plus ``reserve`` fits in
    ``device_memory`` (bytes or a size string); 0 if not even ``world_size`` classes fit.
    ``kwargs`` are those of :func:`plan_memory` except ``num_classes`` / ``classes_per_rank``.

    The peak is affine in the classes per rank: measured at two sizes, solved, and the answer
    checked by measuring it and one more class per rank (secant and bisection steps until the
    answer fits and the next does not). A size whose run would dispatch more than
    :data:`_VERIFY_OPS` ops (a chunked head runs its blocks one by one: 10-20 s) is not measured:
    the answer is then the affine solution. ``details=True`` returns a dict: ``max_classes``,
    ``classes_per_rank``, ``verified`` and the ``measured`` ``[classes per rank, peak]`` pairs.
    """
    budget = parse_size(device_memory) - parse_size(reserve)
    for key in ("num_classes", "classes_per_rank", "rank"):
        kwargs.pop(key, None)
    defaults = {k: p.default for k, p in inspect.signature(plan_memory).parameters.items()}
    cfg = _config(**{**defaults, **kwargs, "num_classes": None, "classes_per_rank": 1})
    out = _in_fresh_process("_fit", cfg=cfg, budget=budget) if _distributed_here() else _fit(cfg, budget)
    return out if details else out["max_classes"]


def _fit(cfg: dict, budget: int) -> dict:
    """:func:`max_classes` for a checked configuration, in one fake process group."""
    runs = {}  # classes per rank -> (step peak, ops dispatched)

    def peak(c: int) -> int:
        """The step peak with ``c`` classes per rank (each size measured once)."""
        if c not in runs:
            plan = _plan_one(dict(cfg, num_classes=c * cfg["world_size"]))
            runs[c] = (plan["peak"], plan["ops"])
        return runs[c][0]

    with _fake_world(cfg["world_size"], 0):
        c, verified = _largest_fitting(peak, budget, _start_sizes(cfg), lambda c: _ops(runs, c))
    return dict(max_classes=c * cfg["world_size"], classes_per_rank=c, verified=verified,
                measured=sorted([c, p] for c, (p, _) in runs.items()))


def _start_sizes(cfg: dict) -> tuple[int, int]:
    """Two classes-per-rank sizes to start from: large enough to be in the affine regime of a
    materialized head (65 536 rows), a few blocks of a chunked one (its runs cost per block)."""
    a = 2 ** 16 if not cfg["chunk_size"] else max(2 ** 10, min(2 ** 16, 8 * cfg["chunk_size"]))
    return a, 2 * a


def _ops(runs: dict, c: int) -> float:
    """Ops a run at ``c`` classes per rank would dispatch: affine through the two largest runs."""
    (c1, (_, n1)), (c2, (_, n2)) = sorted(runs.items())[-2:]
    return n2 + max(0.0, (n2 - n1) / (c2 - c1)) * (c - c2)


def _largest_fitting(peak, budget: int, sizes, cost) -> tuple[int, bool]:
    """``(c, verified)``: the largest ``c >= 0`` with ``peak(c) <= budget`` for a nondecreasing,
    nearly affine ``peak``. Keeps ``lo`` (fits; 0 trivially) and ``hi`` (does not) and measures
    inside them: secant guesses, bisection after a few; done when ``hi == lo + 1``. Stops with the
    guess, unverified, when ``cost(guess)`` exceeds :data:`_VERIFY_OPS`."""
    lo, hi, points = 0, None, []
    for c in sizes:
        points.append((c, peak(c)))
        lo, hi = _bracket(lo, hi, c, points[-1][1] <= budget)
    while hi is None or hi - lo > 1:
        c = _guess(points, budget, lo, hi, bisect=len(points) > 8)
        if cost(c) > _VERIFY_OPS:
            return c, False
        points.append((c, peak(c)))
        lo, hi = _bracket(lo, hi, c, points[-1][1] <= budget)
    return lo, True


def _bracket(lo: int, hi: Optional[int], c: int, fits: bool) -> tuple[int, Optional[int]]:
    """``(lo, hi)`` narrowed by a measured size ``c`` that fits or not."""
    if fits:
        return max(lo, c), hi
    return lo, c if hi is None else min(hi, c)


def _guess(points, budget: int, lo: int, hi: Optional[int], bisect: bool) -> int:
    """Next size to measure, strictly between ``lo`` and ``hi``: where the line through the last
    two points meets ``budget`` (or the middle, or twice ``lo`` without ``hi``)."""
    (a, pa), (b, pb) = points[-2:]
    if bisect or pa == pb or a == b:
        c = (lo + hi) // 2 if hi is not None else 2 * max(lo, 1)
    else:
        c = a + (budget - pa) * (b - a) // (pb - pa)
    if c > 10 ** 12:
        raise ValueError("max_classes: no bound found (is the plan independent of the classes?)")
    c = max(c, lo + 1)
    return c if hi is None else min(c, hi - 1)


# ------------------------------------------------------------------------------------------
_LABELS = {
    "params": "params: the weight shard (C x d)",
    "grads": "grads: the weight gradient",
    "activations": "activations: made in forward (logits, x^, copies)",
    "temporaries": "temporaries: made in backward / optimizer step",
    "optimizer_state": "optimizer state",
    "other": "other",
}


def format_plan(plan: dict) -> str:
    """The plan as a table of what is live at the peak, per scenario."""
    lines = [
        f"classes {plan['num_classes']:,} over {plan['world_size']} rank(s): C_local = {plan['classes_local']:,}, "
        f"classes per step k = {plan['sampled_classes']:,}, block = {plan['chunk']:,}"
        + (f", {plan['sub_centers']} sub-centers (rows) per class" if plan.get("sub_centers", 1) > 1 else ""),
        f"d = {plan['embedding_size']}, global batch B = {plan['global_batch']} "
        f"({plan['batch_per_rank']} per rank), params {plan['dtype']}, matmul {plan['mm_dtype']}, "
        f"embeddings {plan['embedding_dtype']}, optimizer {plan['optimizer']}"
        f"{' (sparse rows)' if plan['sparse_grad'] else ''}, device model {plan['device']}"
        + (f", impl {plan['impl']}" if plan.get("impl", "torch") != "torch" else ""),
        f"measured on fake tensors in {plan['seconds']:.1f} s (the real head, rank 0, fake process group)",
        "",
        f"{'per rank, live at the peak':52s} {'fwd+bwd':>12s} {'train step':>12s}",
    ]
    for cat in CATEGORIES:
        a, b = plan["fwd_bwd"]["breakdown"][cat], plan["step"]["breakdown"][cat]
        lines.append(f"  {_LABELS[cat]:50s} {format_bytes(a):>12s} {format_bytes(b):>12s}")
    lines.append(f"  {'peak':50s} {format_bytes(plan['fwd_bwd']['peak']):>12s} {format_bytes(plan['peak']):>12s}")
    lines.append(f"  {'above the weights':50s} {format_bytes(plan['fwd_bwd']['above_weights']):>12s} "
                 f"{format_bytes(plan['above_weights']):>12s}")
    lines.append(f"  peak reached in: fwd+bwd {plan['fwd_bwd']['peak_phase']}, step {plan['peak_phase']}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m partialfc.plan``."""
    p = argparse.ArgumentParser(
        prog="python -m partialfc.plan",
        description="Per-rank memory of a PartialFC training step, and the largest class count that fits "
                    "a device. Measured by running the real head on fake tensors (no memory allocated).",
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
    _add_type_options(p)
    p.add_argument("--device-memory", default=None,
                   help="device memory per rank (80GiB, 40GB, ...): also print the largest class count that fits")
    p.add_argument("--reserve", default="0",
                   help="memory per rank not used by the head (backbone, activations, CUDA context), e.g. 8GiB")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    return p


def _add_type_options(p: argparse.ArgumentParser) -> None:
    """The options that say how the head and its optimizer are set up."""
    p.add_argument("--dtype", default="fp32", choices=sorted(_DTYPES), help="parameter dtype")
    p.add_argument("--mm-dtype", default=None, choices=sorted(_DTYPES),
                   help="matrix-product dtype (default: --dtype; e.g. bf16 with fp32 params = autocast)")
    p.add_argument("--embedding-dtype", default=None, choices=sorted(_DTYPES),
                   help="dtype of the embeddings fed to the head (default: --mm-dtype)")
    p.add_argument("--optimizer", default="sgd_momentum", choices=OPTIMIZERS)
    p.add_argument("--weight-decay", type=float, default=0.0, help="the optimizer's weight decay")
    p.add_argument("--chunk-size", type=int, default=None, help="PartialFC chunk_size (default: materialized)")
    p.add_argument("--sub-centers", type=int, default=1, help="rows per class (sub-center ArcFace; default 1)")
    p.add_argument("--impl", default="torch", choices=IMPLS,
                   help="the head's path: torch (default) or triton (fused kernels, never forms B x C_local)")
    sg = p.add_mutually_exclusive_group()
    sg.add_argument("--sparse-grad", dest="sparse_grad", action="store_true", default=None,
                    help="sparse row gradients (default with --optimizer sparse_sgd)")
    sg.add_argument("--dense-grad", dest="sparse_grad", action="store_false")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="device model: CUDA (default: its row slices and foreach optimizers) or CPU")


def main(argv=None) -> int:
    """``python -m partialfc.plan``: print the plan (and the largest class count that fits)."""
    args = build_parser().parse_args(argv)
    kwargs = dict(embedding_size=args.embedding_size, world_size=args.world_size,
                  batch_per_rank=args.batch_per_rank, sample_rate=args.sample_rate, dtype=args.dtype,
                  mm_dtype=args.mm_dtype, optimizer=args.optimizer, chunk_size=args.chunk_size,
                  sparse_grad=args.sparse_grad, embedding_dtype=args.embedding_dtype, device=args.device,
                  weight_decay=args.weight_decay, sub_centers=args.sub_centers, impl=args.impl)
    try:
        if args.classes_per_rank is not None:
            plan = plan_memory(classes_per_rank=args.classes_per_rank, **kwargs)
        else:
            plan = plan_memory(num_classes=args.classes if args.classes is not None else 1_000_000, **kwargs)
        fit = None
        if args.device_memory is not None:
            fit = max_classes(args.device_memory, reserve=args.reserve, details=True, **kwargs)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _print(args, plan, fit)
    return 0


def _print(args, plan: dict, fit: Optional[dict]) -> None:
    """The CLI's output: JSON, or the table and the largest class count that fits."""
    if args.json:
        if fit is not None:
            plan["max_classes"], plan["max_classes_verified"] = fit["max_classes"], fit["verified"]
        print(json.dumps(plan, indent=2))
        return
    print(format_plan(plan))
    if fit is None:
        return
    budget = parse_size(args.device_memory) - parse_size(args.reserve)
    if not fit["max_classes"]:
        print(f"\nnot even {args.world_size} classes fit in {format_bytes(budget)} per rank")
        return
    how = ("measured there and one class per rank more" if fit["verified"] else
           "solved from the runs at " + ", ".join(f"{c:,}" for c, _ in fit["measured"]) + " classes per rank "
           "(a run at the answer would take too long)")
    print(f"\nlargest class count that fits {format_bytes(budget)} per rank ({args.device_memory} - reserve "
          f"{args.reserve}): {fit['max_classes']:,} ({fit['classes_per_rank']:,} per rank; {how})")


if __name__ == "__main__":
    sys.exit(main())
