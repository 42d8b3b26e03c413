"""Capacity planner (partialfc.plan): the real head measured on fake tensors.

Bookkeeping, what the breakdown holds (checked against sizes computed here from the shapes),
that a change of the head shows in the plan without touching the planner, max_classes, the
subprocess path beside a real process group, and one case against a measured step (RSS)."""
import json
import os
import resource
import subprocess
import sys
import tempfile
import textwrap

import pytest

import partialfc.softmax as softmax
from partialfc.plan import CATEGORIES, format_bytes, main, max_classes, parse_count, parse_size, plan_memory

MiB = 2 ** 20
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIGS = [
    dict(num_classes=200_000, world_size=2, batch_per_rank=256),
    dict(num_classes=200_000, world_size=2, batch_per_rank=256, chunk_size=16384, device="cpu"),
    dict(num_classes=1_000_003, world_size=8, batch_per_rank=128, sample_rate=0.1),
    dict(num_classes=1_000_003, world_size=8, batch_per_rank=128, sample_rate=0.1, optimizer="sparse_sgd"),
    dict(num_classes=50_000, world_size=1, batch_per_rank=64, sample_rate=1.0, optimizer="sparse_sgd"),
    dict(num_classes=500_000, world_size=4, batch_per_rank=128, dtype="bf16", optimizer="adamw"),
    dict(num_classes=500_000, world_size=4, batch_per_rank=128, dtype="fp32", mm_dtype="bf16", chunk_size=16384),
    dict(num_classes=500_000, world_size=4, batch_per_rank=128, dtype="fp16", device="cpu", weight_decay=5e-4,
         optimizer="adamw"),
    dict(num_classes=300_000, world_size=2, batch_per_rank=32, dtype="bf16", sample_rate=0.05,
         optimizer="sparse_sgd", weight_decay=5e-4, device="cpu"),
]


@pytest.mark.parametrize("cfg", CONFIGS)
def test_breakdown_adds_up(cfg):
    p = plan_memory(embedding_size=512, **cfg)
    for scenario in (p["fwd_bwd"], p):
        assert set(scenario["breakdown"]) == set(CATEGORIES)
        assert all(v >= 0 for v in scenario["breakdown"].values())
        assert sum(scenario["breakdown"].values()) == scenario["peak"]
        assert scenario["above_weights"] == scenario["peak"] - p["weights"]
    bytes_p = {"fp32": 4, "bf16": 2, "fp16": 2}[cfg.get("dtype", "fp32")]
    rows = -(-cfg["num_classes"] // cfg["world_size"])  # rank 0: the largest shard
    assert p["classes_local"] == rows
    assert p["weights"] == p["breakdown"]["params"] == rows * 512 * bytes_p
    # the optimizer adds state and never lowers the peak
    assert p["peak"] >= p["fwd_bwd"]["peak"]
    assert p["fwd_bwd"]["breakdown"]["optimizer_state"] == 0
    optimizer = cfg.get("optimizer", "sgd_momentum")
    moments = {"sgd_momentum": 1, "sparse_sgd": 1, "adamw": 2}[optimizer]
    mask = rows if optimizer == "sparse_sgd" else 0  # SparseSGD's bool row mask (sparse rows by default)
    extra = p["breakdown"]["optimizer_state"] - (moments * rows * 512 * bytes_p + mask)
    assert 0 <= extra <= 8  # AdamW also keeps its step count, a scalar tensor


def test_what_is_live_at_the_peak():
    """Materialized fp32, SGD momentum, 2 ranks: every kind checked against sizes from the shapes."""
    d, b, w, c = 512, 256, 2, 100_000
    B = w * b
    p = plan_memory(classes_per_rank=c, embedding_size=d, world_size=w, batch_per_rank=b, device="cpu")
    bk, row = p["breakdown"], c * d * 4
    assert bk["params"] == bk["grads"] == bk["optimizer_state"] == row
    # the (B, C) logits kept for backward plus x^ and the other (B,)/(B, d)/(C,) vectors of forward
    assert B * c * 4 <= bk["activations"] <= B * c * 4 + 4 * B * d * 4 + 4 * c * 4
    # in backward: the (rows, d) product inside one slice of linalg.vecdot, (B, d) gradients
    slice_bytes = softmax.VECDOT_ROWS["cpu"] * d * 4
    assert slice_bytes <= bk["temporaries"] <= slice_bytes + 4 * B * d * 4
    assert p["peak_phase"].startswith("backward")
    # logits scale with the global batch, weights do not
    p2 = plan_memory(classes_per_rank=c, embedding_size=d, world_size=w, batch_per_rank=2 * b, device="cpu")
    assert abs(p2["breakdown"]["activations"] - bk["activations"] - B * c * 4) <= 4 * B * d * 4
    assert p2["weights"] == p["weights"]


def test_affine_in_the_classes_per_rank():
    kw = dict(embedding_size=256, world_size=2, batch_per_rank=128)
    peaks = [plan_memory(classes_per_rank=c, **kw)["peak"] for c in (70_000, 90_000, 110_000)]
    assert peaks[2] - peaks[1] == peaks[1] - peaks[0] > 0


def test_sampled_rows_cover_the_positives():
    # 1% of 10k classes = 100 rows, but a global batch of 512 may hold 512 distinct positives
    p = plan_memory(classes_per_rank=10_000, world_size=2, batch_per_rank=256, sample_rate=0.01, embedding_size=64)
    assert p["sampled_classes"] == 512
    q = plan_memory(classes_per_rank=100_000, world_size=2, batch_per_rank=256, sample_rate=0.1, embedding_size=64)
    assert q["sampled_classes"] == 10_000


def test_optimizer_state_and_dtypes():
    kw = dict(classes_per_rank=70_000, embedding_size=128, world_size=2, batch_per_rank=64)
    row = 70_000 * 128 * 4
    states = {opt: plan_memory(optimizer=opt, **kw)["breakdown"]["optimizer_state"]
              for opt in ("sgd", "sgd_momentum", "adamw")}
    assert states["sgd"] == 0 and states["sgd_momentum"] == row and 0 <= states["adamw"] - 2 * row <= 8
    assert plan_memory(dtype="bf16", **kw)["weights"] == row // 2
    s = plan_memory(sample_rate=0.1, optimizer="sparse_sgd", **kw)
    assert s["sampled_classes"] == 7_000
    assert s["breakdown"]["optimizer_state"] == row + 70_000  # momentum + SparseSGD's row mask
    # sparse rows: the values and the int64 row indices (autograd copies them once more)
    assert 7_000 * (128 * 4 + 8) <= s["breakdown"]["grads"] <= 7_000 * (128 * 4 + 16)


def test_sampled_dense_gradient_is_built_once():
    """index_select's backward scatters the sampled rows into one zero (C, d) buffer, in place (under
    a dispatch mode autograd would take the functional variant: a second (C, d) buffer)."""
    C, d = 100_000, 128
    p = plan_memory(classes_per_rank=C, embedding_size=d, world_size=1, batch_per_rank=128, sample_rate=0.1,
                    device="cpu")["fwd_bwd"]
    assert p["breakdown"]["params"] == p["breakdown"]["grads"] == C * d * 4
    assert p["peak"] < 2.5 * C * d * 4


def test_the_plan_follows_the_head_chunking():
    """chunk_size removes the (B, C_local) fp32 logits the materialized head keeps: the measured
    peaks differ by B * C_local * 4 bytes, up to one block of the chunked head."""
    B, C, chunk = 512, 20_000, 1024
    kw = dict(classes_per_rank=C, embedding_size=128, world_size=2, batch_per_rank=B // 2, device="cpu")
    full, chunked = plan_memory(**kw), plan_memory(chunk_size=chunk, **kw)
    for key in ("fwd_bwd", "step"):
        diff = full[key]["peak"] - chunked[key]["peak"]
        assert abs(diff - B * C * 4) <= B * chunk * 4, (key, diff, B * C * 4)
    assert chunked["breakdown"]["grads"] == full["breakdown"]["grads"] == C * 128 * 4


def test_the_plan_follows_a_change_of_the_head(monkeypatch):
    """The row slices of the backward's radial projection (softmax.VECDOT_ROWS) are the head's
    setting: changing it changes the plan by the (rows, d) fp32 product, CPU and CUDA model."""
    kw = dict(classes_per_rank=70_000, embedding_size=128, world_size=1, batch_per_rank=64)
    cpu, cuda = plan_memory(device="cpu", **kw)["fwd_bwd"]["peak"], plan_memory(**kw)["fwd_bwd"]["peak"]
    rows_cpu = softmax.VECDOT_ROWS["cpu"]
    monkeypatch.setitem(softmax.VECDOT_ROWS, "cpu", rows_cpu // 2)
    monkeypatch.setitem(softmax.VECDOT_ROWS, "cuda", 8192)
    cpu2, cuda2 = plan_memory(device="cpu", **kw)["fwd_bwd"]["peak"], plan_memory(**kw)["fwd_bwd"]["peak"]
    for diff, rows in ((cpu - cpu2, rows_cpu - rows_cpu // 2), (cuda - cuda2, softmax.VECDOT_ROWS_DEFAULT - 8192)):
        # (rows, d) fp32 product, and two (rows,) fp32 coefficient vectors
        assert rows * 128 * 4 <= diff <= rows * (128 * 4 + 16), (diff, rows)


def test_a_plan_allocates_nothing():
    """1M classes on one rank: 1.9 GiB of weights, 0.5 GiB of logits; the fake run does not allocate them."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    p = plan_memory(num_classes=1_000_000, world_size=1, batch_per_rank=128)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    assert p["peak"] > 5 * 2 ** 30
    assert grown < 256 * MiB


@pytest.mark.parametrize("memory, kwargs", [
    ("80GiB", dict(embedding_size=512, world_size=8, batch_per_rank=128, dtype="bf16", optimizer="sparse_sgd",
                   sample_rate=0.1)),
    ("1GiB", dict(embedding_size=512, world_size=1, batch_per_rank=256, chunk_size=16384)),
    ("2GiB", dict(embedding_size=256, world_size=3, batch_per_rank=64, optimizer="adamw", device="cpu")),
])
def test_max_classes_is_the_largest_that_fits(memory, kwargs):
    budget = parse_size(memory)
    fit = max_classes(memory, details=True, **kwargs)
    n = fit["max_classes"]
    assert n > 0 and fit["verified"] and n == fit["classes_per_rank"] * kwargs["world_size"]
    assert plan_memory(num_classes=n, **kwargs)["peak"] <= budget
    assert plan_memory(num_classes=n + 1, **kwargs)["peak"] > budget
    assert len(fit["measured"]) <= 6  # two sizes, the answer and one class per rank more, in most cases
    # a reserve for the rest of the model lowers it
    m = max_classes(memory, reserve="256MiB", **kwargs)
    assert m < n
    assert plan_memory(num_classes=m, **kwargs)["peak"] <= budget - 256 * MiB < \
        plan_memory(num_classes=m + kwargs["world_size"], **kwargs)["peak"]


def test_max_classes_beyond_a_quick_run_is_solved_not_measured():
    fit = max_classes("80GiB", details=True, embedding_size=512, world_size=1, batch_per_rank=256, chunk_size=1024)
    assert not fit["verified"] and fit["max_classes"] > 10 ** 7
    assert all(c <= 2 ** 14 for c, _ in fit["measured"])


def test_max_classes_nothing_fits():
    assert max_classes(1000, embedding_size=512, world_size=2, batch_per_rank=256) == 0


def test_parsers():
    assert parse_size("80GiB") == 80 * 2 ** 30
    assert parse_size("80G") == 80 * 2 ** 30
    assert parse_size("40GB") == 40 * 10 ** 9
    assert parse_size("512MiB") == 512 * MiB
    assert parse_size(1234) == 1234
    assert parse_count("1.4M") == 1_400_000
    assert parse_count("100k") == 100_000
    assert parse_count("10_000_000") == 10_000_000
    assert format_bytes(3 * MiB) == "3.00 MiB"
    with pytest.raises(ValueError):
        parse_size("lots")


def test_bad_arguments():
    with pytest.raises(ValueError):
        plan_memory(num_classes=10, world_size=20)
    with pytest.raises(ValueError):
        plan_memory(num_classes=1000, optimizer="lamb")
    with pytest.raises(ValueError):
        plan_memory(num_classes=1000, sample_rate=0.0)
    with pytest.raises(ValueError):
        plan_memory(num_classes=1000, classes_per_rank=10)
    with pytest.raises(ValueError):
        plan_memory(num_classes=1000, optimizer="adamw", sparse_grad=True)
    with pytest.raises(ValueError):  # fp64 products of bf16 inputs would need an fp64 autocast
        plan_memory(num_classes=1000, dtype="bf16", mm_dtype="fp64", embedding_dtype="bf16")


def test_cli(capsys):
    assert main(["--classes", "10M", "--world-size", "8", "--batch-per-rank", "128", "--dtype", "bf16",
                 "--sample-rate", "0.1", "--optimizer", "sparse_sgd", "--device-memory", "80GiB"]) == 0
    out = capsys.readouterr().out
    for word in ("params", "grads", "activations", "temporaries", "optimizer state", "peak reached in",
                 "largest class count"):
        assert word in out
    assert main(["--classes-per-rank", "100000", "-w", "2", "-b", "256", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["classes_local"] == 100_000 and plan["peak"] == sum(plan["breakdown"].values())
    assert main(["--classes", "5", "--world-size", "8"]) == 2  # fewer classes than ranks


def test_beside_an_initialised_process_group():
    """With torch.distributed initialised, the fake group runs in a fresh process: the same plan,
    and the caller's group is untouched."""
    import torch.distributed as dist
    kw = dict(classes_per_rank=30_000, embedding_size=128, world_size=4, batch_per_rank=64, sample_rate=0.5)
    here = plan_memory(**kw)
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/rdzv", rank=0, world_size=1)
        try:
            there = plan_memory(**kw)
            assert dist.get_backend() == "gloo" and dist.get_world_size() == 1
            assert max_classes("1GiB", **{k: v for k, v in kw.items() if k != "classes_per_rank"}) > 0
        finally:
            dist.destroy_process_group()
    for key in ("peak", "breakdown", "fwd_bwd", "classes_local", "sampled_classes"):
        assert there[key] == here[key]


_MEASURE = textwrap.dedent("""
    import json, sys
    import torch
    torch.set_num_threads(1)
    from launch.bench import BenchConfig, memory_worker
    cfg = BenchConfig(classes_per_rank=70000, embedding_size=128, batch_per_rank=256, world_size=1)
    print(json.dumps(memory_worker(0, 1, cfg, "materialized", 2)))
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="RSS readings need Linux /proc")
def test_prediction_matches_a_measured_step():
    """Fresh interpreter, one rank, materialized fp32 head with SGD momentum: the RSS above the
    weights must be within 15 % of the plan (CPU model), for fwd+bwd and for the full step."""
    out = subprocess.run([sys.executable, "-c", _MEASURE], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 0, out.stderr[-3000:]
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    plan = plan_memory(classes_per_rank=70000, embedding_size=128, world_size=1, batch_per_rank=256,
                       device="cpu", optimizer="sgd_momentum")
    assert measured["weights"] == plan["weights"]
    for key, predicted in (("mem_fb", plan["fwd_bwd"]["above_weights"]), ("mem_step", plan["above_weights"])):
        assert abs(measured[key] - predicted) <= 0.15 * predicted, \
            f"{key}: measured {measured[key] / MiB:.1f} MiB, predicted {predicted / MiB:.1f} MiB; {json.dumps(measured)}"
