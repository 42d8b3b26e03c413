"""Tests for partialfc.optim.SparseSGD against independent oracles."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from partialfc.optim import SparseSGD

HYPER = [
    dict(momentum=0.0, weight_decay=0.0, nesterov=False, dampening=0.0),
    dict(momentum=0.9, weight_decay=0.0, nesterov=False, dampening=0.0),
    dict(momentum=0.9, weight_decay=5e-2, nesterov=False, dampening=0.0),
    dict(momentum=0.8, weight_decay=1e-2, nesterov=True, dampening=0.0),
    dict(momentum=0.7, weight_decay=1e-2, nesterov=False, dampening=0.3),
    dict(momentum=0.0, weight_decay=1e-1, nesterov=False, dampening=0.0),
]


def _coo(indices: torch.Tensor, values: torch.Tensor, shape) -> torch.Tensor:
    """Sparse COO tensor built with invariant checks on."""
    return torch.sparse_coo_tensor(indices, values, shape, check_invariants=True)


def _row_sparse(dense: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Row-sparse COO gradient holding `dense[rows]` (rows over dim 0)."""
    return _coo(rows.unsqueeze(0), dense[rows], dense.shape)


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def _exact(a: torch.Tensor, b: torch.Tensor) -> None:
    """Bitwise equality: the same elementwise ops as torch.optim.SGD (foreach=False)."""
    assert a.dtype == b.dtype and torch.equal(a, b), (a - b).abs().max()


@pytest.mark.parametrize("hp", HYPER)
def test_matches_torch_sgd_when_every_row_present(hp):
    torch.manual_seed(0)
    w0 = torch.randn(11, 5)
    w_ref = torch.nn.Parameter(w0.clone())
    w_sp = torch.nn.Parameter(w0.clone())
    ref = torch.optim.SGD([w_ref], lr=0.1, foreach=False, **hp)
    opt = SparseSGD([w_sp], lr=0.1, **hp)
    for step in range(5):
        g = torch.randn(11, 5)
        w_ref.grad = g.clone()
        # every row present, in a scrambled order
        w_sp.grad = _row_sparse(g, torch.randperm(11))
        ref.step()
        opt.step()
        _exact(w_sp.data, w_ref.data)
        if hp["momentum"]:
            _exact(opt.state[w_sp]["momentum_buffer"], ref.state[w_ref]["momentum_buffer"])


@pytest.mark.parametrize("hp", HYPER)
def test_dense_grads_match_torch_sgd(hp):
    torch.manual_seed(1)
    model_ref = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    model = copy.deepcopy(model_ref)
    ref = torch.optim.SGD(model_ref.parameters(), lr=0.05, foreach=False, **hp)
    opt = SparseSGD(model.parameters(), lr=0.05, **hp)
    for _ in range(4):
        x = torch.randn(8, 6)
        for m, o in ((model_ref, ref), (model, opt)):
            o.zero_grad(set_to_none=True)
            m(x).square().sum().backward()
            o.step()
    for a, b in zip(model.parameters(), model_ref.parameters()):
        _exact(a.data, b.data)


def _reference_rows(w, buf, seen, grad_rows, rows, lr, momentum, weight_decay, nesterov, dampening):
    """Independent per-row loop implementing the documented lazy update."""
    for k, r in enumerate(rows.tolist()):
        g = grad_rows[k] + weight_decay * w[r]
        if momentum != 0:
            if seen[r]:
                buf[r] = momentum * buf[r] + (1 - dampening) * g
            else:
                buf[r] = g.clone()
                seen[r] = True
            upd = g + momentum * buf[r] if nesterov else buf[r]
        else:
            upd = g
        w[r] = w[r] - lr * upd


@pytest.mark.parametrize("hp", HYPER)
def test_partial_rows_lazy_update(hp):
    torch.manual_seed(2)
    n, d, lr = 20, 4, 0.2
    w = torch.nn.Parameter(torch.randn(n, d, dtype=torch.float64))
    opt = SparseSGD([w], lr=lr, **hp)
    ref_w = w.detach().clone()
    ref_buf = torch.zeros(n, d, dtype=torch.float64)
    seen = [False] * n
    for step in range(6):
        rows = torch.randperm(n)[: 7].sort().values
        grad_rows = torch.randn(7, d, dtype=torch.float64)
        w.grad = _coo(rows.unsqueeze(0), grad_rows, (n, d))
        before_w = w.detach().clone()
        before_buf = opt.state[w]["momentum_buffer"].clone() if hp["momentum"] and step else None
        opt.step()
        _reference_rows(ref_w, ref_buf, seen, grad_rows, rows, lr, **hp)

        absent = torch.ones(n, dtype=torch.bool)
        absent[rows] = False
        # unsampled rows: bit-identical values and momentum
        assert torch.equal(w.detach()[absent], before_w[absent])
        if before_buf is not None:
            assert torch.equal(opt.state[w]["momentum_buffer"][absent], before_buf[absent])
        # sampled rows follow the independent reference
        torch.testing.assert_close(w.detach(), ref_w, rtol=1e-12, atol=1e-12)
        if hp["momentum"]:
            torch.testing.assert_close(
                opt.state[w]["momentum_buffer"][~absent], ref_buf[~absent], rtol=1e-12, atol=1e-12
            )
    # some rows must actually have moved, otherwise the test proves nothing
    assert not torch.equal(w.detach(), before_w)


def test_duplicate_indices_are_summed():
    torch.manual_seed(3)
    w0 = torch.randn(6, 3)
    a = torch.nn.Parameter(w0.clone())
    b = torch.nn.Parameter(w0.clone())
    oa = SparseSGD([a], lr=0.3, momentum=0.9, weight_decay=0.01)
    ob = SparseSGD([b], lr=0.3, momentum=0.9, weight_decay=0.01)
    vals = torch.randn(4, 3)
    dup = torch.tensor([[1, 4, 1, 1]])
    a.grad = _coo(dup, vals, (6, 3))  # uncoalesced
    assert not a.grad.is_coalesced()
    summed = torch.stack([vals[0] + vals[2] + vals[3], vals[1]])
    b.grad = _coo(torch.tensor([[1, 4]]), summed, (6, 3))
    oa.step()
    ob.step()
    _close(a.data, b.data)
    # against the plain formula too: first step, buf = g, p -= lr * g
    expected = w0.clone()
    expected[1] -= 0.3 * (summed[0] + 0.01 * w0[1])
    expected[4] -= 0.3 * (summed[1] + 0.01 * w0[4])
    _close(a.data, expected)


def test_embedding_sparse_grad_float64():
    torch.manual_seed(4)
    n, d = 30, 8
    w0 = torch.randn(n, d, dtype=torch.float64)
    w = torch.nn.Parameter(w0.clone())
    w_dense = torch.nn.Parameter(w0.clone())
    opt = SparseSGD([w], lr=0.1, momentum=0.9, weight_decay=1e-3)
    # every row sampled (with duplicates) -> must equal dense SGD on the same loss
    ref = torch.optim.SGD([w_dense], lr=0.1, momentum=0.9, weight_decay=1e-3, foreach=False)
    for _ in range(3):
        idx = torch.cat([torch.arange(n), torch.randint(0, n, (10,))])[torch.randperm(n + 10)]
        target = torch.randn(idx.numel(), d, dtype=torch.float64)
        opt.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
        (F.embedding(idx, w, sparse=True) * target).sum().backward()
        (F.embedding(idx, w_dense) * target).sum().backward()
        assert w.grad.is_sparse and w.dtype == torch.float64
        opt.step()
        ref.step()
        torch.testing.assert_close(w.data, w_dense.data, rtol=1e-12, atol=1e-12)
    # a sparse step that samples only a few rows leaves the others untouched
    before = w.detach().clone()
    idx = torch.tensor([2, 5, 5])
    opt.zero_grad(set_to_none=True)
    F.embedding(idx, w, sparse=True).sum().backward()
    opt.step()
    moved = (w.detach() != before).any(dim=1)
    assert moved.nonzero().flatten().tolist() == [2, 5]


def test_lr_scheduler_changes_lr():
    w = torch.nn.Parameter(torch.zeros(4, 2))
    opt = SparseSGD([w], lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    expected = torch.zeros(4, 2)
    for lr in (1.0, 0.5, 0.25):
        assert opt.param_groups[0]["lr"] == pytest.approx(lr)
        w.grad = _row_sparse(torch.ones(4, 2), torch.tensor([0, 3]))
        opt.step()
        expected[[0, 3]] -= lr
        sched.step()
    assert torch.equal(w.detach(), expected)


def test_state_dict_round_trip_continues_identically():
    torch.manual_seed(5)
    n, d = 16, 3
    w_a = torch.nn.Parameter(torch.randn(n, d))
    bias_a = torch.nn.Parameter(torch.randn(d))
    opt_a = SparseSGD(
        [{"params": [w_a]}, {"params": [bias_a], "lr": 0.01}],
        lr=0.1, momentum=0.9, weight_decay=1e-2, dampening=0.1,
    )
    grads = [
        (torch.randperm(n)[:5], torch.randn(5, d), torch.randn(d)) for _ in range(6)
    ]

    def apply(opt, w, bias, g):
        rows, vals, gb = g
        w.grad = _coo(rows.unsqueeze(0), vals, (n, d))
        bias.grad = gb.clone()
        opt.step()

    for g in grads[:3]:
        apply(opt_a, w_a, bias_a, g)
    saved = copy.deepcopy(opt_a.state_dict())
    w_b = torch.nn.Parameter(w_a.detach().clone())
    bias_b = torch.nn.Parameter(bias_a.detach().clone())
    opt_b = SparseSGD([{"params": [w_b]}, {"params": [bias_b]}], lr=0.5)
    opt_b.load_state_dict(saved)
    assert opt_b.param_groups[1]["lr"] == 0.01
    assert opt_b.state[w_b]["row_initialized"].dtype == torch.bool
    for g in grads[3:]:
        apply(opt_a, w_a, bias_a, g)
        apply(opt_b, w_b, bias_b, g)
    assert torch.equal(w_a.detach(), w_b.detach())
    assert torch.equal(bias_a.detach(), bias_b.detach())


def test_closure_and_zero_grad():
    w = torch.nn.Parameter(torch.ones(3, 2))
    opt = SparseSGD([w], lr=0.5)

    def closure():
        opt.zero_grad(set_to_none=True)
        loss = F.embedding(torch.tensor([1]), w, sparse=True).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() == pytest.approx(2.0)
    assert torch.equal(w.detach(), torch.tensor([[1.0, 1.0], [0.5, 0.5], [1.0, 1.0]]))
    opt.zero_grad(set_to_none=True)
    assert w.grad is None
    opt.step()  # no grad: no-op
    assert torch.equal(w.detach()[1], torch.tensor([0.5, 0.5]))


def test_mixed_sparse_then_dense_follows_first_step_rule():
    torch.manual_seed(6)
    w0 = torch.randn(5, 2)
    w = torch.nn.Parameter(w0.clone())
    opt = SparseSGD([w], lr=0.1, momentum=0.9, dampening=0.5)
    g1 = torch.randn(5, 2)
    w.grad = _row_sparse(g1, torch.tensor([0, 2]))
    opt.step()
    g2 = torch.randn(5, 2)
    w.grad = g2.clone()
    opt.step()
    buf = opt.state[w]["momentum_buffer"]
    expected = g2.clone()  # rows 1, 3, 4: first touch -> buf = g
    expected[[0, 2]] = 0.9 * g1[[0, 2]] + 0.5 * g2[[0, 2]]
    _close(buf, expected)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lr=-0.1), "learning rate"),
        (dict(lr=0.1, momentum=-0.5), "momentum"),
        (dict(lr=0.1, weight_decay=-1.0), "weight_decay"),
        (dict(lr=0.1, nesterov=True), "nesterov"),
        (dict(lr=0.1, momentum=0.9, nesterov=True, dampening=0.1), "dampening"),
    ],
)
def test_argument_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SparseSGD([torch.nn.Parameter(torch.zeros(2))], **kwargs)


def test_rejects_elementwise_sparse_grad():
    w = torch.nn.Parameter(torch.zeros(3, 3))
    opt = SparseSGD([w], lr=0.1)
    w.grad = torch.zeros(3, 3).to_sparse()  # sparse_dim == 2
    with pytest.raises(ValueError, match="sparse_dim"):
        opt.step()
