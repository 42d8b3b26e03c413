"""The fused Triton path (``PartialFC(impl="triton")``) with sub-centers and CurricularFace, which ran
the torch path with a warning before they were fused: against the independent float64 oracles
(tests/oracle.py for sub-centers, tests/test_curricularface.py's ``oracle`` for CurricularFace, with or
without sub-centers), through the head against ``impl="torch"``, on gloo world 2 with uneven and empty
batches, with no (B, C_local) or (B, C_local k) tensor and no fallback warning.

TRITON_INTERPRET=1 is set here, before triton is imported (tests/conftest.py sets it too). The
interpreter runs every tile in Python: C <= 120 classes, d <= 16, B <= 24.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # noqa: E402  (before anything imports triton)

import warnings  # noqa: E402
from functools import partial  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from partialfc import CombinedMargin, CurricularFace, PartialFC, triton_softmax  # noqa: E402
from tests import test_curricularface as cf  # noqa: E402
from tests.dist_utils import run_distributed  # noqa: E402
from tests.oracle import reference_loss  # noqa: E402
from tests.row_margin_harness import IGNORE, Setup, check_against_oracle, run_head, sub_center_weight  # noqa: E402
from tests.test_triton import _LargestTensor  # noqa: E402
from tests.test_triton_ops import GRADS, LSE, _OpCounter  # noqa: E402

D, C, B = 16, 60, 24
ARC = CombinedMargin.arcface(s=16.0, m=0.5)
COMBINED = CombinedMargin(s=16.0, m1=1.2, m2=0.3, m3=0.15)
CF_KW = dict(s=16.0, m=0.5, t_alpha=0.3)  # a large t_alpha: t moves visibly from step to step
MARGINS = {"arcface": ARC, "combined": COMBINED}


def _margin(name):
    """A fresh margin (CurricularFace is a module with a running buffer: one per head)."""
    return CurricularFace(**CF_KW) if name == "curricular" else MARGINS[name]


def _margin_kwargs(m):
    return dict(s=m.s, m1=m.m1, m2=m.m2, m3=m.m3, extension=m.extension, straight_through=m.straight_through)


def _batch(step, b=B, d=D, c=C, seed=0):
    """Float64 embeddings (b, d) and labels (b,) of one step, one ignored row, targets repeated."""
    g = torch.Generator().manual_seed(1000 * seed + 700 + step)
    x = torch.randn(b, d, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, c, (b,), generator=g)
    y[1] = IGNORE
    return x, y


def _oracle(name, k, x, w, labels, t):
    """float64 (loss, dL/dx, dL/dW, t after the step) from the formulas: tests/oracle.py (sub-center
    max by autograd) or tests/test_curricularface.py's oracle (t updated before use)."""
    x = x.detach().double().requires_grad_()
    w = w.detach().double().requires_grad_()
    if name == "curricular":
        loss, t = cf.oracle(x, w, labels, labels != IGNORE, t, **CF_KW, sub_centers=k)
    else:
        loss = reference_loss(x, w, labels, sub_centers=k, **_margin_kwargs(MARGINS[name]))
    gx, gw = torch.autograd.grad(loss, [x, w])
    return loss.detach(), gx, gw, t


def _steps(name, k, dtype, sample_rate, steps, impl="triton", seed=0, weight=None):
    """Forward + backward of a fresh head for ``steps`` steps; per step: loss, x grad, weight grad
    (dense, all rows), the sampled classes (or None), the weight used, t after forward and after
    backward (CurricularFace; else None)."""
    head = PartialFC(D, C, margin=_margin(name), impl=impl, sub_centers=k, sample_rate=sample_rate, dtype=dtype,
                     seed=seed)
    if weight is not None:
        with torch.no_grad():
            head.weight.copy_(weight)
    curricular = isinstance(head.margin, CurricularFace)
    out = []
    for step in range(steps):
        x64, y = _batch(step, seed=seed)
        x = x64.to(dtype).requires_grad_()
        loss = head(x, y)
        t_fwd = head.margin.t.item() if curricular else None
        loss.backward()
        out.append(dict(loss=loss.detach().double(), gx=x.grad.double(), gw=head.weight.grad.double(),
                        x=x.detach().double(), y=y, w=head.weight.detach().double().clone(),
                        sampled=None if head.sampled_index is None else head.sampled_index.clone(), t_fwd=t_fwd,
                        t_bwd=head.margin.t.item() if curricular else None))
        head.weight.grad = None
    return out


def _rel(got, ref):
    """Largest error relative to the largest reference entry (norm-wise: entries near 0 do not blow up)."""
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-300))


def _expected(name, k, rec, t):
    """The oracle for one recorded step: restricted to the sampled classes (all k rows of each) when
    the head sampled. Returns (loss, gx, gw over all rows with 0 off the sample, t after)."""
    w, y = rec["w"], rec["y"]
    rows = torch.arange(w.shape[0])
    y_ref = y
    if rec["sampled"] is not None:
        kept = rec["sampled"]
        rows = (kept.unsqueeze(1) * k + torch.arange(k)).view(-1)
        remap = torch.full((C,), -1, dtype=torch.int64)
        remap[kept] = torch.arange(kept.numel())
        y_ref = torch.where(y == IGNORE, y, remap[y.clamp_min(0)])
        assert bool((y_ref[y != IGNORE] >= 0).all()), "a positive class was not sampled"
    loss, gx, gw_rows, t = _oracle(name, k, rec["x"], w[rows], y_ref, t)
    gw = torch.zeros_like(w)
    gw[rows] = gw_rows
    return loss, gx, gw, t


# name, margin, sub-centers, dtype, sample_rate, steps, tolerance (relative to the largest entry)
CASES = [
    ("arcface_k2_fp32", "arcface", 2, torch.float32, 1.0, 1, 1e-5),
    ("combined_k3_fp32_sampled", "combined", 3, torch.float32, 0.5, 1, 1e-5),
    ("arcface_k3_bf16", "arcface", 3, torch.bfloat16, 1.0, 1, 2e-2),
    ("curricular_k1_fp32", "curricular", 1, torch.float32, 1.0, 2, 1e-5),
    ("curricular_k2_fp32_sampled", "curricular", 2, torch.float32, 0.5, 2, 1e-5),
    ("curricular_k2_bf16", "curricular", 2, torch.bfloat16, 1.0, 2, 2e-2),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_against_the_float64_oracle(case):
    """Loss, dL/dx and dL/dW of the triton head against the float64 oracle, per step; CurricularFace's
    t against the oracle's after every forward, and unchanged by backward. bf16: the gradients come
    back in bf16 (rounding ~4e-3) and random data has sub-center near-ties and negatives at their hard
    threshold closer than bf16 products resolve, so a few entries take the other branch; measured
    errors stay below 1e-2 (the torch path's are alike), hence the loose tolerance."""
    _, name, k, dtype, rate, steps, tol = case
    t = 0.0  # the paper's initial t
    for step, rec in enumerate(_steps(name, k, dtype, rate, steps)):
        loss, gx, gw, t = _expected(name, k, rec, t)
        where = f"step {step}"
        assert _rel(rec["loss"], loss) <= tol, (where, float(rec["loss"]), float(loss))
        assert _rel(rec["gx"], gx) <= tol, (where, "x grad", _rel(rec["gx"], gx))
        assert _rel(rec["gw"], gw) <= tol, (where, "w grad", _rel(rec["gw"], gw))
        if rec["sampled"] is not None:  # rows of unsampled classes: exactly no gradient (gw is 0 there)
            assert rec["sampled"].numel() < C and gw.abs().sum(dim=1).eq(0).sum() >= (C - rec["sampled"].numel()) * k
        if name == "curricular":
            t_tol = 1e-6 if dtype == torch.float32 else 1e-2
            assert rec["t_fwd"] == pytest.approx(t, rel=t_tol), (where, "t")
            assert rec["t_bwd"] == rec["t_fwd"], (where, "backward moved t")


def test_tied_sub_centers_route_to_the_lowest_row():
    """Sub-centers that are exact copies tie on every class: the gradient goes to each class's first
    row (``torch.max``'s choice, the torch path's and the oracle's), the copies get exactly 0."""
    k = 3
    w = torch.randn(C, 1, D, generator=torch.Generator().manual_seed(4), dtype=torch.float64).expand(C, k, D)
    for name in ("arcface", "curricular"):
        rec = _steps(name, k, torch.float64, 1.0, 1, weight=w.reshape(C * k, D))[0]
        loss, gx, gw, _ = _expected(name, k, rec, 0.0)
        gw_rows = rec["gw"].view(C, k, D)
        assert gw_rows[:, 1:].abs().max() == 0.0, name
        assert gw_rows[:, 0].abs().amax(dim=1).gt(0).sum() >= C // 2, name
        assert _rel(rec["loss"], loss) <= 1e-12 and _rel(rec["gx"], gx) <= 1e-10 and _rel(rec["gw"], gw) <= 1e-10


@pytest.mark.parametrize("name,k,rate", [("arcface", 2, 1.0), ("curricular", 3, 0.5), ("curricular", 1, 1.0)])
def test_matches_the_torch_path(name, k, rate):
    """The real heads, float64, same seed: impl="triton" gives impl="torch"'s losses, gradients,
    samples and CurricularFace t, step after step."""
    ours = _steps(name, k, torch.float64, rate, 2)
    ref = _steps(name, k, torch.float64, rate, 2, impl="torch")
    for step, (a, b) in enumerate(zip(ours, ref)):
        if rate < 1:
            assert torch.equal(a["sampled"], b["sampled"]), step
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-12), step
        torch.testing.assert_close(a["gx"], b["gx"], rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(a["gw"], b["gw"], rtol=1e-10, atol=1e-13)
        assert a["t_fwd"] == b["t_fwd"] and a["t_bwd"] == b["t_bwd"], step  # None == None without t


# ---------------------------------------------------------------------------------------------
def _arcface():
    return ARC


def _arc_oracle(k, x, weight, labels, valid, state):
    """tests/oracle.py in the harness's calling convention (no running state)."""
    return reference_loss(x, weight, labels, sub_centers=k, **_margin_kwargs(ARC)), {}


K_DIST = 2
SETUP_ARC_SUB = Setup(cf.D, cf.C, margin=_arcface, batch=cf._global_batch, head_kw={"sub_centers": K_DIST},
                      full_weight=partial(sub_center_weight, K_DIST))
TRITON = {"impl": "triton"}
# (setup, per-step per-rank batch sizes, oracle, initial state): every job has an empty rank in a step
DIST_JOBS = [
    (cf.SETUP_SUB, [[4, 0], [2, 5]], cf._oracle_sub, cf.INITIAL),  # CurricularFace, 3 sub-centers
    (cf.SETUP, [[0, 5], [3, 4]], cf._oracle, cf.INITIAL),  # CurricularFace
    (SETUP_ARC_SUB, [[5, 3], [0, 6]], partial(_arc_oracle, K_DIST), {}),  # ArcFace, 2 sub-centers
]


def _dist_jobs(rank, world):
    return [run_head(rank, world, setup, sizes, TRITON) for setup, sizes, _, _ in DIST_JOBS]


def test_two_ranks_uneven_and_empty_match_the_oracle():
    """gloo world 2, two steps each, uneven batches and an empty rank: loss, both gradients and t on
    every rank against the float64 oracles (the harness of tests/row_margin_harness.py)."""
    results = run_distributed(_dist_jobs, 2)
    for j, (setup, sizes, oracle, initial) in enumerate(DIST_JOBS):
        check_against_oracle(setup, [r[j] for r in results], sizes, oracle, initial,
                             state_tol=dict(rel=1e-12, abs=1e-15))


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,k,rate", [("arcface", 3, 1.0), ("curricular", 2, 0.5), ("curricular", 3, 1.0)])
def test_no_tensor_of_batch_times_classes(name, k, rate):
    """forward + backward create no tensor of B x C_local elements or more (C_local k x d, the weight
    and its gradient, is smaller here); the torch path does, (B, C_local k) ones (the mode sees them)."""
    d = 4
    x64, y = _batch(0, d=d)
    largest = {}
    for impl in ("triton", "torch"):
        head = PartialFC(d, C, margin=_margin(name), impl=impl, sub_centers=k, sample_rate=rate)
        x = x64.float().requires_grad_()
        with _LargestTensor() as mode:
            head(x, y).backward()
        c_local = int(head.sampled_index.numel()) if rate < 1 else C
        largest[impl] = (mode.largest, str(mode.op))
    assert C * k * d < B * c_local
    assert largest["triton"][0] < B * c_local, largest
    assert largest["torch"][0] >= B * c_local * k, largest


@pytest.mark.parametrize("name,k", [("arcface", 2), ("curricular", 1), ("curricular", 3)])
def test_fused_without_a_fallback_warning(name, k, monkeypatch):
    """Sub-centers and CurricularFace run the fused ops (once each), with no warning and without
    the torch function."""
    monkeypatch.setattr(triton_softmax, "_warned", set())  # a warning already given would hide a fallback
    monkeypatch.setattr(triton_softmax, "margin_softmax_cross_entropy",
                        lambda *a, **kw: pytest.fail("fell back to the torch path"))
    head = PartialFC(D, C, margin=_margin(name), impl="triton", sub_centers=k)
    x64, y = _batch(0, b=9)
    x = x64.float().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with _OpCounter() as ops:
            head(x, y).backward()
    assert ops.seen.get(LSE) == 1 and ops.seen.get(GRADS) == 1, ops.seen


def test_gpu_check_compares_the_extensions_and_fails_on_a_difference(capsys, monkeypatch):
    """benchmarks/gpu_check.py's sub-center / CurricularFace table (run on the GPU by gpu.sh) works on
    the CPU under the interpreter at a tiny size, and reports a failure when the paths differ."""
    from benchmarks import gpu_check
    assert gpu_check._extensions(b=8, d=16, c=30, device="cpu")
    table = capsys.readouterr().out
    assert "arcface, 3 sub-centers" in table and "curricularface" in table
    real = triton_softmax.TritonMarginSoftmaxCrossEntropy.apply
    monkeypatch.setattr(triton_softmax.TritonMarginSoftmaxCrossEntropy, "apply",
                        lambda *a: tuple(t * 1.01 if i == 0 else t for i, t in enumerate(real(*a))))
    assert not gpu_check._extensions(b=8, d=16, c=30, device="cpu")
    assert "FAIL" in capsys.readouterr().out
