"""Shared harness for testing a margin of the sharded head against a float64 oracle.

What it runs (:func:`run`): a :class:`PartialFC` in float64 with the margin of a :class:`Setup`,
on one process (world 1, in the test process) or on ``world`` gloo ranks
(:func:`tests.dist_utils.run_distributed`), for several steps. Step ``i`` uses the global batch
``setup.batch(i, sizes_per_step[i])``: rank ``r`` passes its own part ``xs[r], ys[r]`` (uneven
and empty parts are fine), runs forward + backward and records (:func:`run_head`), per step::

    loss     float, the head's loss (the same on every rank)
    x_grad   (B_r, d) gradient of this rank's embeddings (the head scales it by the world size)
    w_grad   (R_r, d) dense gradient of this rank's weight rows
    rows     (lo, hi): the rows of the full weight this rank holds (see ``Setup.rows``)
    bounds   (class_start, class_end) of this rank
    sampled  this rank's sampled local row indices (``head.sampled_index``) or None
    state    {buffer name: float} of the margin module after the step (AdaFace's running
             mean / std, CurricularFace's t; empty for a margin without buffers)

What it checks (:func:`check_against_oracle`): the same steps replayed in float64 on the whole
global batch (all ranks' rows concatenated in rank order) and the full weight
(``setup.full_weight()``: the rows as the head initialises them, written independently of it),
through the test file's own oracle, with the running state threaded from step to step.

The oracle is a callable ``oracle(x, weight, labels, valid, state) -> (loss, new_state)``:

    x        (B, d) float64, requires grad: the global batch of the step
    weight   (R, d) float64, requires grad: all rows of the head (R = num_classes x rows per class)
    labels   (B,) int64 global class ids, ``-100`` on ignored rows
    valid    (B,) bool, ``labels != -100``
    state    {buffer name: float}: the margin's running statistics before this step
    returns  loss: a 0-dim float64 tensor, the mean over valid rows, differentiable with respect
             to ``x`` and ``weight`` (the harness calls ``backward`` on it); new_state: the
             statistics after this step's update, with exactly the margin's buffer names.

Compared per rank and step: loss (``loss_tol``), every buffer (``state_tol``: pytest.approx
keywords), ``w_grad`` against the oracle's gradient of the rank's rows and ``x_grad`` against
``world x`` the oracle's gradient of the rank's batch rows (``grad_tol``: torch.testing keywords).

Sampling (Partial FC, ``sample_rate < 1``): :func:`sampled_problem` gives the oracle inputs
restricted to the union of every rank's sampled classes of one step; the oracle's loss over them is
the head's loss (:func:`check_sampled`).

Everything a rank needs travels to spawned processes by pickling: ``Setup``'s callables must be
module-level functions or ``functools.partial`` of them / of classes (no lambdas).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import pytest
import torch

from partialfc import PartialFC, init_weight_rows_
from tests.dist_utils import run_distributed

IGNORE = -100


def class_rows(head: PartialFC) -> tuple[int, int]:
    """Default ``Setup.rows``: a rank's rows of the full weight when every class owns the same
    number of consecutive rows (one without sub-centers) and shards hold consecutive classes."""
    per_class = head.weight.shape[0] // max(1, head.class_end - head.class_start)
    return head.class_start * per_class, head.class_end * per_class


def default_full_weight(setup: "Setup") -> torch.Tensor:
    """The head's initial rows over all classes, (num_classes, d) float64, seed 0."""
    return sub_center_weight(1, setup)


def sub_center_weight(k: int, setup: "Setup") -> torch.Tensor:
    """The initial rows of a head with ``k`` rows per class, (num_classes k, d) float64, seed 0:
    rows are initialised by global row id (``init_weight_rows_`` from row 0)."""
    return init_weight_rows_(torch.empty(setup.num_classes * k, setup.embedding_size, dtype=torch.float64), 0, 0)


@dataclass(frozen=True)
class Setup:
    """What a test file fixes.

    ``margin()`` builds the margin module (a fresh one per head); ``batch(step, sizes)`` returns
    ``(xs, ys)``: per-rank float64 embeddings (sizes[r], d) and int64 labels (sizes[r],), the same
    on every call with the same arguments (seed it from ``step``); ``head_kw``: extra PartialFC
    arguments used by every run (e.g. ``sub_centers``); ``rows(head)``: the rows of the full weight
    the head of a rank holds; ``full_weight(setup)``: all rows as initialised, (R, d) float64."""
    embedding_size: int
    num_classes: int
    margin: Callable[[], torch.nn.Module]
    batch: Callable[[int, Sequence[int]], tuple[list, list]]
    head_kw: dict = field(default_factory=dict)
    rows: Callable[[PartialFC], tuple[int, int]] = class_rows
    full_weight: Callable[["Setup"], torch.Tensor] = default_full_weight

    def build_head(self, head_kw: Optional[dict] = None) -> PartialFC:
        return PartialFC(self.embedding_size, self.num_classes, margin=self.margin(), dtype=torch.float64,
                         **{**self.head_kw, **(head_kw or {})})


def margin_state(head: PartialFC) -> dict:
    """{buffer name: float} of the head's margin module (empty when it has none)."""
    if not isinstance(head.margin, torch.nn.Module):
        return {}
    return {name: buf.item() for name, buf in head.margin.named_buffers()}


def run_head(rank: int, world: int, setup: Setup, sizes_per_step, head_kw: Optional[dict] = None) -> list[dict]:
    """On one rank: the steps of ``sizes_per_step`` (a list of per-rank batch sizes per step); the
    records described in the module docstring, one per step."""
    head = setup.build_head(head_kw)
    out = []
    for step, sizes in enumerate(sizes_per_step):
        xs, ys = setup.batch(step, sizes)
        x = xs[rank].clone().requires_grad_(True)
        loss = head(x, ys[rank])
        loss.backward()
        w_grad = head.weight.grad
        out.append({"loss": loss.item(), "x_grad": x.grad.clone(),
                    "w_grad": (w_grad.to_dense() if w_grad.is_sparse else w_grad).clone(),
                    "rows": setup.rows(head), "bounds": (head.class_start, head.class_end),
                    "sampled": None if head.sampled_index is None else head.sampled_index.clone(),
                    "state": margin_state(head)})
        head.weight.grad = None
    return out


def run(setup: Setup, sizes_per_step, head_kw: Optional[dict] = None) -> list[list[dict]]:
    """Per-rank records of :func:`run_head`; the world size is the number of sizes of a step
    (1: in this process; more: gloo ranks in spawned processes)."""
    world = len(sizes_per_step[0])
    if any(len(sizes) != world for sizes in sizes_per_step):
        raise ValueError(f"every step needs one batch size per rank: {sizes_per_step}")
    if world == 1:
        return [run_head(0, 1, setup, sizes_per_step, head_kw)]
    return run_distributed(run_head, world, setup, sizes_per_step, head_kw)


LOSS_TOL = dict(rel=1e-10, abs=1e-12)
GRAD_TOL = dict(rtol=1e-8, atol=1e-11)


def check_against_oracle(setup: Setup, results: list[list[dict]], sizes_per_step, oracle, initial_state: dict,
                         state_tol: dict, loss_tol: dict = LOSS_TOL, grad_tol: dict = GRAD_TOL) -> None:
    """Replay every step through ``oracle`` (see the module docstring) and compare each rank's
    records; ``initial_state``: the statistics before the first step, as the margin's formulas
    define them (not read from the head)."""
    world = len(results)
    full = setup.full_weight(setup)
    state = dict(initial_state)
    for step, sizes in enumerate(sizes_per_step):
        xs, ys = setup.batch(step, sizes)
        x = torch.cat(xs).requires_grad_(True)
        w = full.clone().requires_grad_(True)
        labels = torch.cat(ys)
        loss, state = oracle(x, w, labels, labels != IGNORE, dict(state))
        loss.backward()
        offset = 0
        for rank in range(world):
            r = results[rank][step]
            where = f"step {step}, rank {rank}"
            assert r["loss"] == pytest.approx(loss.item(), **loss_tol), where
            assert set(r["state"]) == set(state), f"{where}: margin buffers {sorted(r['state'])}, " \
                                                  f"oracle state {sorted(state)}"
            for name, value in state.items():
                assert r["state"][name] == pytest.approx(value, **state_tol), f"{where}: {name}"
            lo, hi = r["rows"]
            torch.testing.assert_close(r["w_grad"], w.grad[lo:hi], **grad_tol, msg=lambda m: f"{where}: w_grad: {m}")
            b = sizes[rank]
            torch.testing.assert_close(r["x_grad"], world * x.grad[offset: offset + b], **grad_tol,
                                       msg=lambda m: f"{where}: x_grad: {m}")
            offset += b


def sampled_problem(setup: Setup, results: list[list[dict]], sizes, step: int = 0):
    """The oracle inputs of a sampled step: ``(x, weight, labels, valid)`` with ``weight`` the full
    rows of the union of every rank's sampled classes (in rank order) and ``labels`` renumbered
    into it. Asserts that every positive class was sampled. One row per class (no sub-centers)."""
    kept = torch.cat([r[step]["sampled"] + r[step]["bounds"][0] for r in results])
    full = setup.full_weight(setup)
    xs, ys = setup.batch(step, sizes)
    labels = torch.cat(ys)
    remap = torch.full((setup.num_classes,), -1, dtype=torch.int64)
    remap[kept] = torch.arange(kept.numel())
    sub_labels = torch.where(labels == IGNORE, labels, remap[labels.clamp_min(0)])
    valid = labels != IGNORE
    assert bool((sub_labels[valid] >= 0).all()), "a positive class was not sampled"
    return torch.cat(xs), full[kept], sub_labels, valid


def check_sampled(setup: Setup, results: list[list[dict]], sizes, oracle, initial_state: dict,
                  loss_tol: dict = dict(rel=1e-10)) -> None:
    """The head's loss of a sampled first step equals the oracle's over the sampled classes."""
    x, weight, labels, valid = sampled_problem(setup, results, sizes)
    loss, _ = oracle(x, weight, labels, valid, dict(initial_state))
    for rank, r in enumerate(results):
        assert r[0]["loss"] == pytest.approx(loss.item(), **loss_tol), f"rank {rank}"
