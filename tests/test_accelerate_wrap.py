"""``accelerator.prepare(model)`` with a nested PartialFC head, and ``save_state`` / ``load_state``,
on 2 gloo CPU ranks (Accelerate adopts the process group tests.dist_utils already created).

Found and pinned here:
- ``prepare`` wraps the whole model in DDP; the head's rows are left alone (no broadcast of rank 0's
  rows) and 3 SGD steps give the plain loop's rows, gradients and momentum (head outside DDP).
- ``save_state`` writes model and optimizer from rank 0 only: ``load_state`` of such a folder raises
  the library's ValueError on rank 1 (rank 0 loads) instead of giving rank 1 rank 0's rows.
- ``partialfc.keep_all_shards_in_accelerate``: a ``register_save_state_pre_hook`` that consolidates
  the weights keeps every rank's rows; the optimizer file still holds rank 0's momentum only (there
  is no optimizer hook), so an ``OptimizerCheckpoint`` registered for checkpointing (custom objects
  load after the optimizer) restores each rank's momentum rows.
- ``save_state()``'s default ``safe_serialization=True`` failed on the head's ``_extra_state`` while
  it was a dict, which safetensors cannot store; it is now an int64 tensor and saves by default.
"""
import copy
import os

import pytest
import torch
from torch import nn

pytest.importorskip("accelerate")

from tests.dist_utils import run_distributed  # noqa: E402

D = 8


class Loss(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        from partialfc import CombinedMargin, PartialFC
        self.head = PartialFC(D, num_classes, margin=CombinedMargin.arcface(s=8.0, m=0.3), seed=3)


class Model(nn.Module):
    """Backbone + a head one level down (``loss.head``), wrapped whole by ``accelerator.prepare``."""

    def __init__(self, num_classes):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, D))
        self.loss = Loss(num_classes)

    def forward(self, x, y):
        return self.loss.head(self.backbone(x), y)


def _batch(rank, step, num_classes):
    g = torch.Generator().manual_seed(100 * step + rank)
    n = 5 + rank + step % 2  # uneven and changing per-rank batches
    return torch.randn(n, 6, generator=g), torch.randint(0, num_classes, (n,), generator=g)


def _snapshot(head, backbone, optimizer):
    return {"rows": head.weight.detach().clone(),
            "grad": None if head.weight.grad is None else head.weight.grad.clone(),
            "momentum": optimizer.state[head.weight]["momentum_buffer"].clone(),
            "backbone": [p.detach().clone() for p in backbone.parameters()],
            "backbone_grads": [p.grad.clone() for p in backbone.parameters()]}


def _train(model, optimizer, rank, num_classes, steps, start, backward):
    losses = []
    for step in range(start, start + steps):
        x, y = _batch(rank, step, num_classes)
        optimizer.zero_grad(set_to_none=True)
        loss = model(x, y)
        backward(loss)
        optimizer.step()
        losses.append(loss.detach().clone())
    return losses


def _accelerate(rank, world, num_classes, tmp):
    # what a launcher would set; Accelerate reads it to see 2 CPU processes and keeps the existing group
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="29500", OMP_NUM_THREADS="1")
    from accelerate import Accelerator
    from torch.nn.parallel import DistributedDataParallel as DDP

    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == world and accelerator.process_index == rank

    torch.manual_seed(0)
    model = Model(num_classes)
    head = model.loss.head
    before = head.weight.detach().clone()
    ref = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    out = {"class_range": (head.class_start, head.class_end), "before": before,
           "after_prepare": head.weight.detach().clone(), "wrapper": type(wrapped).__name__,
           "ignored": sorted(getattr(wrapped, "parameters_to_ignore", ()))}
    out["losses"] = _train(wrapped, optimizer, rank, num_classes, 3, 0, accelerator.backward)
    out["wrapped"] = at_save = _snapshot(head, model.backbone, optimizer)

    # reference: the backbone alone in DDP, the head outside it
    ref.backbone = DDP(ref.backbone)
    ref_optimizer = torch.optim.SGD(ref.parameters(), lr=0.5, momentum=0.9)
    out["ref_losses"] = _train(ref, ref_optimizer, rank, num_classes, 3, 0, lambda loss: loss.backward())
    out["expected"] = _snapshot(ref.loss.head, ref.backbone.module, ref_optimizer)

    # save_state's default (safetensors)
    try:
        accelerator.save_state(os.path.join(tmp, "safe"))
        out["safe_save"] = "ok"
    except Exception as e:  # noqa: BLE001 - reported
        out["safe_save"] = repr(e)

    # plain save_state -> load_state: rank 0 wrote everything
    raw = os.path.join(tmp, "raw")
    accelerator.save_state(raw, safe_serialization=False)
    accelerator.wait_for_everyone()
    try:
        accelerator.load_state(raw)
        out["raw_load"] = "ok"
    except ValueError as e:
        out["raw_load"] = str(e)
    out["rows_after_raw_load"] = head.weight.detach().clone()
    accelerator.wait_for_everyone()

    # with the consolidating hooks
    from partialfc import keep_all_shards_in_accelerate
    keep_all_shards_in_accelerate(accelerator, wrapped, optimizer)
    full = os.path.join(tmp, "full")
    accelerator.save_state(full, safe_serialization=False)
    accelerator.wait_for_everyone()
    _train(wrapped, optimizer, rank, num_classes, 2, 3, accelerator.backward)  # move away from the saved state
    moved = head.weight.detach().clone()
    accelerator.load_state(full)
    out["moved_away"] = not torch.equal(moved, at_save["rows"])
    out["loaded"] = _snapshot(head, model.backbone, optimizer)
    out["more"] = _train(wrapped, optimizer, rank, num_classes, 2, 3, accelerator.backward)
    out["more_ref"] = _train(ref, ref_optimizer, rank, num_classes, 2, 3, lambda loss: loss.backward())
    out["rows_more"], out["rows_more_ref"] = head.weight.detach().clone(), ref.loss.head.weight.detach().clone()
    return out


@pytest.fixture(scope="module", params=[10, 11], ids=["C10", "C11"])
def accelerate_run(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"accelerate{request.param}")
    return request.param, tmp, run_distributed(_accelerate, 2, request.param, str(tmp), timeout=150)


def _head_weight(state):
    (key,) = [k for k in state if k.endswith("loss.head.weight")]  # saved unwrapped ("module." stripped)
    return state[key]


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y), (x - y).abs().max()


def test_prepare_leaves_rows_alone_and_matches_the_plain_loop(accelerate_run):
    num_classes, _, results = accelerate_run
    for r in results:
        assert r["wrapper"] == "DistributedDataParallel"
        assert "loss.head.weight" in r["ignored"]
        assert torch.equal(r["after_prepare"], r["before"])
        _same(r["losses"], r["ref_losses"])
        for key in ("rows", "grad", "momentum"):
            assert torch.equal(r["wrapped"][key], r["expected"][key]), key
        _same(r["wrapped"]["backbone_grads"], r["expected"]["backbone_grads"])
        _same(r["wrapped"]["backbone"], r["expected"]["backbone"])
    assert [r["class_range"] for r in results] == [(0, (num_classes + 1) // 2), ((num_classes + 1) // 2, num_classes)]


def test_load_state_of_a_rank0_save_raises_on_rank1(accelerate_run):
    """save_state writes rank 0's rows only: load_state refuses them on rank 1, copying nothing."""
    num_classes, tmp, results = accelerate_run
    split = (num_classes + 1) // 2
    assert results[0]["raw_load"] == "ok"
    message = results[1]["raw_load"]
    assert message.startswith(f"PartialFC.load_state_dict: the state dict holds classes [0, {split}) of "
                              f"{num_classes} (rank 0 of 2"), message
    assert f"this head holds classes [{split}, {num_classes})" in message and "other classes' rows" in message
    for r in results:
        assert torch.equal(r["rows_after_raw_load"], r["wrapped"]["rows"])
    saved = torch.load(tmp / "raw" / "pytorch_model.bin", weights_only=True)
    assert _head_weight(saved).shape == (split, D)  # rank 0's rows alone


def test_save_state_with_consolidating_hooks_keeps_every_shard(accelerate_run):
    """Pre-save hook (weights) + registered OptimizerCheckpoint (momentum), via keep_all_shards_in_accelerate: load_state restores every
    rank's rows and momentum bit for bit, and training continues exactly like the plain loop."""
    num_classes, tmp, results = accelerate_run
    for r in results:
        assert r["moved_away"]
        for key in ("rows", "momentum"):
            assert torch.equal(r["loaded"][key], r["wrapped"][key]), key
        _same(r["loaded"]["backbone"], r["wrapped"]["backbone"])
        _same(r["more"], r["more_ref"])
        assert torch.equal(r["rows_more"], r["rows_more_ref"])
    weights = torch.load(tmp / "full" / "pytorch_model.bin", weights_only=True)
    assert torch.equal(_head_weight(weights), torch.cat([r["wrapped"]["rows"] for r in results]))
    # the optimizer file itself is still rank 0's alone; the registered object holds every row
    optimizer_file = torch.load(tmp / "full" / "optimizer.bin", weights_only=False)
    momenta = [s["momentum_buffer"] for s in optimizer_file["state"].values()]
    assert torch.equal(momenta[-1], results[0]["wrapped"]["momentum"])
    custom = torch.load(tmp / "full" / "custom_checkpoint_0.pkl", weights_only=False)
    head_momentum = [s["momentum_buffer"] for s in custom["state"].values()][-1]
    assert torch.equal(head_momentum, torch.cat([r["wrapped"]["momentum"] for r in results]))


def test_save_state_default_safetensors(accelerate_run):
    """Bug: the head's ``_extra_state`` was a dict and safetensors (save_state's default) crashed on it."""
    _, _, results = accelerate_run
    assert [r["safe_save"] for r in results] == ["ok", "ok"], results[0]["safe_save"]
