"""Checkpoints: re-sharding across world sizes, crash mid-save, no code execution on load."""
import os
from pathlib import Path

import pytest
import torch

from launch import checkpoint as ckpt
from partialfc import PartialFC, SparseSGD
from tests.dist_utils import run_distributed

NUM_CLASSES, D = 23, 4


def _make(optimizer: str):
    head = PartialFC(D, NUM_CLASSES, sample_rate=0.5 if optimizer == "sparse_sgd" else 1.0,
                     sparse_grad=optimizer == "sparse_sgd", seed=1)
    backbone = torch.nn.Linear(3, D)
    if optimizer == "sparse_sgd":
        opt_h = SparseSGD(head.parameters(), lr=0.1, momentum=0.9)
    elif optimizer == "adamw":
        opt_h = torch.optim.AdamW(head.parameters(), lr=0.01)
    else:
        opt_h = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
    opt_b = torch.optim.SGD(backbone.parameters(), lr=0.1, momentum=0.9)
    return head, backbone, opt_h, opt_b


def _save(rank, world, root, optimizer):
    torch.manual_seed(rank)
    head, backbone, opt_h, opt_b = _make(optimizer)
    for _ in range(2):
        loss = head(backbone(torch.randn(5, 3)), torch.randint(0, NUM_CLASSES, (5,)))
        loss.backward()
        opt_h.step(), opt_b.step()
        opt_h.zero_grad(), opt_b.zero_grad()
    ckpt.save_checkpoint(root, 2, backbone=backbone, head=head, backbone_optimizer=opt_b, head_optimizer=opt_h,
                         trainer_state={"step": 2}, config={})
    state = {k: v.clone() for k, v in opt_h.state_dict()["state"].get(0, {}).items() if torch.is_tensor(v)}
    return head.weight.detach().clone(), state, head.step


@pytest.mark.parametrize("optimizer", ["sgd", "sparse_sgd", "adamw"])
def test_reshard_two_ranks_to_three(tmp_path, optimizer):
    saved = run_distributed(_save, 2, str(tmp_path), optimizer)
    loaded = run_distributed(_load_only, 3, str(tmp_path), optimizer)
    full_w = torch.cat([w for w, _, _ in saved])
    assert torch.equal(torch.cat([w for w, _, _, _ in loaded]), full_w)
    for key, value in saved[0][1].items():
        if value.dim() >= 1 and value.shape[0] == saved[0][0].shape[0]:  # per-row state
            assert torch.equal(torch.cat([s[key] for _, s, _, _ in loaded]),
                               torch.cat([s[key] for _, s, _ in saved])), key
        else:
            assert all(torch.equal(s[key], value) for _, s, _, _ in loaded), key
    assert all(step == saved[0][2] for _, _, step, _ in loaded)
    assert all(info == 2 for _, _, _, info in loaded)  # told it was re-sharded from 2 ranks


def _load_only(rank, world, root, optimizer):
    head, backbone, opt_h, opt_b = _make(optimizer)
    trainer = ckpt.load_checkpoint(ckpt.latest_checkpoint(root), backbone=backbone, head=head,
                                   backbone_optimizer=opt_b, head_optimizer=opt_h)
    state = {k: v.clone() for k, v in opt_h.state_dict()["state"].get(0, {}).items() if torch.is_tensor(v)}
    weight, step = head.weight.detach().clone(), head.step
    head(backbone(torch.randn(2, 3)), torch.tensor([0, 1])).backward()
    opt_h.step()  # the restored optimizer state fits the new shard
    return weight, state, step, trainer["resharded_from"]


def _one_rank_objects():
    head, backbone, opt_h, opt_b = _make("sgd")
    return dict(backbone=backbone, head=head, backbone_optimizer=opt_b, head_optimizer=opt_h)


def test_crash_mid_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    objs = _one_rank_objects()
    first = ckpt.save_checkpoint(tmp_path, 1, trainer_state={"step": 1}, config={}, **objs)
    real_replace = os.replace

    def crash_on_commit(src, dst):
        if str(src).endswith(".tmp"):
            raise KeyboardInterrupt("simulated crash at the commit point")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", crash_on_commit)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, 2, trainer_state={"step": 2}, config={}, **objs)
    monkeypatch.setattr(ckpt.os, "replace", real_replace)
    assert (tmp_path / "step_00000002.tmp").is_dir()  # the half-written one is there...
    assert ckpt.latest_checkpoint(tmp_path) == first  # ...but never offered for resuming
    ckpt.save_checkpoint(tmp_path, 3, trainer_state={"step": 3}, config={}, **objs)
    assert not (tmp_path / "step_00000002.tmp").exists()  # cleaned up by the next save
    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000003"


def test_keep_limits_old_checkpoints(tmp_path):
    objs = _one_rank_objects()
    for step in range(1, 6):
        ckpt.save_checkpoint(tmp_path, step, trainer_state={"step": step}, config={}, keep=2, **objs)
    assert [p.name for p in ckpt.checkpoint_dirs(tmp_path)] == ["step_00000004", "step_00000005"]


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch EXPLOITED",))


def test_loading_never_runs_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    objs = _one_rank_objects()
    path = ckpt.save_checkpoint(tmp_path / "c", 1, trainer_state={"step": 1}, config={}, **objs)
    torch.save({"step": 1, "payload": _Exploit()}, path / "trainer.pt")
    with pytest.raises(Exception, match="(?i)weights_only|unpickl|unsupported"):
        ckpt.load_checkpoint(path, **{k: v for k, v in _one_rank_objects().items()})
    assert not Path("EXPLOITED").exists()


def _two_group_objects():
    """A head optimizer that steps another parameter first: head.weight is its parameter 1."""
    head, backbone, _, opt_b = _make("sgd")
    shift = torch.nn.Parameter(torch.zeros(D))
    opt_h = torch.optim.SGD([{"params": [shift]}, {"params": [head.weight], "lr": 0.05}], lr=0.1, momentum=0.9)
    return shift, dict(backbone=backbone, head=head, backbone_optimizer=opt_b, head_optimizer=opt_h)


def test_head_weight_found_by_identity_in_the_optimizer(tmp_path):
    shift, objs = _two_group_objects()
    for _ in range(2):
        objs["head"](objs["backbone"](torch.randn(5, 3)) + shift, torch.randint(0, NUM_CLASSES, (5,))).backward()
        objs["head_optimizer"].step()
        objs["head_optimizer"].zero_grad()
    path = ckpt.save_checkpoint(tmp_path, 2, trainer_state={"step": 2}, config={}, **objs)
    shift2, fresh = _two_group_objects()
    ckpt.load_checkpoint(path, **fresh)
    saved, loaded = objs["head_optimizer"].state, fresh["head_optimizer"].state
    assert torch.equal(loaded[fresh["head"].weight]["momentum_buffer"], saved[objs["head"].weight]["momentum_buffer"])
    assert torch.equal(loaded[shift2]["momentum_buffer"], saved[shift]["momentum_buffer"])
    reordered = _one_rank_objects()  # head.weight is parameter 0 there: refused, not silently misloaded
    with pytest.raises(ValueError, match="parameter 0 of the head optimizer but was parameter 1"):
        ckpt.load_checkpoint(path, **reordered)


class _SGDWithStats(torch.optim.SGD):
    """SGD that also keeps a per-tensor statistic whose first dimension happens to equal the rows."""

    def step(self, closure=None):
        out = super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["stats"] = torch.arange(3.0 * p.shape[0]).view(p.shape[0], 3)
        return out


def test_per_row_state_is_weight_shaped_or_a_row_vector(tmp_path):
    """Re-sharding splits the (rows, d) momentum but keeps a (rows, 3) per-tensor statistic whole."""
    head, backbone, _, opt_b = _make("sgd")
    opt_h = _SGDWithStats(head.parameters(), lr=0.1, momentum=0.9)
    head(backbone(torch.randn(5, 3)), torch.randint(0, NUM_CLASSES, (5,))).backward()
    opt_h.step()
    path = ckpt.save_checkpoint(tmp_path, 1, backbone=backbone, head=head, backbone_optimizer=opt_b,
                                head_optimizer=opt_h, trainer_state={"step": 1}, config={})
    weight, state, _ = ckpt._reshard_rows(path, ckpt.read_meta(path), 5, 15, head.weight)  # a new rank's rows
    assert torch.equal(weight, head.weight.detach()[5:15])
    assert torch.equal(state["momentum_buffer"], opt_h.state[head.weight]["momentum_buffer"][5:15])
    assert torch.equal(state["stats"], opt_h.state[head.weight]["stats"])
