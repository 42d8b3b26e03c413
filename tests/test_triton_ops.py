"""The fused path's custom ops (``torch.ops.partialfc.fused_lse_stats`` / ``fused_margin_grads``,
:mod:`partialfc.triton_ops`): torch.library's own checks, fake tensors (the planner) launching no
kernel, ``torch.compile`` capturing the ops, and the real path against the float64 oracle.

TRITON_INTERPRET=1 is set here, before triton is imported (tests/conftest.py sets it too). The
interpreter runs every tile in Python: C in the hundreds, d <= 32.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # noqa: E402  (before anything imports triton)

import pytest  # noqa: E402
import torch  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

pytest.importorskip("triton")

from partialfc import CombinedMargin, PartialFC, plan  # noqa: E402
from partialfc.triton_softmax import triton_margin_softmax_cross_entropy  # noqa: E402
from tests.oracle import reference_grads  # noqa: E402

LSE = torch.ops.partialfc.fused_lse_stats.default
GRADS = torch.ops.partialfc.fused_margin_grads.default
MARGIN = CombinedMargin.arcface(s=16.0, m=0.5)


def _stats_args(b, c, d, mm=torch.float32, weight=None, acc=torch.float32):
    """Arguments of fused_lse_stats: unit rows x^ in ``mm``, a weight in ``weight`` (default ``mm``),
    1/|w_j| and target logits in ``acc``, targets with some -1 (held by another rank)."""
    g = torch.Generator().manual_seed(b * 1000 + c)
    xhat = torch.nn.functional.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=1)
    w = torch.randn(c, d, generator=g, dtype=torch.float64)
    inv_norm = w.norm(dim=1).reciprocal()
    target = torch.randint(-1, c, (b,), generator=g) if c else torch.full((b,), -1)
    logit_t = 16.0 * (torch.rand(b, generator=g, dtype=torch.float64) * 2 - 1)
    return (xhat.to(mm), w.to(weight or mm), inv_norm.to(acc), target, logit_t.to(acc), 16.0)


def _grads_args(b, c, d, **kw):
    """Arguments of fused_margin_grads, with row statistics from fused_lse_stats (world 1)."""
    xhat, w, inv_norm, target, logit_t, s = _stats_args(b, c, d, **kw)
    m, sum_exp, rest = LSE(xhat, w, inv_norm, target, logit_t, s)
    g = torch.Generator().manual_seed(7)
    gain = s * torch.rand(b, generator=g, dtype=inv_norm.dtype) / max(b, 1)
    coef = gain / sum_exp.clamp_min(1e-30)
    t_gain = gain * rest / sum_exp.clamp_min(1e-30)
    dpsi = torch.rand(b, generator=g, dtype=inv_norm.dtype) + 0.5
    return (xhat, w, inv_norm, s, target, logit_t, m.clamp_min(-1e4), coef, t_gain, dpsi)


# (B, C_local, d, dtypes): fp32, fp64, an empty batch, an empty shard, bf16 products and weight
CASES = {"fp32": (37, 150, 24, {}), "fp64": (20, 70, 8, dict(mm=torch.float64, acc=torch.float64)),
         "empty_batch": (0, 150, 24, {}), "empty_shard": (9, 0, 24, {}),
         "bf16": (21, 90, 16, dict(mm=torch.bfloat16))}


@pytest.mark.parametrize("case", list(CASES))
def test_opcheck(case):
    """torch.library.opcheck with all its default checks (schema: no mutation or aliasing the schema
    does not declare; autograd registration; the fake implementation against the real one; AOT
    dispatch with dynamic shapes) on both ops."""
    b, c, d, kw = CASES[case]
    for op, args in ((LSE, _stats_args(b, c, d, **kw)), (GRADS, _grads_args(b, c, d, **kw))):
        result = torch.library.opcheck(op, args)
        assert set(result.values()) == {"SUCCESS"}, (op, result)


@pytest.mark.parametrize("case", list(CASES))
def test_fake_outputs_are_the_real_ones(case):
    """Same shapes, dtypes, strides and device from the fake implementations as from the kernels:
    statistics and dL/dx^ in the accumulation dtype, dL/dW contiguous in the weight's dtype."""
    b, c, d, kw = CASES[case]
    for op, args in ((LSE, _stats_args(b, c, d, **kw)), (GRADS, _grads_args(b, c, d, **kw))):
        real = op(*args)
        with FakeTensorMode() as mode:
            fake = op(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
        assert len(real) == len(fake)
        for r, f in zip(real, fake):
            assert isinstance(f, FakeTensor)
            assert (f.shape, f.dtype, f.stride(), f.device) == (r.shape, r.dtype, r.stride(), r.device)
    acc, weight_dtype = args[2].dtype, args[1].dtype
    assert [t.dtype for t in real] == [acc, weight_dtype] and real[1].is_contiguous()
    assert real[0].shape == (b, d) and real[1].shape == (c, d)


def _switch_args(b, c, d, k, hard, **kw):
    """(fused_lse_stats args, fused_margin_grads args) with ``k`` rows per class (c classes) and, with
    ``hard``, CurricularFace thresholds and t: the optional trailing arguments (sub_centers, t_sub,
    thr, t)."""
    xhat, w, inv_norm, target, logit_t, s = _stats_args(b, c * k, d, **kw)
    g = torch.Generator().manual_seed(11)
    target = torch.randint(-1, c, (b,), generator=g)
    extra = (k, torch.randint(0, k, (b,), generator=g) if k > 1 else None,
             (torch.rand(b, generator=g, dtype=inv_norm.dtype) - 0.5) if hard else None,
             torch.full((1,), 0.3, dtype=inv_norm.dtype) if hard else None)
    stats = (xhat, w, inv_norm, target, logit_t, s, *extra)
    m, sum_exp, rest = LSE(*stats)
    gain = s * torch.rand(b, generator=g, dtype=inv_norm.dtype) / max(b, 1)
    grads = (xhat, w, inv_norm, s, target, logit_t, m, gain / sum_exp, gain * rest / sum_exp,
             torch.rand(b, generator=g, dtype=inv_norm.dtype) + 0.5, *extra)
    return stats, grads


# (B, classes, d, sub-centers, hard negatives, dtypes)
SWITCHES = {"k2_hard": (13, 20, 8, 2, True, {}), "k3_bf16": (9, 17, 8, 3, False, dict(mm=torch.bfloat16)),
            "hard_fp64": (11, 30, 8, 1, True, dict(mm=torch.float64, acc=torch.float64))}


@pytest.mark.parametrize("case", list(SWITCHES))
def test_switches_opcheck_and_fakes(case):
    """The optional arguments (sub-centers, CurricularFace): opcheck passes, and the fake outputs
    (the planner's) have the real ones' shapes, dtypes and strides (dL/dW: all C k rows)."""
    b, c, d, k, hard, kw = SWITCHES[case]
    for op, args in zip((LSE, GRADS), _switch_args(b, c, d, k, hard, **kw)):
        result = torch.library.opcheck(op, args)
        assert set(result.values()) == {"SUCCESS"}, (op, result)
        real = op(*args)
        with FakeTensorMode() as mode:
            fake = op(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
        for r, f in zip(real, fake):
            assert (f.shape, f.dtype, f.stride()) == (r.shape, r.dtype, r.stride())
    assert real[1].shape == (c * k, d)


def test_switches_are_checked():
    """t_sub goes with sub_centers > 1 only, thr with t, sub_centers divides the rows: clear errors."""
    stats, _ = _switch_args(5, 6, 8, 2, True)
    head = stats[:6]
    k, t_sub, thr, t = stats[6:]
    for bad, match in (((2, None, thr, t), "t_sub"), ((1, t_sub, thr, t), "t_sub"),
                       ((2, t_sub, thr, None), "thr and t"), ((5, t_sub, None, None), "divide"),
                       ((2, t_sub[:3], None, None), "t_sub must have")):
        with pytest.raises(ValueError, match=match):
            LSE(*head, *bad)


class _NoKernel:
    """Stands in for a ``@triton.jit`` kernel: any launch fails the test."""

    def __getitem__(self, grid):
        raise AssertionError("a Triton kernel was launched")


class _OpCounter(TorchDispatchMode):
    """Counts the dispatched overloads."""

    def __init__(self):
        super().__init__()
        self.seen = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen[func] = self.seen.get(func, 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.fixture
def no_kernels(monkeypatch):
    """Kernels replaced by :class:`_NoKernel`, and the interpreter off: a fake run must need neither
    (a planner on a machine without a GPU)."""
    from partialfc import triton_kernels
    for name in ("forward_kernel", "grad_x_kernel", "grad_w_kernel"):
        monkeypatch.setattr(triton_kernels, name, _NoKernel())
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def test_head_under_fake_tensors(no_kernels):
    """PartialFC(impl="triton") forward + backward on fake tensors in a fake process group of 4 ranks
    (as the planner runs it): the ops' fake implementations run, no kernel, the right shapes."""
    d, c, b_local, world = 32, 1003, 16, 4
    with plan._fake_world(world, 0):
        head = PartialFC(d, c, impl="triton", validate=False, uniform_batch=True, device="meta",
                         dtype=torch.bfloat16)
        with FakeTensorMode(allow_non_fake_inputs=True):
            head.to_empty(device="cpu")
            x = torch.randn(b_local, d, requires_grad=True)
            labels = torch.randint(0, c, (b_local,))
            with _OpCounter() as ops:
                loss = head(x, labels)
                loss.backward()
            assert isinstance(loss, FakeTensor) and loss.shape == () and loss.dtype == torch.float32
            assert x.grad.shape == (b_local, d) and x.grad.dtype == torch.float32
            assert head.weight.grad.shape == (head.num_local, d) == (251, d)
            assert head.weight.grad.dtype == torch.bfloat16
    assert ops.seen.get(LSE) == 1 and ops.seen.get(GRADS) == 1, ops.seen


@pytest.mark.parametrize("k,curricular", [(3, False), (2, True)])
def test_head_with_switches_under_fake_tensors(no_kernels, k, curricular):
    """Sub-centers and CurricularFace on fake tensors (fake group of 4 ranks): the fused ops' fake
    implementations run once each, no kernel; dL/dW has all C_local k rows. CurricularFace runs in
    eval mode: training mode reads ``valid.any()`` on the host to update t (on either path)."""
    from partialfc import CurricularFace
    d, c, b_local, world = 32, 1003, 16, 4
    with plan._fake_world(world, 0):
        head = PartialFC(d, c, impl="triton", validate=False, uniform_batch=True, device="meta", dtype=torch.bfloat16,
                         sub_centers=k, margin=CurricularFace(s=16.0) if curricular else MARGIN)
        if curricular:
            head.eval()
        with FakeTensorMode(allow_non_fake_inputs=True):
            head.to_empty(device="cpu")
            x = torch.randn(b_local, d, requires_grad=True)
            with _OpCounter() as ops:
                loss = head(x, torch.randint(0, c, (b_local,)))
                loss.backward()
            assert isinstance(loss, FakeTensor) and loss.shape == ()
            assert head.weight.grad.shape == (251 * k, d) and head.weight.grad.dtype == torch.bfloat16
    assert ops.seen.get(LSE) == 1 and ops.seen.get(GRADS) == 1, ops.seen


def test_matches_the_torch_path_and_the_oracle():
    """The custom-op path, world 1, float64: loss and gradients equal the torch path's and the
    float64 oracle's (an ignored row, repeated targets)."""
    d, c, b = 16, 130, 23
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(b, d, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, c, (b,), generator=g)
    labels[3] = -100
    out = {}
    for impl in ("triton", "torch"):
        head = PartialFC(d, c, margin=MARGIN, impl=impl, dtype=torch.float64)
        x = x0.clone().requires_grad_()
        loss = head(x, labels)
        loss.backward()
        out[impl] = (loss.detach(), x.grad, head.weight.grad)
    ref = reference_grads(x0, head.weight.detach(), labels, s=MARGIN.s, m1=MARGIN.m1, m2=MARGIN.m2, m3=MARGIN.m3,
                          extension=MARGIN.extension)
    for ours, theirs, oracle in zip(out["triton"], out["torch"], ref):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(ours, oracle, rtol=1e-10, atol=1e-12)


def _loss(x, w, target, valid):
    return triton_margin_softmax_cross_entropy(x, w, target, valid, MARGIN)[0]


def _call_targets(gm) -> list:
    """call_function targets of a captured graph and of its subgraphs (autograd.Function bodies)."""
    return [n.target for m in gm.modules() if isinstance(m, torch.fx.GraphModule)
            for n in m.graph.nodes if n.op == "call_function"]


def test_torch_compile_captures_the_ops():
    """torch.compile of the fused loss: one graph, no graph break, both ops inside it (the
    autograd.Function's forward and backward); ``aot_eager`` runs the captured forward and backward
    and gives the eager loss and gradients. ``PartialFC.forward`` itself is
    ``torch.compiler.disable``d (host-side batch sizes), so the loss function is compiled; inductor is
    left out (minutes of C++ compilation on a 2-core machine)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20, 16, generator=g, requires_grad=True)
    w = torch.randn(150, 16, generator=g, requires_grad=True)
    target = torch.randint(-1, 150, (20,), generator=g)
    valid = torch.ones(20, dtype=torch.bool)
    eager = _loss(x, w, target, valid)
    eager_grads = torch.autograd.grad(eager, [x, w])

    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    try:
        torch.compile(_loss, backend=capture)(x, w, target, valid)
        assert len(graphs) == 1
        targets = _call_targets(graphs[0])
        assert {LSE, GRADS} <= {getattr(t, "default", t) for t in targets}, targets
        torch._dynamo.reset()
        loss = torch.compile(_loss, backend="aot_eager")(x, w, target, valid)
        grads = torch.autograd.grad(loss, [x, w])
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(loss, eager, rtol=0, atol=0)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_planner_measures_the_fused_path(no_kernels):
    """plan_memory(impl="triton"): measured through the fake implementations (no kernel, no
    interpreter). Same shape as the materialized head: the peak is lower by the (B, C_local) fp32
    logits, and what the fused head adds to the weights and their gradient is O(B d + C_local)."""
    B, C, d = 512, 20_000, 128
    kw = dict(classes_per_rank=C, embedding_size=d, world_size=2, batch_per_rank=B // 2, device="cpu")
    torch_plan = plan.plan_memory(**kw)
    fused = plan.plan_memory(impl="triton", **kw)
    for p in (fused, fused["fwd_bwd"]):
        assert sum(p["breakdown"].values()) == p["peak"]
    logits = B * C * 4
    assert fused["peak"] + logits <= torch_plan["peak"]
    bk = fused["fwd_bwd"]["breakdown"]
    assert bk["params"] == bk["grads"] == C * d * 4
    assert bk["activations"] + bk["temporaries"] <= 6 * B * d * 4 + 2 * C * 4, bk
    # the CUDA device model (the default) and the command line take it as well
    assert plan.plan_memory(impl="triton", **dict(kw, device="cuda"))["fwd_bwd"]["peak"] == fused["fwd_bwd"]["peak"]
    assert plan.main(["--classes-per-rank", "1000", "-d", "16", "--impl", "triton", "--json"]) == 0
    # sub-centers run fused too: lower by the (B, C_local k) logits
    k = 3
    fused_k = plan.plan_memory(impl="triton", sub_centers=k, **kw)["fwd_bwd"]
    assert fused_k["peak"] + B * C * k * 4 <= plan.plan_memory(sub_centers=k, **kw)["fwd_bwd"]["peak"]
    assert fused_k["breakdown"]["params"] == C * k * d * 4
    with pytest.raises(ValueError, match="impl must be one of"):
        plan.plan_memory(impl="cuda", **kw)
