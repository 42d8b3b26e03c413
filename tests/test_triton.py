"""The fused Triton path (``PartialFC(impl="triton")``) under Triton's CPU interpreter, against the
float64 oracle: every margin mode, world 1 and gloo world 2 with uneven and empty batches, sampling,
sparse gradients, fp32 / bf16, and a dispatch-level proof that no (B, C_local) tensor is created.

TRITON_INTERPRET=1 is set here, before triton is imported (spawned ranks inherit the environment).
The interpreter runs every tile in Python: shapes stay small (C in the hundreds, d <= 32).
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # noqa: E402  (before anything imports triton)

import subprocess  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from functools import partial  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

pytest.importorskip("triton")

from partialfc import CombinedMargin, PartialFC, shard_bounds  # noqa: E402
from partialfc import triton_softmax  # noqa: E402
from tests import test_adaface  # noqa: E402
from tests.dist_utils import run_distributed  # noqa: E402
from tests.oracle import reference_grads, reference_loss  # noqa: E402
from tests.row_margin_harness import IGNORE, Setup, check_against_oracle, check_sampled, run  # noqa: E402

D, C = 24, 300
MARGINS = {
    "arcface": CombinedMargin.arcface(s=16.0, m=0.5),
    "arcface_linear": CombinedMargin.arcface(s=16.0, m=0.5, extension="linear"),
    "cosface": CombinedMargin.cosface(s=16.0, m=0.35),
    "sphereface": CombinedMargin.sphereface(s=16.0, m=1.7),
    "combined": CombinedMargin(s=16.0, m1=1.2, m2=0.3, m3=0.15),
    "softmax": CombinedMargin.softmax(s=16.0),
    "straight_through": CombinedMargin.arcface(s=16.0, m=0.5, straight_through=True),
}


def _margin_kwargs(m):
    return dict(s=m.s, m1=m.m1, m2=m.m2, m3=m.m3, extension=m.extension, straight_through=m.straight_through)


def _batch(step, sizes, d=D, c=C):
    """Per-rank float64 embeddings and labels of one step (one ignored row, some targets repeated)."""
    g = torch.Generator().manual_seed(500 + step)
    xs = [torch.randn(b, d, generator=g, dtype=torch.float64) * 3 for b in sizes]
    ys = [torch.randint(0, c, (b,), generator=g) for b in sizes]
    if sizes[0] > 2:
        ys[0][2] = IGNORE
    return xs, ys


def _oracle(name, x, weight, labels, valid, state):
    """The harness's oracle convention over tests/oracle.py (no running state)."""
    return reference_loss(x, weight, labels, **_margin_kwargs(MARGINS[name])), {}


def _setup(name):
    return Setup(D, C, margin=partial(MARGINS.__getitem__, name), batch=_batch)


TRITON = {"impl": "triton"}


@pytest.mark.parametrize("name", list(MARGINS))
def test_float64_matches_the_oracle(name):
    """The kernels' math, exactly: float64 end to end, every margin mode, one rank."""
    sizes = [[29]]
    results = run(_setup(name), sizes, TRITON)
    check_against_oracle(_setup(name), results, sizes, partial(_oracle, name), {}, state_tol={})


def test_adaface_matches_the_oracle():
    """A per-row margin (AdaFace): its target logits are precomputed, the kernels do not change."""
    sizes = [[7], [5]]
    results = run(test_adaface.SETUP, sizes, TRITON)
    check_against_oracle(test_adaface.SETUP, results, sizes, test_adaface._oracle, test_adaface.INITIAL,
                         state_tol=dict(rel=1e-12))


def _low_precision_case(dtype, autocast):
    """(max relative error of loss, x grad, w grad) of the triton and the torch paths against the
    float64 oracle, for a head whose parameters and embeddings are ``dtype`` (or fp32 under autocast)."""
    g = torch.Generator().manual_seed(3)
    b = 32
    x64 = torch.randn(b, D, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, C, (b,), generator=g)
    margin = MARGINS["arcface"]
    errors = {}
    for impl in ("triton", "torch"):
        head = PartialFC(D, C, margin=margin, impl=impl, dtype=torch.float32 if autocast else dtype)
        x = x64.to(head.weight.dtype).requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = head(x, labels)
        loss.backward()
        ref_loss, ref_gx, ref_gw = reference_grads(x.detach().double(), head.weight.detach().double(), labels,
                                                   **_margin_kwargs(margin))

        def rel(a, ref):
            return float((a.double() - ref).abs().max() / ref.abs().max())
        errors[impl] = (rel(loss.detach(), ref_loss), rel(x.grad, ref_gx), rel(head.weight.grad, ref_gw))
    return errors


@pytest.mark.parametrize("dtype,autocast", [(torch.float32, False), (torch.bfloat16, False),
                                            (torch.float32, True)])
def test_low_precision_against_the_oracle(dtype, autocast):
    """fp32 and bf16 (as parameters, or through autocast): the triton path's error against float64 is
    within 3 times the torch path's own error in the same dtype (fp32 accumulation in both), or below
    1/16 of the dtype's epsilon (the two paths round differently: which one lands closer is chance)."""
    errors = _low_precision_case(dtype, autocast)
    eps = torch.finfo(dtype if not autocast else torch.bfloat16).eps
    for i, what in enumerate(("loss", "x grad", "w grad")):
        ours, theirs = errors["triton"][i], errors["torch"][i]
        assert ours <= max(3 * theirs, eps / 16), f"{what}: triton {ours:.3g} vs torch {theirs:.3g}"
    print(f"\n{dtype} autocast={autocast}: rel. errors (loss, gx, gw) triton {errors['triton']}, "
          f"torch {errors['torch']}")


def test_sampled_and_sparse_match_the_torch_path_and_the_oracle():
    """Partial FC sampling (the sampled rows are gathered before the loss) with dense and sparse
    gradients: loss = the oracle's over the sampled classes; gradients = the torch path's, which the
    sampling tests check against the oracle."""
    setup = _setup("arcface")
    sizes = [[19]]
    for sparse in (False, True):
        kw = dict(sample_rate=0.3, sparse_grad=sparse)
        ours = run(setup, sizes, {**kw, **TRITON})
        ref = run(setup, sizes, {**kw, "impl": "torch"})
        check_sampled(setup, ours, sizes[0], partial(_oracle, "arcface"), {})
        assert torch.equal(ours[0][0]["sampled"], ref[0][0]["sampled"])
        assert ours[0][0]["loss"] == pytest.approx(ref[0][0]["loss"], rel=1e-12)
        torch.testing.assert_close(ours[0][0]["x_grad"], ref[0][0]["x_grad"], rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(ours[0][0]["w_grad"], ref[0][0]["w_grad"], rtol=1e-10, atol=1e-13)


def _sharded(rank, world):
    """On each of 2 gloo ranks: float64 and float32 heads against the oracle, uneven batches, an empty
    rank, an all-empty step, sampling with a sparse gradient."""
    torch.manual_seed(0)
    out = []
    for step, sizes in enumerate([[7, 4], [0, 9], [6, 0], [0, 0]]):
        name = ("combined", "sphereface", "arcface", "cosface")[step]
        margin = MARGINS[name]
        xs, ys = _batch(step, sizes)
        x_all, y_all = torch.cat(xs), torch.cat(ys)
        w_all = torch.randn(C, D, generator=torch.Generator().manual_seed(step), dtype=torch.float64)
        ref = reference_grads(x_all, w_all, y_all, **_margin_kwargs(margin)) if y_all.numel() else None
        start, end = shard_bounds(C, world, rank)
        lo = sum(sizes[:rank])
        for dtype in (torch.float64, torch.float32):
            head = PartialFC(D, C, margin=margin, impl="triton", dtype=dtype)
            with torch.no_grad():
                head.weight.copy_(w_all[start:end])
            x = xs[rank].detach().to(dtype).clone().requires_grad_()
            loss = head(x, ys[rank])
            loss.backward()
            if ref is None:
                assert loss.item() == 0.0 and head.weight.grad.abs().max().item() == 0.0
                continue
            tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
            torch.testing.assert_close(loss.detach().double(), ref[0], **tol)
            torch.testing.assert_close(head.weight.grad.double(), ref[2][start:end], **tol)
            if sizes[rank]:  # an empty rank's embeddings get no gradient
                torch.testing.assert_close(x.grad.double(), world * ref[1][lo: lo + sizes[rank]], **tol)
            out.append((name, str(dtype), float((head.weight.grad.double() - ref[2][start:end]).abs().max())))
    # sampling + sparse gradient on 2 ranks: the same as the torch path
    xs, ys = _batch(9, [5, 8])
    grads = []
    for impl in ("triton", "torch"):
        head = PartialFC(D, C, margin=MARGINS["arcface"], impl=impl, sample_rate=0.25, sparse_grad=True,
                         dtype=torch.float64)
        x = xs[rank].clone().requires_grad_()
        loss = head(x, ys[rank])
        loss.backward()
        assert head.weight.grad.is_sparse
        grads.append((loss.detach(), x.grad, head.weight.grad.to_dense()))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
    return out


def test_two_ranks_match_the_oracle():
    results = run_distributed(_sharded, 2)
    assert all(len(r) == 6 for r in results)


def test_adaface_two_ranks_uneven_and_empty():
    sizes = [[4, 0], [3, 5]]
    results = run(test_adaface.SETUP, sizes, TRITON)
    check_against_oracle(test_adaface.SETUP, results, sizes, test_adaface._oracle, test_adaface.INITIAL,
                         state_tol=dict(rel=1e-12))


def _storages(tree) -> set:
    flat = tree if isinstance(tree, (tuple, list)) else (tree,)
    ptrs = {t.untyped_storage().data_ptr() for t in flat if isinstance(t, torch.Tensor) and t.numel()}
    return ptrs | {t.data_ptr() for t in flat if isinstance(t, (torch.UntypedStorage, torch.TypedStorage))}


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an operator creates: outputs whose storage
    is not one of the inputs' (views, in-place results and the interpreter's ``set_`` views of kernel
    arguments allocate nothing and are not counted)."""

    def __init__(self):
        super().__init__()
        self.largest, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = _storages(list(args) + list(kwargs.values()))
        out = func(*args, **kwargs)
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.numel() > self.largest and \
                    t.untyped_storage().data_ptr() not in inputs:
                self.largest, self.op = t.numel(), func
        return out


@pytest.mark.parametrize("sample_rate", [1.0, 0.5])
def test_no_tensor_of_batch_times_classes(sample_rate):
    """forward + backward of the triton path create no tensor of B x C_local elements or more
    (C x d, the largest legitimate one, the weight's gradient, is at most half of it here); the torch
    path does (the mode sees it)."""
    b, d = 64, 16
    xs, ys = _batch(0, [b], d=d)
    largest = {}
    for impl in ("triton", "torch"):
        head = PartialFC(d, C, margin=MARGINS["arcface"], impl=impl, sample_rate=sample_rate)
        x = xs[0].float().requires_grad_()
        with _LargestTensor() as mode:
            head(x, ys[0]).backward()
        c_local = int(head.sampled_index.numel()) if sample_rate < 1 else C
        largest[impl] = (mode.largest, str(mode.op))
        assert C * d <= b * c_local // 2
    assert largest["triton"][0] < b * c_local, largest
    assert largest["torch"][0] >= b * c_local, largest
    print(f"\nsample_rate={sample_rate}: B x C_local = {b * c_local}, largest tensor {largest}")


def test_grad_filter_falls_back_to_the_torch_path_with_a_warning(monkeypatch):
    """``grad_filter`` is not fused: same result as impl="torch", with a warning. (Sub-centers and
    CurricularFace are fused: tests/test_triton_extensions.py.)"""
    monkeypatch.setattr(triton_softmax, "_warned", set())  # the warning is given once per process
    xs, ys = _batch(1, [12], d=8, c=40)
    results = []
    for impl in ("triton", "torch"):
        head = PartialFC(8, 40, impl=impl, dtype=torch.float64, grad_filter=True)
        x = xs[0].clone().requires_grad_()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loss = head(x, ys[0])
        if impl == "triton":
            assert any("grad_filter" in str(w.message) and "torch path" in str(w.message) for w in caught)
        loss.backward()
        results.append((loss.detach(), x.grad, head.weight.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_impl_is_validated(monkeypatch):
    with pytest.raises(ValueError, match="impl must be one of"):
        PartialFC(8, 10, impl="cuda")
    head = PartialFC(8, 10, impl="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        head(torch.randn(3, 8), torch.tensor([1, 2, 3]))
    # "auto" on CPU is the torch path, with or without the interpreter
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton_softmax.TritonMarginSoftmaxCrossEntropy, "apply",
                        lambda *a: pytest.fail("auto used triton on the CPU"))
    PartialFC(8, 10)(torch.randn(3, 8), torch.tensor([1, 2, 3]))


def test_library_imports_without_triton():
    """The triton extra is optional: with triton unimportable, "auto" and "torch" work and "triton"
    is a clear error at construction."""
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, partialfc\n"
            "head = partialfc.PartialFC(8, 10)\n"
            "head(torch.randn(3, 8), torch.tensor([1, 2, 3])).backward()\n"
            "try:\n"
            "    partialfc.PartialFC(8, 10, impl='triton')\n"
            "except ValueError as e:\n"
            "    assert 'pip install' in str(e), e\n"
            "else:\n"
            "    raise SystemExit('no error')\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr


def test_benchmark_variant_steps_on_one_rank():
    """The opt-in "triton" row of the benchmark builds and steps, and the planner predicts it (through
    the custom ops' fake implementations) below the materialized head by at least the logits."""
    from benchmarks import BenchConfig
    from benchmarks.memory import predict
    from benchmarks.variants import Case
    cfg = BenchConfig(classes_per_rank=300, embedding_size=8, batch_per_rank=6, chunk_size=64, world_size=1)
    case = Case("triton", cfg, torch.device("cpu"))
    case.step()
    assert case.head.impl == "triton" and case.head.weight.grad is not None
    fused, plain = predict(cfg, "triton", "cpu"), predict(cfg, "materialized", "cpu")
    logits = cfg.batch_per_rank * cfg.world_size * cfg.classes_per_rank * 4
    assert fused["peak"] <= plain["peak"] - logits, (fused["peak"], plain["peak"])


def _peaked_on_ranks(rank, world, impl, angle):
    """This rank's float32 loss and gradients for one peaked global batch of 12 rows (5 / 7 on two
    ranks), with the global problem that every rank builds alike."""
    from tests.test_head import _peaked_batch
    g = torch.Generator().manual_seed(11)
    w_all = torch.randn(C, 32, generator=g)
    head = PartialFC(32, C, margin=CombinedMargin.arcface(s=64.0, m=0.5), impl=impl)
    start, end = shard_bounds(C, world, rank)
    with torch.no_grad():
        head.weight.copy_(w_all[start:end])
    full = PartialFC(32, C, group=None) if world == 1 else None
    if full is None:  # a stand-in with all rows, to draw the batch from
        full = torch.nn.Module()
        full.weight, full.num_classes = torch.nn.Parameter(w_all), C
    else:
        full.weight.data.copy_(w_all)
    x, labels = _peaked_batch(full, 12, angle, seed=7)
    lo, hi = (0, 12) if world == 1 else ((0, 5), (5, 12))[rank]
    xr = x[lo:hi].clone().requires_grad_()
    loss = head(xr, labels[lo:hi])
    loss.backward()
    return {"loss": loss.detach(), "gx": xr.grad / world, "gw": head.weight.grad, "x": x, "labels": labels,
            "weight": w_all}


@pytest.mark.parametrize("impl,world", [("triton", 1), ("torch", 2), ("triton", 2)])
def test_float32_keeps_its_precision_when_the_target_dominates(impl, world):
    """As tests/test_head.py's test of that name, through the kernels and across two ranks (the
    non-target sum-exp is all-reduced next to the total): 1 - p_y < 1e-6, float32 loss and gradients
    within 2e-3 of the float64 oracle (far off when 1 - p_y came from p_y - 1)."""
    results = run_distributed(_peaked_on_ranks, world, impl, 3)
    x, labels, weight = results[0]["x"], results[0]["labels"], results[0]["weight"]
    margin = CombinedMargin.arcface(s=64.0, m=0.5)
    ref_loss, ref_gx, ref_gw = reference_grads(x, weight, labels, **_margin_kwargs(margin))
    assert float(ref_loss) < 1e-6
    gx = torch.cat([r["gx"] for r in results])  # DDP convention undone: world x the exact gradient
    gw = torch.cat([r["gw"] for r in results])
    for r in results:
        assert abs(float(r["loss"]) - float(ref_loss)) <= 2e-3 * float(ref_loss)
    for got, want in ((gx, ref_gx), (gw, ref_gw)):
        assert float((got.double() - want).norm() / want.norm()) <= 2e-3
