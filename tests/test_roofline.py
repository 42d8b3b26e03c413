"""The roofline time model: its pass lists count what each implementation does (checked against
the shapes' arithmetic, not against the module's numbers), and the model's claims follow from them."""
import pytest

from partialfc.roofline import DEVICES, IMPLS, Device, passes, predict


@pytest.mark.parametrize("impl,products", [("materialized", 3), ("chunked", 4), ("fused", 5)])
def test_flops_are_the_products(impl, products):
    b, c, d = 64, 1000, 32
    ps = passes(impl, b, c, d, "fp32")
    assert sum(p.kind == "mm" for p in ps) == products
    assert sum(p.flops for p in ps) == products * 2 * b * c * d


def test_only_the_fused_path_moves_no_batch_times_classes_bytes():
    """Doubling B adds B x C traffic to the torch paths, only O(B d) to the fused one."""
    c, d = 100_000, 512
    for impl in IMPLS:
        small = sum(p.bytes for p in passes(impl, 512, c, d, "bf16"))
        large = sum(p.bytes for p in passes(impl, 1024, c, d, "bf16"))
        if impl == "fused":
            assert large - small <= 4 * 512 * d * 2 * 4  # a few (B, d) reads, nothing of C
        else:
            assert large - small >= 512 * c * 2 * 8  # at least eight passes of 2-byte (B, C) entries


def test_time_is_the_slower_of_compute_and_memory():
    compute_bound = Device("c", {"fp32": 1e9}, bandwidth=1e15, elementwise=1e15, exp=1e15)
    memory_bound = Device("m", {"fp32": 1e18}, bandwidth=1e9)
    b, c, d = 8, 100, 16
    p = predict("materialized", b, c, d, compute_bound, "fp32")
    assert p["seconds"] == pytest.approx(3 * 2 * b * c * d / 1e9, rel=1e-3) and p["eta"] == pytest.approx(1.0, rel=1e-3)
    q = predict("materialized", b, c, d, memory_bound, "fp32")
    assert q["seconds"] == pytest.approx(q["bytes"] / 1e9)


def test_gpu_claims():
    """On the published H100/H200 figures the torch paths are memory-bound at B 1024, d 512, bf16,
    the fused one is not, and eta cannot pass 3/5 with five products."""
    for name in ("H100", "H200"):
        for c in (100_000, 1_000_000, 10_000_000):
            m = predict("materialized", 1024, c, 512, DEVICES[name], "bf16")
            f = predict("fused", 1024, c, 512, DEVICES[name], "bf16")
            assert m["mm_share"] < 0.3 < 0.7 < f["mm_share"]
            assert f["seconds"] < m["seconds"] and f["eta"] <= 0.6


def test_bad_arguments():
    with pytest.raises(ValueError, match="impl"):
        passes("cuda", 1, 1, 1)
    with pytest.raises(ValueError, match="dtype"):
        passes("fused", 1, 1, 1, "int8")


def test_cli_prints_the_gpu_table_and_the_cpu_comparison(capsys):
    from partialfc.roofline import main
    assert main(["-d", "16", "--calibrate-cpu", "--cpu-classes", "3000", "--cpu-batch", "32"]) == 0
    out = capsys.readouterr().out
    assert out.count("| H100 |") == 15 and out.count("| H200 |") == 15
    assert "| materialized |" in out and "| chunked |" in out and "measured / predicted" in out
