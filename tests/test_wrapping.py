"""The head inside wrappers users apply to the whole model: DDP and FSDP2, on real gloo ranks.

The reference is the loop the library documents: only the backbone in DDP, the heads outside.
Before the fix, DDP around the whole model broadcast rank 0's rows to every rank and averaged the
gradients of different classes' rows (C divisible by the world size), or crashed on the shape check
(C not divisible); FSDP2 re-sharded the rows and silently gave wrong gradients.
"""
import copy

import pytest
import torch
from torch import nn

from tests.dist_utils import run_distributed

D = 8


class Block(nn.Module):
    """An unmodified user model: the heads sit two levels below the module that gets wrapped."""

    def __init__(self, num_classes, two_heads):
        super().__init__()
        from partialfc import CombinedMargin, PartialFC
        self.backbone = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, D))
        heads = {"arc": PartialFC(D, num_classes, margin=CombinedMargin.arcface(s=8.0, m=0.3), seed=1)}
        if two_heads:
            heads["cos"] = PartialFC(D, num_classes + 3, margin=CombinedMargin.cosface(s=8.0, m=0.2), seed=2)
        self.heads = nn.ModuleDict(heads)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x, y):
        emb = self.backbone(x)
        return sum(head(emb, y % head.num_classes) for head in self.heads.values())


class Model(nn.Module):
    def __init__(self, num_classes, two_heads):
        super().__init__()
        self.trunk = nn.ModuleDict({"block": Block(num_classes, two_heads)})

    def forward(self, x, y):
        return self.trunk["block"](x, y)


def _batch(rank, step, num_classes):
    g = torch.Generator().manual_seed(100 * step + rank)
    n = 5 + rank + step % 2  # uneven and changing per-rank batches
    return torch.randn(n, 6, generator=g), torch.randint(0, num_classes, (n,), generator=g)


def _heads(model):
    return [m for m in model.modules() if m.__class__.__name__ == "PartialFC"]


def _snapshot(model, opt):
    heads = _heads(model)
    return {"rows": [h.weight.detach().clone() for h in heads],
            "grads": [h.weight.grad.clone() for h in heads if h.weight.grad is not None],
            "momentum": [opt.state[h.weight]["momentum_buffer"].clone() for h in heads if h.weight in opt.state],
            "backbone_grads": [p.grad.clone() for n, p in model.named_parameters() if "backbone" in n and p.grad is not None]}


def _train(model, opt, rank, num_classes, steps, start=0):
    losses = []
    for step in range(start, start + steps):
        x, y = _batch(rank, step, num_classes)
        opt.zero_grad(set_to_none=True)
        loss = model(x, y)
        loss.backward()
        opt.step()
        losses.append(loss.detach().clone())
    return losses


def _ddp_whole_model(rank, world, num_classes, two_heads):
    """Returns (wrapped results, reference results) for the same seeds and data."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    model = Model(num_classes, two_heads)
    before = [h.weight.detach().clone() for h in _heads(model)]
    ref = copy.deepcopy(model)
    ddp = DDP(model)
    after_wrap = [h.weight.detach().clone() for h in _heads(model)]
    opt = torch.optim.SGD(ddp.parameters(), lr=0.5, momentum=0.9)
    losses = _train(ddp, opt, rank, num_classes, 3)
    wrapped = _snapshot(model, opt)

    # reference: the backbone alone in DDP, heads outside it
    ref_block = ref.trunk["block"]
    ref_block.backbone = DDP(ref_block.backbone)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5, momentum=0.9)
    ref_losses = _train(ref, ref_opt, rank, num_classes, 3)
    expected = _snapshot(ref, ref_opt)

    # the framework's own save -> load (every rank saves its state dict), then 2 more steps
    state, opt_state = copy.deepcopy(ddp.state_dict()), copy.deepcopy(opt.state_dict())
    torch.manual_seed(123)  # a fresh model with other backbone weights: everything must come from the state
    fresh = DDP(Model(num_classes, two_heads))
    fresh.load_state_dict(state)
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.5, momentum=0.9)
    fresh_opt.load_state_dict(opt_state)
    loaded = _snapshot(fresh.module, fresh_opt)
    more = _train(fresh, fresh_opt, rank, num_classes, 2, start=3)
    more_ref = _train(ref, ref_opt, rank, num_classes, 2, start=3)
    return {"before": before, "after_wrap": after_wrap, "losses": losses, "ref_losses": ref_losses,
            "wrapped": wrapped, "expected": expected, "loaded": loaded, "more": more, "more_ref": more_ref,
            "buffers": [b.clone() for b in model.buffers()]}


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y), (x - y).abs().max()


@pytest.mark.parametrize("num_classes,two_heads", [(10, False), (11, False), (10, True)])
def test_ddp_around_the_whole_model_equals_the_head_outside_loop(num_classes, two_heads):
    """DDP(model) with heads two levels deep: rows untouched by the construction broadcast, and
    after 3 steps and after save -> load the same rows, gradients and momentum as heads outside DDP."""
    results = run_distributed(_ddp_whole_model, 2, num_classes, two_heads)
    for r in results:
        _assert_same(r["after_wrap"], r["before"])
        _assert_same(r["losses"], r["ref_losses"])
        for key in ("rows", "grads", "momentum", "backbone_grads"):
            _assert_same(r["wrapped"][key], r["expected"][key])
        _assert_same(r["loaded"]["rows"], r["wrapped"]["rows"])
        _assert_same(r["loaded"]["momentum"], r["wrapped"]["momentum"])
        _assert_same(r["more"], r["more_ref"])
    # the ranks really hold different classes (the broadcast would have made them equal)
    if num_classes % 2 == 0:
        assert not torch.equal(results[0]["wrapped"]["rows"][0], results[1]["wrapped"]["rows"][0])


def _top_down(rank, world):
    """A head attached after its container joined the model: the hook cannot see it."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from partialfc import PartialFC, ignore_heads_for_ddp

    def build():
        torch.manual_seed(0)
        model = nn.Module()
        model.inner = nn.Module()
        model.inner.backbone = nn.Linear(6, D)
        model.inner.head = PartialFC(D, 10)  # registered into `inner`, which `model` already holds
        model.forward = lambda x, y: model.inner.head(model.inner.backbone(x), y)
        return model

    x, y = _batch(rank, 0, 10)
    message = None
    try:
        DDP(build())(x, y)
    except RuntimeError as err:
        message = str(err)
    model = ignore_heads_for_ddp(build())
    rows = model.inner.head.weight.detach().clone()
    ddp = DDP(model)
    ddp(x, y).backward()
    return message, torch.equal(rows, model.inner.head.weight.detach()), model.inner.head.weight.grad is not None


def test_ddp_with_a_head_attached_top_down_raises_naming_the_fix():
    """Trees built top-down escape the registration hook: the first forward must say what to call."""
    for message, rows_kept, has_grad in run_distributed(_top_down, 2):
        assert message is not None and "ignore_heads_for_ddp" in message
        assert rows_kept and has_grad


def _fsdp2(rank, world, num_classes):
    from torch.distributed.fsdp import fully_shard

    from partialfc import head_parameters

    torch.manual_seed(0)
    model = Model(num_classes, False)
    ref = copy.deepcopy(model)
    error = None
    try:
        fully_shard(copy.deepcopy(model))
    except ValueError as err:
        error = str(err)
    fully_shard(model, ignored_params=head_parameters(model))
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    losses = _train(model, opt, rank, num_classes, 3)
    head = _heads(model)[0]
    backbone_grads = [p.grad.full_tensor() for n, p in model.named_parameters() if "backbone" in n]

    from torch.nn.parallel import DistributedDataParallel as DDP
    ref.trunk["block"].backbone = DDP(ref.trunk["block"].backbone)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5, momentum=0.9)
    ref_losses = _train(ref, ref_opt, rank, num_classes, 3)
    ref_head = _heads(ref)[0]
    ref_backbone_grads = [p.grad for n, p in ref.named_parameters() if "backbone" in n]
    return (error, losses, ref_losses, head.weight.detach(), ref_head.weight.detach(), head.weight.grad,
            ref_head.weight.grad, backbone_grads, ref_backbone_grads)


@pytest.mark.parametrize("num_classes", [10, 11])
def test_fsdp2_names_ignored_params_and_then_matches_the_reference(num_classes):
    """fully_shard over a model with a head: a clear error at construction naming ignored_params;
    with the head's parameters ignored, the head's rows and gradients equal the reference loop."""
    for (error, losses, ref_losses, rows, ref_rows, grad, ref_grad, bb, ref_bb) in \
            run_distributed(_fsdp2, 2, num_classes):
        assert error is not None and "ignored_params" in error and "head_parameters" in error
        torch.testing.assert_close(torch.stack(losses), torch.stack(ref_losses), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(rows, ref_rows, rtol=1e-5, atol=1e-7)
        for a, b in zip(bb, ref_bb):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_head_state_names_track_replacement():
    """The registration hook lists a head's names on every ancestor and forgets a replaced head."""
    from partialfc import PartialFC, head_state_names

    model = Model(10, True)
    expected = sorted(head_state_names(model))
    assert expected == ["trunk.block.heads.arc.weight", "trunk.block.heads.cos.weight"]
    assert sorted(model._ddp_params_and_buffers_to_ignore) == expected
    model.trunk["block"].heads["cos"] = nn.Linear(2, 2)  # replaced: DDP must synchronise it again
    assert list(model._ddp_params_and_buffers_to_ignore) == ["trunk.block.heads.arc.weight"]
    wrapper = nn.Module()
    wrapper._forward_module = model  # how Lightning wraps a LightningModule before DDP
    assert list(wrapper._ddp_params_and_buffers_to_ignore) == ["_forward_module.trunk.block.heads.arc.weight"]
    user = nn.Module()
    user._ddp_params_and_buffers_to_ignore = ["frozen.weight"]  # a name the user listed is kept
    user.frozen = nn.Linear(2, 2)
    user.model = model
    assert list(user._ddp_params_and_buffers_to_ignore) == ["frozen.weight", "model.trunk.block.heads.arc.weight"]
    clone = copy.deepcopy(user)
    del clone.model.trunk["block"].heads["arc"]
    assert list(clone._ddp_params_and_buffers_to_ignore) == ["frozen.weight"]
    assert list(user._ddp_params_and_buffers_to_ignore)[-1] == "model.trunk.block.heads.arc.weight"
    assert isinstance(model.trunk["block"].heads["arc"], PartialFC)
