"""``PartialFC``: the model-parallel margin-softmax head. Owns one shard of the class weights.

Data flow of one step on rank r (B_r local samples, B = sum of B_r over the group):

    1. validation + batch sizes: one all-gather of a few integers per rank, read on the host
       (skipped with ``validate=False, uniform_batch=True``: then nothing syncs with the host)
    2. x_local (B_r, d), labels (B_r,) --all-gather--> x_global (B, d), labels_global (B,)
    3. optional Partial FC sampling of this shard's classes (positives + random negatives)
    4. margin softmax cross-entropy over all (sampled) classes of all ranks:
       all-reduce MAX (B,) + all-reduce SUM (4, B)
    backward: no collective in the loss; reduce-scatter of the embedding gradient (B, d).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import state as _state
from .collectives import (ProcessGroup, all_gather_rows, dtype_code, dtype_from_code, gather_embeddings,
                          group_rank, group_size, is_distributed)
from .grad_filter import DEFAULT_BLOCK, GradFilterStats, SelectRowsKept
from .init import DEFAULT_STD, init_weight_rows_
from .margin import CombinedMargin
from .partition import shard_bounds
from .sampling import sample_classes, step_seed
from .softmax import margin_softmax_cross_entropy
from .triton_softmax import check_impl, triton_margin_softmax_cross_entropy, use_triton
from .wrapping import check_not_replicated_by_ddp

# codes of the per-rank validation record [batch, code, a, b, embedding dtype, grad mode, needs grad]
_OK, _EMB_NDIM, _EMB_WIDTH, _EMB_DTYPE, _LAB_NDIM, _LAB_DTYPE, _LENGTH, _LABEL_RANGE, _NONFINITE = range(9)
_RECORD = 7


@dataclass(frozen=True)
class HeadStats:
    """Per-row statistics of one forward over the global batch (B_global,), identical on every rank.

    ``max_logit``: the largest logit of the row over all classes; ``target_logit``: ``s * psi``;
    ``target_cos``: cos theta_y; ``valid``: rows that count (label != ignore_index).
    ``grad_filter``: with ``PartialFC(grad_filter=...)``, the step's
    :class:`partialfc.grad_filter.GradFilterStats` (skipped blocks, bounds on the dropped gradient);
    it is filled in by the backward of this forward (``grad_filter.ready``), else None.
    """

    max_logit: torch.Tensor
    target_logit: torch.Tensor
    target_cos: torch.Tensor
    valid: torch.Tensor
    grad_filter: Optional[GradFilterStats] = None

    @property
    def global_batch(self) -> int:
        return self.valid.numel()

    def accuracy(self) -> torch.Tensor:
        """Share of valid rows whose target logit is the largest (a device scalar, NaN if none)."""
        correct = (self.target_logit >= self.max_logit)[self.valid]
        return correct.float().mean() if correct.numel() else torch.tensor(float("nan"))

    def target_angles(self) -> torch.Tensor:
        """theta_y of the valid rows (radians)."""
        return torch.acos(self.target_cos[self.valid].clamp(-1, 1))


class _DetachedGroup:
    """Stands for an explicit process group that could not be pickled with the head."""

    def __init__(self, ranks):
        self.ranks = ranks

    def __repr__(self):
        return f"<process group of ranks {self.ranks}, not restored>"


class PartialFC(nn.Module):
    """Sharded ``s * (cos(m1 theta + m2) - m3)`` softmax cross-entropy over ``num_classes`` classes.

    Args:
        embedding_size: width ``d`` of the embeddings.
        num_classes: total number of classes over all ranks of ``group``.
        margin: a :class:`CombinedMargin` (default: ArcFace, s=64, m=0.5), or a per-row margin module
            such as :class:`partialfc.AdaFace` (its running statistics are buffers of the head).
        sample_rate: share of each shard's classes used per step (Partial FC); 1.0 = all.
        group: process group the classes are sharded over; ``None`` = the default group when
            ``torch.distributed`` is initialised, else a single rank (a plain one-device head).
        ignore_index: label value that marks a sample excluded from the loss.
        chunk_size: if set, logits are formed ``chunk_size`` classes at a time and recomputed in
            backward: memory O(B x chunk_size) instead of O(B x C_local), same result.
        sparse_grad: with sampling, ``weight.grad`` is a sparse COO tensor of the sampled rows
            (for ``torch.optim.SparseAdam`` / :class:`partialfc.optim.SparseSGD`).
        seed: seeds the weight initialisation (by global class id: the same full matrix for
            any world size) and the class sampling.
        validate: check inputs every step (one small all-gather and a host sync); the same clear
            error is raised on every rank. Turn off for the fastest steps once the data is trusted.
        uniform_batch: promise that every rank passes the same batch size every step; with
            ``validate=False`` this removes the last host sync.
        embedding_grad_scale: factor on the embeddings' gradient; default the group size.
        sub_centers: ``k`` rows per class (sub-center ArcFace, with any margin): class ``c`` owns rows
            ``c*k ... c*k + k - 1`` of the weight (all on one rank); a class's cosine is the largest of
            its rows', the margin applies to it and its gradient goes to that row only. Sampling picks
            classes (all k rows of each). See :mod:`partialfc.subcenter` for the cleaning step.
        grad_filter: certified gradient filtering (:mod:`partialfc.grad_filter`); ``None`` (default) =
            exact gradients. ``eps`` (a float >= 0) or ``True`` (eps = the accumulation dtype's machine
            epsilon, 1.19e-7 in float32): the loss and forward stay exact; in backward the blocks of
            ``grad_filter_block`` classes whose softmax-gradient entries ``p_ij f_ij`` (in units of the
            row's gradient scale s/N, target entries aside) are all below eps are skipped in both products
            (target entries are still applied exactly). ``head.last_filter_stats`` (and
            ``HeadStats.grad_filter`` with ``return_stats=True``) says what was skipped; with
            ``return_stats=True`` it also bounds the dropped gradient. ``eps=0`` gives the exact gradients
            bit for bit. With ``sparse_grad=True`` the weight gradient holds only the kept rows.
        grad_filter_block: classes per block of ``grad_filter`` (default 256).
        impl: ``"torch"`` (the reference path above), ``"triton"`` (fused Triton kernels that never form
            the (B, C_local) logits: :mod:`partialfc.triton_softmax`; needs ``pip install "partialfc[triton]"``,
            CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``; sub-centers and CurricularFace run
            fused, ``grad_filter`` runs the torch path with a warning) or ``"auto"`` (default: triton on CUDA
            when triton is installed, else torch). Same loss, gradients and collectives.

    Returns ``loss``: the mean over the global batch (all ranks, ``ignore_index`` rows excluded)
    of the cross-entropy over all classes, identical on every rank (0 if no row counts).

    Gradient convention: ``weight.grad`` is the exact gradient of that loss w.r.t. this rank's
    shard. ``embeddings.grad`` is ``group size`` times the exact gradient w.r.t. the local
    embeddings, so that DDP's gradient *averaging* over the same ranks hands the backbone the
    exact gradient.

    Wrappers: a model containing heads can be wrapped whole in DDP (also through Lightning or
    ``accelerator.prepare``): the heads' rows are kept out of DDP's broadcast and gradient averaging
    automatically (see :mod:`partialfc.wrapping`). FSDP2 needs ``fully_shard(model,
    ignored_params=partialfc.head_parameters(model))``; forgetting it is a clear error.
    ``torch.compile`` runs the head eagerly (a graph break around it, no recompilation).

    ``state_dict()`` says which rows it holds; loading rows of other classes is an error, while a
    state dict holding all ``num_classes`` rows (see :func:`partialfc.consolidate_state_dict`)
    loads on any number of ranks.
    """

    def __init__(self, embedding_size: int, num_classes: int, margin: Optional[CombinedMargin] = None,
                 sample_rate: float = 1.0, group: ProcessGroup = None, ignore_index: int = -100,
                 chunk_size: Optional[int] = None, sparse_grad: bool = False, seed: int = 0,
                 validate: bool = True, uniform_batch: bool = False,
                 embedding_grad_scale: Optional[float] = None, init_std: float = DEFAULT_STD,
                 sub_centers: int = 1, device=None, dtype: Optional[torch.dtype] = None,
                 grad_filter: Union[None, bool, float] = None, grad_filter_block: int = DEFAULT_BLOCK,
                 impl: str = "auto"):
        super().__init__()
        for name, value in (("embedding_size", embedding_size), ("num_classes", num_classes),
                            ("sub_centers", sub_centers)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"PartialFC: {name} must be a positive int, got {value!r}")
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, float)) or not 0 < sample_rate <= 1:
            raise ValueError(f"PartialFC: sample_rate must be in (0, 1], got {sample_rate!r}")
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"PartialFC: chunk_size must be a positive int or None, got {chunk_size!r}")
        if grad_filter is False:
            grad_filter = None
        if grad_filter is not None and grad_filter is not True and (
                not isinstance(grad_filter, (int, float)) or not 0 <= grad_filter < float("inf")):
            raise ValueError(f"PartialFC: grad_filter must be None, True or a finite eps >= 0, got {grad_filter!r}")
        if isinstance(grad_filter_block, bool) or not isinstance(grad_filter_block, int) or grad_filter_block < 1:
            raise ValueError(f"PartialFC: grad_filter_block must be a positive int, got {grad_filter_block!r}")
        self.impl = check_impl(impl)
        if margin is None:
            margin = CombinedMargin.arcface()
        if not isinstance(margin, CombinedMargin) and not callable(getattr(margin, "for_batch", None)):
            raise TypeError("PartialFC: margin must be a CombinedMargin or a per-row margin module with "
                            f"for_batch(x_global, valid) (e.g. AdaFace), got {type(margin).__name__}")
        self.embedding_size, self.num_classes = embedding_size, num_classes
        self.margin, self.sample_rate, self.group = margin, float(sample_rate), group
        self.ignore_index, self.chunk_size, self.sparse_grad = int(ignore_index), chunk_size, bool(sparse_grad)
        self.seed, self.validate, self.uniform_batch = int(seed), bool(validate), bool(uniform_batch)
        self.world_size, self.rank = group_size(group), group_rank(group)
        self.embedding_grad_scale = float(self.world_size if embedding_grad_scale is None else embedding_grad_scale)
        self.class_start, self.class_end = shard_bounds(num_classes, self.world_size, self.rank)
        self.num_local = self.class_end - self.class_start
        self.sub_centers = sub_centers
        self.num_rows, self.row_start = self.num_local * sub_centers, self.class_start * sub_centers
        self.weight = nn.Parameter(torch.empty(self.num_rows, embedding_size, device=device, dtype=dtype))
        self.weight._ddp_ignored = True  # DDP's own marker: no mixed-precision copy, no bucket
        self.init_std = init_std
        self.reset_parameters()
        self.step = 0  # forward calls so far; seeds the sampling, saved in state_dict
        self.sampled_index: Optional[torch.Tensor] = None
        self.grad_filter = None if grad_filter is None else (True if grad_filter is True else float(grad_filter))
        self.grad_filter_block = grad_filter_block
        self.last_filter_stats: Optional[GradFilterStats] = None  # the latest forward's, filled by its backward

    def _apply(self, fn, recurse=True):
        module = super()._apply(fn, recurse)
        self.weight._ddp_ignored = True  # to_empty() from meta makes a new Parameter
        return module

    def reset_parameters(self) -> None:
        init_weight_rows_(self.weight, self.row_start, self.seed, self.init_std)  # by global row id

    def extra_repr(self) -> str:
        return (f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
                f"shard=[{self.class_start}, {self.class_end}) of rank {self.rank}/{self.world_size}, "
                f"margin={self.margin}, sample_rate={self.sample_rate}, chunk_size={self.chunk_size}"
                + (f", sub_centers={self.sub_centers}" if self.sub_centers > 1 else "")
                + (f", grad_filter={self.grad_filter}, grad_filter_block={self.grad_filter_block}"
                   if self.grad_filter is not None else "")
                + (f", impl={self.impl!r}" if self.impl != "auto" else ""))

    # state: which rows, safe to copy and pickle, guarded against re-sharding wrappers -----------
    def get_extra_state(self):
        return _state.layout_tensor(_state.layout(self))  # a tensor: safetensors can store it

    def set_extra_state(self, state) -> None:
        self.step = _state.step_of(state)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        own = {k: v for k, v in state_dict.items() if k.startswith(prefix)}  # a new dict: the caller's is untouched
        _state.select_rows(self, own, prefix)  # raises on rows of other classes
        super()._load_from_state_dict(own, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def __setattr__(self, name, value):
        if name == "weight" and _state.is_dtensor(value):
            raise ValueError(
                "PartialFC: the head's weight already holds only this rank's class rows; a wrapper tried to "
                "re-shard it as a DTensor (FSDP2's fully_shard or tensor parallelism), which would mix "
                "different ranks' classes. Leave the head's parameters out: "
                "fully_shard(model, ignored_params=partialfc.head_parameters(model)), or shard only the backbone.")
        super().__setattr__(name, value)

    def __deepcopy__(self, memo):
        if self.group is not None:
            memo[id(self.group)] = self.group  # a copy shares the process group, it cannot own a new one
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new

    def __getstate__(self):
        state = dict(self.__dict__)
        if self.group is not None and not isinstance(self.group, _DetachedGroup):
            ranks = tuple(torch.distributed.get_process_group_ranks(self.group))
            whole = ranks == tuple(range(torch.distributed.get_world_size()))
            state["group"] = None if whole else _DetachedGroup(ranks)  # the default group is found again
        state.pop("_ddp_checked", None)
        return state

    def __setstate__(self, state):
        state.setdefault("sub_centers", 1)  # heads pickled before sub-centers existed
        state.setdefault("num_rows", state["num_local"] * state["sub_centers"])
        state.setdefault("row_start", state["class_start"] * state["sub_centers"])
        state.setdefault("grad_filter", None)  # heads pickled before gradient filtering existed
        state.setdefault("grad_filter_block", DEFAULT_BLOCK)
        state.setdefault("last_filter_stats", None)
        super().__setstate__(state)

    # ------------------------------------------------------------------------------------
    @torch.compiler.disable
    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, return_stats: bool = False):
        """embeddings (B_local, d) float, labels (B_local,) integer global class ids -> loss (), or
        ``(loss, HeadStats)`` with ``return_stats=True`` (per-row statistics of the global batch).

        Runs eagerly under ``torch.compile`` (host-side batch sizes, a Python step counter and
        collectives would otherwise recompile every step).
        """
        self._check_group()
        check_not_replicated_by_ddp(self)
        sizes, dtype, needs_grad = self._check_and_exchange(embeddings, labels)
        if embeddings.dtype != dtype:  # only an empty rank may differ: it adopts the others' dtype
            embeddings = embeddings.to(dtype)
        labels = labels.to(device=embeddings.device, dtype=torch.int64)
        # a rank whose inputs need no gradient (e.g. an empty batch) still joins the backward collective
        anchor = None
        if needs_grad and not embeddings.requires_grad:
            anchor = torch.empty(0, device=embeddings.device, requires_grad=True)
        x_global, labels_global = gather_embeddings(embeddings, labels, sizes, self.group,
                                                    self.embedding_grad_scale, anchor)  # (B, d), (B,)
        valid = labels_global != self.ignore_index
        local = labels_global - self.class_start
        target = torch.where(valid & (local >= 0) & (local < self.num_local), local, -1)  # (B,)

        filt = None
        if self.grad_filter is not None:
            lo = sum(sizes[:self.rank])
            filt = GradFilterStats(eps=None if self.grad_filter is True else self.grad_filter,
                                   block=self.grad_filter_block, with_bounds=bool(return_stats), group=self.group,
                                   local_rows=(lo, lo + sizes[self.rank]),
                                   embedding_grad_scale=self.embedding_grad_scale)
            self.last_filter_stats = filt
        weight = self.weight
        if self.sample_rate < 1.0:
            generator = torch.Generator(device=weight.device)
            generator.manual_seed(step_seed(self.seed, self.class_start, self.step))
            index, target = sample_classes(target, self.num_local, self.sample_rate, generator)  # classes
            rows = self._rows_of(index)  # (n k,)
            if self.sparse_grad and filt is not None:  # a sparse gradient of the kept rows only
                weight = SelectRowsKept.apply(self.weight, rows, filt)
            else:
                weight = F.embedding(rows, self.weight, sparse=True) if self.sparse_grad \
                    else self.weight.index_select(0, rows)  # (n k, d)
            self.sampled_index = index
        elif self.sparse_grad:
            index = torch.arange(self.num_local, device=weight.device)
            weight = F.embedding(self._rows_of(index), self.weight, sparse=True) if filt is None \
                else SelectRowsKept.apply(self.weight, self._rows_of(index), filt)
            self.sampled_index = index
        else:
            self.sampled_index = None

        # a per-row margin (e.g. AdaFace) is fixed for this batch here, once, from the global batch:
        # for_batch returns an object with ``s`` and ``psi_and_grad(cos_y)`` giving each row its own values
        margin = self.margin if isinstance(self.margin, CombinedMargin) else self.margin.for_batch(x_global, valid)
        loss_fn = triton_margin_softmax_cross_entropy if use_triton(getattr(self, "impl", "auto"), x_global.device) \
            else margin_softmax_cross_entropy
        loss, stats = loss_fn(x_global, weight, target, valid, margin, self.group,
                              self.chunk_size, self._mm_dtype(embeddings), self.sub_centers, filt)
        self.step += 1
        if return_stats:
            return loss, HeadStats(max_logit=stats[0], target_logit=stats[1], target_cos=stats[2], valid=valid,
                                   grad_filter=filt)
        return loss

    def _rows_of(self, classes: torch.Tensor) -> torch.Tensor:
        """Local weight rows of local classes (n,) -> (n * sub_centers,), class-major."""
        k = self.sub_centers
        if k == 1:
            return classes
        return (classes.unsqueeze(1) * k + torch.arange(k, device=classes.device)).view(-1)

    def predict(self, embeddings: torch.Tensor, k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scores, class_ids)``: for each local row, the ``k`` classes of largest cosine over all
        ranks (no margin; with sub-centers a class's nearest row), best first, ties to the lower class
        id: (B_local, k) float32 and int64. Collective: every rank of the group calls it (a rank may
        pass an empty batch)."""
        from .predict import sharded_topk
        self._check_group()
        if not isinstance(embeddings, torch.Tensor):
            raise TypeError("PartialFC.predict: embeddings must be a tensor")
        return sharded_topk(embeddings.detach(), self.weight.detach(), self.class_start, self.num_classes, k,
                            self.group, sub_centers=self.sub_centers)

    def _mm_dtype(self, embeddings: torch.Tensor) -> torch.dtype:
        device_type = embeddings.device.type
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
        return torch.promote_types(embeddings.dtype, self.weight.dtype)

    # ------------------------------------------------------------------------------------
    def _check_group(self) -> None:
        if isinstance(self.group, _DetachedGroup):
            raise RuntimeError(
                f"PartialFC: this head was pickled with an explicit process group of ranks {self.group.ranks}, "
                "which cannot be restored by unpickling; set head.group to that group before use.")
        world, rank = group_size(self.group), group_rank(self.group)
        if (world, rank) != (self.world_size, self.rank):
            raise RuntimeError(
                f"PartialFC: this head holds the rows of rank {self.rank} of {self.world_size} (classes "
                f"[{self.class_start}, {self.class_end})) but runs as rank {rank} of {world}; build a head for "
                "this group and load the state with partialfc.load_head_shards (or a consolidated state dict).")

    def _check_and_exchange(self, embeddings: torch.Tensor, labels: torch.Tensor):
        """``(sizes, dtype, needs_grad)``: every rank's batch size, the embeddings' common dtype and
        whether any rank will run backward; with ``validate`` also the same error on every rank."""
        distributed = is_distributed(self.group)
        grad_mode = torch.is_grad_enabled()
        if not self.validate:
            needs = grad_mode and (embeddings.requires_grad or self.weight.requires_grad)
            if not distributed or self.uniform_batch:
                return [embeddings.shape[0]] * self.world_size, embeddings.dtype, needs
            record = self._exchange_fields(embeddings, _OK, 0, 0)
        else:
            record = self._local_record(embeddings, labels)
        records = all_gather_rows(record, self.group).tolist()  # the one host sync
        if self.validate:
            self._raise_on_bad_records(records)
        sizes = [r[0] for r in records]
        if self.uniform_batch and len(set(sizes)) > 1:
            raise ValueError(f"PartialFC(uniform_batch=True) got different batch sizes per rank: {sizes}")
        return sizes, self._agreed_dtype(records), any(r[6] for r in records)

    def _exchange_fields(self, embeddings, code, a, b) -> torch.Tensor:
        """The record one rank contributes, built without a host read."""
        grad_mode = torch.is_grad_enabled()
        fields = [embeddings.shape[0] if embeddings.dim() >= 1 else 0, code, a, b, dtype_code(embeddings.dtype),
                  int(grad_mode), int(grad_mode and (embeddings.requires_grad or self.weight.requires_grad))]
        return torch.tensor([fields], dtype=torch.int64, device=embeddings.device)

    def _agreed_dtype(self, records) -> torch.dtype:
        """The embeddings' dtype shared by the ranks that have rows; raise if they differ or disagree
        on grad mode (a rank under no_grad could not join the backward collective)."""
        busy = {r[4] for r in records if r[0] > 0} or {r[4] for r in records}
        if len(busy) > 1:
            per_rank = ", ".join(f"rank {i}: {dtype_from_code(r[4])}" for i, r in enumerate(records))
            raise ValueError(f"PartialFC: bad input: embeddings have different dtypes on different ranks ({per_rank}); "
                             "cast them to one dtype (or use the same autocast) on every rank")
        modes = [r[5] for r in records]
        if len(set(modes)) > 1:
            off = [i for i, m in enumerate(modes) if not m]
            raise ValueError(f"PartialFC: bad input: rank(s) {off} ran the head under torch.no_grad() while the "
                             "others train; every rank must run the step with gradients and call backward "
                             "(a rank with no data passes torch.empty(0, embedding_size))")
        return dtype_from_code(busy.pop())

    def _local_record(self, embeddings, labels) -> torch.Tensor:
        device = embeddings.device if isinstance(embeddings, torch.Tensor) else torch.device("cpu")
        code, a, b = _OK, 0, 0
        batch = embeddings.shape[0] if isinstance(embeddings, torch.Tensor) and embeddings.dim() >= 1 else 0
        if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2:
            code, a = _EMB_NDIM, embeddings.dim() if isinstance(embeddings, torch.Tensor) else -1
        elif embeddings.shape[1] != self.embedding_size:
            code, a = _EMB_WIDTH, embeddings.shape[1]
        elif not embeddings.is_floating_point():
            code = _EMB_DTYPE
        elif not isinstance(labels, torch.Tensor) or labels.dim() != 1:
            code, a = _LAB_NDIM, labels.dim() if isinstance(labels, torch.Tensor) else -1
        elif labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            code = _LAB_DTYPE
        elif labels.shape[0] != embeddings.shape[0]:
            code, a, b = _LENGTH, embeddings.shape[0], labels.shape[0]
        if code != _OK:
            return torch.tensor([[batch, code, a, b, 0, int(torch.is_grad_enabled()), 0]], dtype=torch.int64,
                                device=device)
        lab = labels.to(device=device, dtype=torch.int64)
        bad = (lab != self.ignore_index) & ((lab < 0) | (lab >= self.num_classes))
        n_bad = bad.sum()
        first_bad = lab[bad.to(torch.int8).argmax()] if lab.numel() else n_bad
        n_nonfinite = (~torch.isfinite(embeddings)).sum()
        code_t = torch.where(n_bad > 0, _LABEL_RANGE, torch.where(n_nonfinite > 0, _NONFINITE, _OK))
        a_t = torch.where(n_bad > 0, n_bad, n_nonfinite)
        b_t = torch.where(n_bad > 0, first_bad, 0)
        rest = self._exchange_fields(embeddings, _OK, 0, 0)[0, 4:]
        head = torch.stack([torch.tensor(batch, device=device), code_t, a_t, b_t]).to(torch.int64)
        return torch.cat([head, rest]).view(1, _RECORD)

    def _raise_on_bad_records(self, records: list[list[int]]) -> None:
        problems = []
        for rank, (batch, code, a, b, *_rest) in enumerate(records):
            where = f"rank {rank}: " if self.world_size > 1 else ""
            if code == _EMB_NDIM:
                problems.append(f"{where}embeddings must be a 2-D tensor (batch, {self.embedding_size}), got {a}-D")
            elif code == _EMB_WIDTH:
                problems.append(f"{where}embeddings have width {a}, expected embedding_size={self.embedding_size}")
            elif code == _EMB_DTYPE:
                problems.append(f"{where}embeddings must be a floating-point tensor")
            elif code == _LAB_NDIM:
                problems.append(f"{where}labels must be a 1-D tensor of class ids, got {a}-D")
            elif code == _LAB_DTYPE:
                problems.append(f"{where}labels must be an integer tensor (int64 class ids)")
            elif code == _LENGTH:
                problems.append(f"{where}embeddings have {a} rows but labels have {b} entries")
            elif code == _LABEL_RANGE:
                problems.append(f"{where}{a} label(s) outside [0, {self.num_classes}) that are not "
                                f"ignore_index={self.ignore_index}, e.g. {b}")
            elif code == _NONFINITE:
                problems.append(f"{where}embeddings contain {a} non-finite value(s) (NaN or Inf)")
        if problems:
            raise ValueError("PartialFC: bad input: " + "; ".join(problems))
