"""Damaged checkpoints: every rank agrees whether one is intact, ``resume: auto`` falls back to the
previous intact one with a warning naming the file, an explicitly named corrupt one raises the same
error on every rank, and checkpoints saved before digests were recorded still resume.

Two gloo ranks save two checkpoints once (module fixture); the damaged copies are all resolved (and
the chosen checkpoint loaded) in one more 2-rank run, whose per-case outcomes the tests inspect."""
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from launch import checkpoint as ckpt
from partialfc import PartialFC
from tests.dist_utils import run_distributed

NUM_CLASSES, D = 23, 4
STEP1, STEP2 = "step_00000001", "step_00000002"


def _make():
    head = PartialFC(D, NUM_CLASSES, seed=1)
    backbone = torch.nn.Linear(3, D)
    opt_h = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
    opt_b = torch.optim.SGD(backbone.parameters(), lr=0.1, momentum=0.9)
    return dict(backbone=backbone, head=head, backbone_optimizer=opt_b, head_optimizer=opt_h)


def _save_two(rank, world, root):
    """Steps 1 and 2 with the real save_checkpoint; returns this rank's head rows at each."""
    torch.manual_seed(rank)
    objs, weights = _make(), {}
    for step in (1, 2):
        loss = objs["head"](objs["backbone"](torch.randn(5, 3)), torch.randint(0, NUM_CLASSES, (5,)))
        loss.backward()
        for opt in (objs["head_optimizer"], objs["backbone_optimizer"]):
            opt.step()
            opt.zero_grad()
        ckpt.save_checkpoint(root, step, trainer_state={"step": step}, config={}, **objs)
        weights[step] = objs["head"].weight.detach().clone()
    return weights


class _Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _resolve_cases(rank, world, cases):
    """For each (name, root, resume): resolve on every rank, load what was chosen; report back."""
    out = {}
    for name, root, resume in cases:
        caught = _Warnings()
        logging.getLogger("launch.checkpoint").addHandler(caught)
        try:
            path = ckpt.resolve_resume(root, resume)
            objs = _make()
            trainer = ckpt.load_checkpoint(path, **objs)
            out[name] = ("ok", path.name, trainer["step"], objs["head"].weight.detach().clone())
        except ValueError as e:
            out[name] = ("error", str(e), None, None)
        finally:
            logging.getLogger("launch.checkpoint").removeHandler(caught)
        out[name] += (caught.messages,)
    return out


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _as_old_format(path: Path) -> None:
    """Rewrite a checkpoint as the version before digests and the weight's optimizer index wrote it."""
    meta = json.loads((path / "meta.json").read_text())
    meta.pop("files", None), meta.pop("digest", None)
    (path / "meta.json").write_text(json.dumps(meta))
    for shard in path.glob("head_rank*.pt"):
        state = torch.load(shard, weights_only=True)
        state.pop("optimizer_weight_index", None), state.pop("optimizer_other_state", None)
        torch.save(state, shard)


def _copy(saved: Path, dest: Path, damage=None, *where: str) -> Path:
    shutil.copytree(saved, dest)
    for relative in where:
        damage(dest / relative)
    return dest


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """{case: [rank 0's, rank 1's (status, path name or error, step, weight, warnings)]}, plus the saved rows."""
    base = tmp_path_factory.mktemp("faults")
    saved = run_distributed(_save_two, 2, str(base / "saved"), timeout=240)
    r = {
        "head": _copy(base / "saved", base / "head", _truncate, f"{STEP2}/head_rank1.pt"),
        "flip": _copy(base / "saved", base / "flip", _flip_byte, f"{STEP2}/head_rank1.pt"),
        "backbone": _copy(base / "saved", base / "backbone", _flip_byte, f"{STEP2}/backbone.pt"),
        "old": _copy(base / "saved", base / "old", _as_old_format, STEP2),
        "all": _copy(base / "saved", base / "all", _truncate, f"{STEP1}/head_rank1.pt", f"{STEP2}/head_rank1.pt"),
    }
    r["old_truncated"] = _copy(r["old"], base / "old_truncated", _truncate, f"{STEP2}/head_rank1.pt")
    cases = [("head_auto", r["head"], "auto"), ("head_explicit", r["head"], str(r["head"] / STEP2)),
             ("flip_explicit", r["flip"], str(r["flip"] / STEP2)),
             ("backbone_auto", r["backbone"], "auto"), ("backbone_explicit", r["backbone"], str(r["backbone"] / STEP2)),
             ("old_auto", r["old"], "auto"), ("old_truncated_auto", r["old_truncated"], "auto"),
             ("all_auto", r["all"], "auto")]
    results = run_distributed(_resolve_cases, 2, [(n, str(root), res) for n, root, res in cases], timeout=240)
    return {name: [results[rank][name] for rank in range(2)] for name, _, _ in cases}, saved


def _fell_back_to_step1(per_rank, saved, bad_file: str) -> None:
    for rank, (status, name, step, weight, warnings) in enumerate(per_rank):
        assert (status, name, step) == ("ok", STEP1, 1), per_rank[rank][:3]
        assert torch.equal(weight, saved[rank][1])  # and it loads: the step-1 rows of this rank
        assert any(STEP2 in w and bad_file in w for w in warnings), (rank, warnings)


def test_truncated_head_shard_auto_falls_back_on_every_rank(outcomes):
    # rank 0 never reads head_rank1.pt, yet it warns and falls back too: the verdict is agreed
    _fell_back_to_step1(outcomes[0]["head_auto"], outcomes[1], "head_rank1.pt")
    assert "truncated" in outcomes[0]["head_auto"][0][4][0]


def _same_error_on_every_rank(per_rank, bad_file: str, why: str) -> None:
    assert [o[0] for o in per_rank] == ["error", "error"], [o[:2] for o in per_rank]
    assert per_rank[0][1] == per_rank[1][1]
    assert bad_file in per_rank[0][1] and why in per_rank[0][1] and STEP2 in per_rank[0][1], per_rank[0][1]


def test_explicit_truncated_checkpoint_same_error_on_every_rank(outcomes):
    _same_error_on_every_rank(outcomes[0]["head_explicit"], "head_rank1.pt", "truncated")


def test_explicit_bit_flip_caught_by_crc_on_every_rank(outcomes):
    _same_error_on_every_rank(outcomes[0]["flip_explicit"], "head_rank1.pt", "CRC-32")


def test_corrupt_backbone_detected_on_every_rank(outcomes):
    _fell_back_to_step1(outcomes[0]["backbone_auto"], outcomes[1], "backbone.pt")
    _same_error_on_every_rank(outcomes[0]["backbone_explicit"], "backbone.pt", "CRC-32")


def test_old_format_checkpoint_still_resumes(outcomes):
    per_rank, saved = outcomes[0]["old_auto"], outcomes[1]
    for rank, (status, name, step, weight, warnings) in enumerate(per_rank):
        assert (status, name, step) == ("ok", STEP2, 2), per_rank[rank][:3]
        assert torch.equal(weight, saved[rank][2])
        assert any("no file digests" in w for w in warnings), warnings


def test_old_format_truncated_shard_still_detected(outcomes):
    _fell_back_to_step1(outcomes[0]["old_truncated_auto"], outcomes[1], "head_rank1.pt")


def test_auto_with_every_checkpoint_corrupt_raises_on_every_rank(outcomes):
    per_rank = outcomes[0]["all_auto"]
    assert [o[0] for o in per_rank] == ["error", "error"] and per_rank[0][1] == per_rank[1][1]
    assert "all 2 checkpoints" in per_rank[0][1]


# --- one process (no process group): the same rules, fast


def test_single_process_fallback_and_explicit_error(tmp_path, caplog):
    objs = _make()
    for step in (1, 2):
        ckpt.save_checkpoint(tmp_path, step, trainer_state={"step": step}, config={}, **objs)
    _truncate(tmp_path / STEP2 / "head_rank0.pt")
    with caplog.at_level(logging.WARNING, logger="launch.checkpoint"):
        assert ckpt.resolve_resume(tmp_path, "auto") == tmp_path / STEP1
    assert "head_rank0.pt" in caplog.text and STEP2 in caplog.text
    with pytest.raises(ValueError, match=r"head_rank0\.pt: \d+ bytes, \d+ recorded at save"):
        ckpt.resolve_resume(tmp_path, tmp_path / STEP2)
    assert ckpt.verify_checkpoint(tmp_path / STEP1) == []


def test_nothing_to_resume(tmp_path):
    assert ckpt.resolve_resume(tmp_path / "none", "auto") is None
    assert ckpt.resolve_resume(tmp_path, None) is None and ckpt.resolve_resume(tmp_path, "") is None
    with pytest.raises(ValueError, match="meta.json"):
        ckpt.resolve_resume(tmp_path, tmp_path / "step_00000009")


def test_meta_records_every_file(tmp_path):
    path = ckpt.save_checkpoint(tmp_path, 1, trainer_state={"step": 1}, config={}, **_make())
    meta = ckpt.read_meta(path)
    assert meta["digest"] == "crc32"
    assert sorted(meta["files"]) == ["backbone.pt", "head_rank0.pt", "trainer.pt"]
    for name, recorded in meta["files"].items():
        assert ckpt.file_digest(path / name) == recorded
