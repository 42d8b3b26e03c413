"""Single-process head: loss and gradients against the float64 oracle and pytorch-metric-learning."""
import math

import pytest
import torch

from partialfc import CombinedMargin, PartialFC, margin_softmax_cross_entropy
from tests.oracle import reference_grads, reference_loss

MARGINS = {
    "arcface": CombinedMargin.arcface(s=16.0, m=0.5),
    "arcface_linear": CombinedMargin.arcface(s=16.0, m=0.5, extension="linear"),
    "arcface_none": CombinedMargin(s=16.0, m2=0.5, extension="none"),
    "cosface": CombinedMargin.cosface(s=16.0, m=0.35),
    "sphereface": CombinedMargin.sphereface(s=16.0, m=1.7),
    "combined": CombinedMargin(s=16.0, m1=1.2, m2=0.3, m3=0.15),
    "softmax": CombinedMargin.softmax(s=16.0),
    "arcface_st": CombinedMargin.arcface(s=16.0, m=0.5, straight_through=True),
}


def margin_kwargs(m: CombinedMargin) -> dict:
    return dict(s=m.s, m1=m.m1, m2=m.m2, m3=m.m3, extension=m.extension, straight_through=m.straight_through)


def make_head(d, c, margin, **kw):
    return PartialFC(d, c, margin=margin, **kw).double()


def run_head(head, x, labels):
    x = x.detach().clone().requires_grad_()
    head.zero_grad(set_to_none=True)
    loss = head(x, labels)
    loss.backward()
    return loss.detach(), x.grad, head.weight.grad


@pytest.mark.parametrize("name", list(MARGINS))
@pytest.mark.parametrize("chunk_size", [None, 7])
def test_matches_oracle(name, chunk_size):
    margin = MARGINS[name]
    torch.manual_seed(0)
    d, c, b = 12, 37, 19
    head = make_head(d, c, margin, chunk_size=chunk_size)
    x = torch.randn(b, d, dtype=torch.float64) * 3
    labels = torch.randint(0, c, (b,))
    labels[4] = -100
    loss, gx, gw = run_head(head, x, labels)
    ref_loss, ref_gx, ref_gw = reference_grads(x, head.weight, labels, **margin_kwargs(margin))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, ref_gx, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gw, ref_gw, rtol=1e-9, atol=1e-12)


def test_straight_through_differs_from_exact():
    """insightface's convention (dpsi/dcos = 1) changes the target gradient; ours does not by default."""
    torch.manual_seed(1)
    x, labels = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 10, (8,))
    exact = run_head(make_head(6, 10, MARGINS["arcface"]), x, labels)
    st = run_head(make_head(6, 10, MARGINS["arcface_st"]), x, labels)
    torch.testing.assert_close(exact[0], st[0])
    assert float((exact[2] - st[2]).abs().max()) > 1e-3


@pytest.mark.parametrize("name", ["arcface", "sphereface", "combined", "arcface_none"])
def test_gradcheck_single_rank(name):
    torch.manual_seed(2)
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 3, 8, -1, 5])
    valid = torch.tensor([True, True, True, False, True])
    for chunk in (None, 4):
        fn = lambda x, w: margin_softmax_cross_entropy(x, w, target, valid, MARGINS[name], None, chunk)[0]
        assert torch.autograd.gradcheck(fn, (x, w), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("pml_name", ["arcface", "cosface", "sphereface"])
def test_against_pytorch_metric_learning(pml_name):
    """A second, third-party oracle, with its conventions (degrees, (d, C) weights, norm scaling)."""
    losses = pytest.importorskip("pytorch_metric_learning.losses")
    torch.manual_seed(3)
    d, c, b, s = 10, 23, 16, 16.0
    if pml_name == "arcface":
        margin = CombinedMargin.arcface(s=s, m=0.5, extension="linear")
        pml = losses.ArcFaceLoss(c, d, margin=math.degrees(0.5), scale=s)
    elif pml_name == "cosface":
        margin = CombinedMargin.cosface(s=s, m=0.35)
        pml = losses.CosFaceLoss(c, d, margin=0.35, scale=s)
    else:
        margin = CombinedMargin.sphereface(s=s, m=3)
        pml = losses.SphereFaceLoss(c, d, margin=3, scale=s)
    pml = pml.double()
    head = make_head(d, c, margin)
    pml.W.data = head.weight.detach().t().clone()
    x = torch.nn.functional.normalize(torch.randn(b, d, dtype=torch.float64), dim=1)
    labels = torch.randint(0, c, (b,))
    loss, gx, gw = run_head(head, x, labels)
    xp = x.clone().requires_grad_()
    ref = pml(xp, labels)
    ref.backward()
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gw, pml.W.grad.t(), rtol=1e-8, atol=1e-10)
    tangential = xp.grad - (xp.grad * x).sum(1, keepdim=True) * x  # pml scales by |x| in SphereFace
    torch.testing.assert_close(gx, tangential, rtol=1e-8, atol=1e-10)


def test_inputs_not_mutated_and_int32_labels():
    torch.manual_seed(4)
    head = make_head(6, 11, MARGINS["arcface"])
    x = torch.randn(7, 6, dtype=torch.float64)
    labels = torch.randint(0, 11, (7,), dtype=torch.int32)
    x_copy, labels_copy, w_copy = x.clone(), labels.clone(), head.weight.detach().clone()
    loss, _, _ = run_head(head, x, labels)
    assert torch.equal(x, x_copy) and torch.equal(labels, labels_copy) and torch.equal(head.weight.detach(), w_copy)
    torch.testing.assert_close(loss, reference_loss(x, head.weight.detach(), labels.long(),
                                                    **margin_kwargs(MARGINS["arcface"])))


def test_all_rows_ignored_gives_zero_loss_and_gradient():
    head = make_head(4, 5, MARGINS["arcface"])
    loss, gx, gw = run_head(head, torch.randn(3, 4, dtype=torch.float64), torch.full((3,), -100))
    assert float(loss) == 0.0 and float(gx.abs().max()) == 0.0 and float(gw.abs().max()) == 0.0


def test_empty_batch():
    head = make_head(4, 5, MARGINS["arcface"])
    loss, gx, gw = run_head(head, torch.randn(0, 4, dtype=torch.float64), torch.zeros(0, dtype=torch.long))
    assert float(loss) == 0.0 and gx.shape == (0, 4) and float(gw.abs().max()) == 0.0


def test_validate_off_gives_same_result():
    torch.manual_seed(5)
    x, labels = torch.randn(9, 8, dtype=torch.float64), torch.randint(0, 20, (9,))
    a = run_head(make_head(8, 20, MARGINS["combined"]), x, labels)
    b = run_head(make_head(8, 20, MARGINS["combined"], validate=False, uniform_batch=True), x, labels)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_repeated_backward_with_retain_graph(chunk_size):
    """The materialized buffer is consumed in place by the first backward; a second one recomputes."""
    head = make_head(4, 6, MARGINS["arcface"], chunk_size=chunk_size)
    loss = head(torch.randn(3, 4, dtype=torch.float64), torch.tensor([0, 1, 2]))
    loss.backward(retain_graph=True)
    first = head.weight.grad.clone()
    loss.backward()
    torch.testing.assert_close(head.weight.grad, 2 * first, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("bad,match", [
    (lambda: (torch.randn(4, 7), torch.zeros(4, dtype=torch.long)), "width 7"),
    (lambda: (torch.randn(4, 8, 1), torch.zeros(4, dtype=torch.long)), "2-D"),
    (lambda: (torch.randn(4, 8), torch.zeros(4, 1, dtype=torch.long)), "1-D"),
    (lambda: (torch.randn(4, 8), torch.zeros(4)), "integer"),
    (lambda: (torch.randn(4, 8), torch.zeros(5, dtype=torch.long)), "4 rows but labels have 5"),
    (lambda: (torch.randn(4, 8), torch.tensor([0, 1, 20, 3])), r"outside \[0, 20\).*e\.g\. 20"),
    (lambda: (torch.randn(4, 8), torch.tensor([0, -5, 2, 3])), r"e\.g\. -5"),
    (lambda: (torch.tensor([[float("nan")] * 8] * 2), torch.tensor([0, 1])), "non-finite"),
    (lambda: (torch.zeros(2, 8, dtype=torch.long), torch.tensor([0, 1])), "floating-point"),
])
def test_bad_input_errors(bad, match):
    head = PartialFC(8, 20)
    x, labels = bad()
    with pytest.raises(ValueError, match=match):
        head(x, labels)


@pytest.mark.parametrize("kwargs,match", [
    (dict(sample_rate=0.0), "sample_rate"), (dict(sample_rate=1.5), "sample_rate"),
    (dict(chunk_size=0), "chunk_size"), (dict(margin="arcface"), "CombinedMargin")])
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        PartialFC(8, 20, **kwargs)


def test_bf16_autocast_error_is_that_of_a_bf16_reference():
    """Tolerance from a same-dtype reference's own error against float64, not a magic number."""
    torch.manual_seed(6)
    d, c, b = 32, 300, 24
    margin = CombinedMargin.arcface(s=32.0, m=0.5)
    head = PartialFC(d, c, margin=margin)
    x = torch.randn(b, d)
    labels = torch.randint(0, c, (b,))
    exact, gx64, gw64 = reference_grads(x.double(), head.weight.double(), labels, **margin_kwargs(margin))
    xb = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = head(xb, labels)
    loss.backward()
    assert loss.dtype == torch.float32
    # bf16 reference: the plain oracle with bf16-rounded inputs to its matrix product
    wb = head.weight.detach().bfloat16().double()
    ref_b = reference_loss(x.bfloat16().double(), wb, labels, **margin_kwargs(margin))
    ref_err = abs(float(ref_b) - float(exact))
    assert abs(float(loss) - float(exact)) <= 4 * ref_err + 1e-2 * float(exact)
    rel_gw = float((head.weight.grad.double() - gw64).norm() / gw64.norm())
    rel_gx = float((xb.grad.double() - gx64).norm() / gx64.norm())
    assert rel_gw < 0.05 and rel_gx < 0.05


def test_fp32_matches_float64_oracle():
    torch.manual_seed(7)
    head = PartialFC(16, 50, margin=MARGINS["combined"], chunk_size=16)
    x, labels = torch.randn(10, 16), torch.randint(0, 50, (10,))
    loss, gx, gw = run_head(head, x, labels)
    ref = reference_grads(x.double(), head.weight.double(), labels, **margin_kwargs(MARGINS["combined"]))
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw.double(), ref[2], rtol=1e-4, atol=1e-4 * float(ref[2].abs().max()))


def test_state_dict_round_trip_keeps_step():
    head = PartialFC(4, 6)
    head(torch.randn(2, 4), torch.tensor([0, 1]))
    other = PartialFC(4, 6, seed=9)
    other.load_state_dict(head.state_dict())
    assert other.step == 1 and torch.equal(other.weight, head.weight)


def test_gradient_accumulation_of_half_batches_equals_full_batch():
    """Two equal micro-batches, each loss / 2, accumulate to the full batch's gradient (train.py's rule)."""
    torch.manual_seed(8)
    x, y = torch.randn(10, 6, dtype=torch.float64), torch.randint(0, 15, (10,))
    full = make_head(6, 15, MARGINS["combined"])
    _, gx_full, gw_full = run_head(full, x, y)
    acc = make_head(6, 15, MARGINS["combined"])
    xx = x.clone().requires_grad_()
    for part in (slice(0, 5), slice(5, 10)):
        (acc(xx[part], y[part]) / 2).backward()
    torch.testing.assert_close(acc.weight.grad, gw_full, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(xx.grad, gx_full, rtol=1e-12, atol=1e-14)


def test_fp16_autocast_runs_and_is_close():
    torch.manual_seed(9)
    head = PartialFC(16, 100, margin=CombinedMargin.cosface(s=16.0, m=0.3))
    x, y = torch.randn(12, 16), torch.randint(0, 100, (12,))
    exact = reference_loss(x.double(), head.weight.double(), y, s=16.0, m1=1.0, m2=0.0, m3=0.3)
    xx = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.float16):
        loss = head(xx, y)
    loss.backward()
    assert loss.dtype == torch.float32 and bool(torch.isfinite(xx.grad).all())
    assert abs(float(loss.detach()) - float(exact)) < 0.02 * float(exact)


def test_bf16_parameters_match_float64_oracle():
    """bf16 weights and embeddings (no autocast): the gradient comes back in bf16, close to float64."""
    torch.manual_seed(10)
    d, c, b = 32, 300, 24
    margin = CombinedMargin.arcface(s=32.0, m=0.5)
    for chunk in (None, 64):
        head = PartialFC(d, c, margin=margin, chunk_size=chunk).to(torch.bfloat16)
        x = torch.randn(b, d).bfloat16()
        labels = torch.randint(0, c, (b,))
        ref = reference_grads(x.double(), head.weight.double(), labels, **margin_kwargs(margin))
        xx = x.clone().requires_grad_()
        loss = head(xx, labels)
        loss.backward()
        assert head.weight.grad.dtype == torch.bfloat16 and xx.grad.dtype == torch.bfloat16
        assert abs(float(loss.detach()) - float(ref[0])) < 0.02 * float(ref[0])
        for got, want in ((xx.grad, ref[1]), (head.weight.grad, ref[2])):
            assert float((got.double() - want).norm() / want.norm()) < 0.05


def _peaked_batch(head, b, angle_deg, seed):
    """Embeddings ``angle_deg`` from their class's row (a random orthogonal direction), as late in
    training: with s 64 the target's probability is within 1e-8 (30 deg) or 1e-12 (20 deg) of 1."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, head.num_classes, (b,), generator=g)
    w = torch.nn.functional.normalize(head.weight.detach()[labels].double(), dim=1)
    u = torch.randn(w.shape, generator=g, dtype=torch.float64)
    u = torch.nn.functional.normalize(u - (u * w).sum(1, keepdim=True) * w, dim=1)
    theta = math.radians(angle_deg)
    return ((math.cos(theta) * w + math.sin(theta) * u) * 3).float(), labels


@pytest.mark.parametrize("angle", [20, 30])
@pytest.mark.parametrize("chunk_size", [None, 300])
def test_float32_keeps_its_precision_when_the_target_dominates(angle, chunk_size):
    """float32 head, float64 oracle on the same float32 values: the loss (~1e-8 and ~1e-12) and both
    gradients to float32 precision. The target's gradient is -(1 - p_y), which must come from the
    non-target mass: as ``p_y - 1`` in float32 it is 0 or rounding noise (the loss as
    ``log(sum) + max - target`` likewise), and both gradients were ~70 % off before."""
    torch.manual_seed(0)
    margin = CombinedMargin.arcface(s=64.0, m=0.5)
    head = PartialFC(256, 2000, margin=margin, chunk_size=chunk_size)
    x, labels = _peaked_batch(head, 16, angle, seed=angle)
    loss, gx, gw = run_head(head, x, labels)
    ref_loss, ref_gx, ref_gw = reference_grads(x, head.weight, labels, **margin_kwargs(margin))
    assert float(ref_loss) < 1e-7  # the regime this test is about
    assert abs(float(loss) - float(ref_loss)) <= 2e-3 * float(ref_loss)
    for got, want in ((gx, ref_gx), (gw, ref_gw)):
        assert float((got.double() - want).norm() / want.norm()) <= 2e-3
