"""benchmarks (``python -m benchmarks``, alias ``python -m launch.bench``): the quick run end to end
(files and their contents; no timing assertions) and the pieces it is built from."""
import csv
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from benchmarks import BenchConfig, DEFAULT_VARIANTS, VARIANTS
from benchmarks.config import IMPL_VARIANTS

# variants that run on the CPU as they are ("triton" needs a GPU or TRITON_INTERPRET=1: tests/test_triton.py)
CPU_VARIANTS = tuple(v for v in VARIANTS if v not in IMPL_VARIANTS)
from benchmarks.cli import build_parser
from benchmarks.comm import CommCounter
from benchmarks.memory import predict
from benchmarks.report import markdown_table, summary
from benchmarks.runner import RankError, run_group
from benchmarks.timing import time_variants
from benchmarks.variants import BaselineHead, Case
from partialfc import CombinedMargin, PartialFC

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return out, proc.stdout


def test_quick_run_writes_its_files(quick_run):
    out, stdout = quick_run
    for name in ("bench.md", "bench.csv", "bench.json", "bench.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrote" in stdout


def _ring_bytes(w, br, d):
    """What the heads send per step (ring model, fp32, W = w, B_r = br)."""
    b = w * br
    # PartialFC: all-gather of [x | labels] rows, all-reduce MAX (B,) and SUM (4, B: sum-exp, non-target
    # sum-exp, target logit, target cosine), reduce-scatter of the (B, d) embedding gradient
    head = (w - 1) * br * (d * 4 + 8) + 2 * (w - 1) / w * (b * 4 + 4 * b * 4) + (w - 1) * br * d * 4
    # baseline: all-gather of x and of the labels, all-reduce MAX (B,) and two SUM (B,), reduce-scatter
    baseline = (w - 1) * br * d * 4 + (w - 1) * br * 8 + 2 * (w - 1) / w * 3 * b * 4 + (w - 1) * br * d * 4
    return round(head), round(baseline)


def test_quick_run_contents(quick_run):
    out, _ = quick_run
    with open(out / "bench.csv") as f:
        rows = list(csv.DictReader(f))
    data = json.loads((out / "bench.json").read_text())
    cs = sorted({int(r["classes_per_rank"]) for r in rows})
    assert len(cs) == 2
    assert sorted((int(r["classes_per_rank"]), r["variant"]) for r in rows) == sorted(
        (c, v) for c in cs for v in DEFAULT_VARIANTS)
    w, br, d = 2, 64, 64
    b = w * br
    head_bytes, baseline_bytes = _ring_bytes(w, br, d)
    for r in rows:
        c, rows_mm = int(r["classes_per_rank"]), int(r["rows"])
        for key in ("t_fb", "t_step", "t_mm", "eta", "gflops"):
            value = float(r[key])
            assert math.isfinite(value) and value > 0, (key, r)
        assert int(r["world_size"]) == w and int(r["global_batch"]) == b and int(r["embedding_size"]) == d
        if r["variant"].startswith("sampled"):
            assert rows_mm == math.ceil(0.1 * c)
        else:
            assert rows_mm == c
        # memory measured for every case; predicted for the PartialFC variants
        assert r["mem_fb"] != "" and r["mem_step"] != ""
        assert int(r["mem_step"]) > 0
        if r["variant"] != "baseline":
            assert int(r["pred_fb"]) > 0 and int(r["pred_step"]) >= int(r["pred_fb"])
            assert int(r["coll_bytes"]) == head_bytes and int(r["coll_calls"]) == 4
        else:  # CommDebugMode sees the autograd all-gather / reduce-scatter through torch.distributed too
            assert int(r["coll_bytes"]) == baseline_bytes and int(r["coll_calls"]) == 6
        assert int(r["weights"]) == c * d * 4
    # collective bytes do not depend on the number of classes
    for v in DEFAULT_VARIANTS:
        assert len({r["coll_bytes"] for r in rows if r["variant"] == v}) == 1
    md = (out / "bench.md").read_text()
    assert "| C_local | variant |" in md and "## Summary" in md and "torch" in md
    assert len(data["rows"]) == len(rows) and data["meta"]["config"]["world_size"] == w
    per_c = [f for f in data["summary"] if f["name"].endswith("collective bytes per step")]
    assert len(per_c) == len(DEFAULT_VARIANTS) and all(len(set(f["value"].split(" / "))) == 1 for f in per_c)


def test_help_documents_the_options():
    text = build_parser().format_help()
    for option in ("--quick", "--sweep", "--out", "--variants", "--sample-rate", "--chunk-size", "--dtype",
                   "--world-size", "--repeats", "--warmup"):
        assert option in text
    for variant in VARIANTS:
        assert variant in text


def test_launch_bench_is_an_alias(capsys):
    """python -m launch.bench forwards to the package; the old imports keep working."""
    from launch import bench
    from benchmarks import memory_worker

    assert bench.BenchConfig is BenchConfig and bench.memory_worker is memory_worker
    with pytest.raises(SystemExit) as info:
        bench.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "python -m launch.bench" in out and "--quick" in out


def test_baseline_head_is_arcface():
    """One rank: the naive autograd head and PartialFC give the same loss and gradients."""
    torch.manual_seed(0)
    d, n, batch = 16, 50, 12
    x = torch.randn(batch, d, dtype=torch.float64)
    y = torch.randint(0, n, (batch,))
    base = BaselineHead(d, n, dtype=torch.float64)
    head = PartialFC(d, n, margin=CombinedMargin.arcface(s=64.0, m=0.5), dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(base.weight)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    la, lb = base(xa, y), head(xb, y)
    la.backward()
    lb.backward()
    torch.testing.assert_close(la, lb, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(base.weight.grad, head.weight.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("variant", CPU_VARIANTS)
def test_case_steps_on_one_rank(variant):
    cfg = BenchConfig(classes_per_rank=300, embedding_size=8, batch_per_rank=6, chunk_size=64, world_size=1)
    case = Case(variant, cfg, torch.device("cpu"))
    with CommCounter(1) as counter:
        case.step()
    # no process group: no collective
    assert counter.calls == [] and counter.sent_bytes() == 0 and counter.get_total_counts() == 0
    assert case.head.weight.grad is not None
    assert case.matmul_rows() == {"sampled_dense": 30, "sampled_sparse": 30, "subcenter": 900}.get(variant, 300)
    plan = predict(cfg, variant, "cpu")
    assert (plan is None) == (variant in ("baseline", "adaface", "curricularface", "filtered_sparse"))
    if variant == "subcenter":
        assert plan["weights"] == case.head.weight.numel() * 4 == 900 * 8 * 4


def test_time_variants_one_after_the_other():
    """The sequential path (used on GPUs): one row per variant with the sampled rows and no traffic."""
    cfg = BenchConfig(classes_per_rank=200, embedding_size=8, batch_per_rank=4, chunk_size=64, world_size=1)
    rows = time_variants(cfg, CPU_VARIANTS, warmup=1, repeats=2, device=torch.device("cpu"), interleave=False)
    assert [r["variant"] for r in rows] == list(CPU_VARIANTS)
    for r in rows:
        assert r["repeats"] == 2 and len(r["t_fb_all"]) == 2 and r["coll_bytes"] == 0 and r["world_size"] == 1
        assert r["rows"] == {"sampled_dense": 20, "sampled_sparse": 20, "subcenter": 600}.get(r["variant"], 200)


def test_summary_and_table_from_rows():
    """The report states figures (no pass/fail: the targets are in docs/benchmarks.md)."""
    def row(variant, c, t_fb, t_step, eta, mem_fb, coll=1000):
        return dict(variant=variant, classes_per_rank=c, rows=c, t_fb=t_fb, t_step=t_step, t_mm=eta * t_fb,
                    eta=eta, gflops=1.0, mem_fb=mem_fb, mem_step=mem_fb, coll_bytes=coll, coll_calls=4)
    rows = [row("materialized", 10, 1.0, 1.2, 0.85, 100), row("chunked", 10, 1.2, 1.3, 0.6, 10),
            row("sampled_sparse", 10, 0.1, 0.15, 0.5, 5), row("materialized", 20, 2.0, 2.2, 0.9, 200, coll=1000)]
    figures = {(f["C"], f["name"]): f["value"] for f in summary(rows)}
    assert set(figures) >= {(10, "materialized eta (fwd+bwd)"), (20, "materialized eta (fwd+bwd)")}
    assert figures[(10, "materialized eta (fwd+bwd)")] == 0.85
    assert figures[(10, "chunked eta (fwd+bwd)")] == 0.6
    assert figures[(10, "chunked / materialized memory above the weights (fwd+bwd)")] == pytest.approx(0.1)
    assert figures[(10, "sampled_sparse step / materialized step (incl. optimizer)")] == pytest.approx(0.125)
    assert figures[("10,20", "materialized: collective bytes per step")] == "1000 / 1000"
    assert not any("met" in f or "target" in f for f in summary(rows))
    table = markdown_table(rows)
    assert table.count("\n") == len(rows) + 1 and "materialized" in table


def _fail_on_rank_1(rank, world):
    if rank == 1:
        raise ValueError("rank one fails")
    return rank


def test_runner_reports_a_failing_rank():
    """The one process runner (benchmarks and tests.dist_utils): a rank's traceback reaches the caller."""
    with pytest.raises(RankError, match="(?s)rank 1 .*ValueError: rank one fails"):
        run_group(_fail_on_rank_1, 2, start_method="spawn", timeout=120, label="test group")


def test_trained_like_embeddings_sit_at_the_angle():
    """--target-angle: each embedding is that far from its class's row of the PartialFC heads' weights, on
    every rank (the rows are regenerated by global class id), and the filtered variant reports its figures."""
    cfg = BenchConfig(classes_per_rank=300, embedding_size=16, batch_per_rank=6, world_size=1, target_angle=30.0)
    case = Case("filtered", cfg, torch.device("cpu"))
    w = case.head.weight.detach()[case.labels]
    cos = torch.nn.functional.cosine_similarity(case.embeddings.detach(), w, dim=1)
    torch.testing.assert_close(cos, torch.full_like(cos, math.cos(math.radians(30.0))), rtol=1e-5, atol=1e-5)
    rows = time_variants(cfg, ["materialized", "filtered"], warmup=1, repeats=1, device=torch.device("cpu"))
    filt = rows[1]
    assert 0 <= filt["skipped"] <= 1 and filt["w_err"] <= filt["w_bound"] + 1e-6 and "skipped" not in rows[0]
