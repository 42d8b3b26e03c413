"""Sub-center heads (``PartialFC(..., sub_centers=k)``) against independent oracles.

Oracles: the float64 single-process reference of ``tests/oracle.py`` (a class's cosine is the max
over its k rows, autograd's max sends the gradient to that row) and pytorch-metric-learning's
``SubCenterArcFaceLoss`` (ArcFace with the linear extension, W stored (d, C k) class-major) for
the loss, the gradients and its cleaning step (``get_outliers``).
"""
import math

import pytest
import torch

from partialfc import (CombinedMargin, PartialFC, angles_to_dominant, clean_sub_centers, consolidate_state_dict,
                       keep_dominant, load_head_shards, shard_bounds, sub_center_counts)
from tests.dist_utils import run_distributed
from tests.oracle import reference_grads

K = 3
D = 8
CASES = [
    # name, margin, chunk_size, sample_rate, sparse_grad
    ("arcface", CombinedMargin.arcface(s=16.0, m=0.5), None, 1.0, False),
    ("arcface_chunked", CombinedMargin.arcface(s=16.0, m=0.5), 4, 1.0, False),
    ("cosface", CombinedMargin.cosface(s=16.0, m=0.35), 5, 1.0, False),
    ("sphereface", CombinedMargin.sphereface(s=16.0, m=1.7), None, 1.0, False),
    ("combined", CombinedMargin(s=16.0, m1=1.2, m2=0.3, m3=0.15), 3, 1.0, False),
    ("sampled", CombinedMargin.arcface(s=16.0, m=0.5), None, 0.3, False),
    ("sampled_sparse_chunked", CombinedMargin.arcface(s=16.0, m=0.5), 2, 0.3, True),
]


def _margin_kwargs(m):
    return dict(s=m.s, m1=m.m1, m2=m.m2, m3=m.m3, extension=m.extension, straight_through=m.straight_through)


def _problem(step, sizes, num_classes, k=K):
    g = torch.Generator().manual_seed(500 + step)
    total = sum(sizes)
    x_all = torch.randn(total, D, generator=g, dtype=torch.float64) * 2
    y_all = torch.randint(0, num_classes, (total,), generator=g)
    if total > 2:
        y_all[1] = -100
    w_all = torch.randn(num_classes * k, D, generator=g, dtype=torch.float64)
    return x_all, y_all, w_all


def _union_of_samples(head, world):
    """Global class ids every rank used this step (all of them without sampling)."""
    import torch.distributed as dist
    index = head.sampled_index if head.sampled_index is not None else torch.arange(head.num_local)
    mine = (index + head.class_start).tolist()
    if world == 1:
        return torch.tensor(mine)
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)
    return torch.tensor(sorted(sum(gathered, [])))


def _check_cases(rank, world, num_classes, batch_sizes):
    for step, (name, margin, chunk, rate, sparse) in enumerate(CASES):
        sizes = [b[step % len(b)] if isinstance(b, list) else b for b in batch_sizes]
        x_all, y_all, w_all = _problem(step, sizes, num_classes)
        head = PartialFC(D, num_classes, margin=margin, chunk_size=chunk, sample_rate=rate, sparse_grad=sparse,
                         sub_centers=K, seed=step).double()
        start, end = shard_bounds(num_classes, world, rank)
        assert head.weight.shape == ((end - start) * K, D)
        with torch.no_grad():
            head.weight.copy_(w_all[start * K:end * K])
        lo = sum(sizes[:rank])
        x = x_all[lo: lo + sizes[rank]].clone().requires_grad_()
        loss = head(x, y_all[lo: lo + sizes[rank]])
        loss.backward()
        # the oracle over the classes of the sample (every class without sampling), all k rows of each
        union = _union_of_samples(head, world)
        remap = torch.full((num_classes,), -1, dtype=torch.long)
        remap[union] = torch.arange(union.numel())
        rows = (union.unsqueeze(1) * K + torch.arange(K)).view(-1)
        y_ref = torch.where(y_all >= 0, remap[y_all.clamp_min(0)], y_all)
        ref_loss, ref_gx, ref_gw_rows = reference_grads(x_all, w_all[rows], y_ref, sub_centers=K,
                                                        **_margin_kwargs(margin))
        ref_gw = torch.zeros_like(w_all)
        ref_gw[rows] = ref_gw_rows
        grad = head.weight.grad
        if sparse:
            assert grad.is_sparse
            grad = grad.to_dense()
        msg = lambda m: f"{name} (rank {rank}/{world}): {m}"  # noqa: E731
        torch.testing.assert_close(loss.detach(), ref_loss, rtol=1e-11, atol=1e-12, msg=msg)
        torch.testing.assert_close(grad, ref_gw[start * K:end * K], rtol=1e-9, atol=1e-12, msg=msg)
        torch.testing.assert_close(x.grad, world * ref_gx[lo: lo + sizes[rank]], rtol=1e-9, atol=1e-12, msg=msg)
    return True


@pytest.mark.parametrize("world,num_classes,batch_sizes", [
    (1, 11, [7]),
    (2, 13, [5, 9]),
    (3, 29, [[4, 7], [0, 6], [11, 1]]),  # unequal, a rank with no samples, sizes change per step
    (4, 17, [3, 0, 5, 2]),
])
def test_subcenter_matches_oracle(world, num_classes, batch_sizes):
    if world == 1:
        assert _check_cases(0, 1, num_classes, batch_sizes)
    else:
        assert run_distributed(_check_cases, world, num_classes, batch_sizes) == [True] * world


# --- a second oracle: pytorch-metric-learning ------------------------------------------------
def test_matches_pytorch_metric_learning_subcenter_arcface():
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    g = torch.Generator().manual_seed(3)
    num_classes, m = 9, 0.45
    x = torch.randn(12, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, num_classes, (12,), generator=g)
    w = torch.randn(num_classes * K, D, generator=g, dtype=torch.float64)
    ref = pml.SubCenterArcFaceLoss(num_classes=num_classes, embedding_size=D, margin=math.degrees(m), scale=16.0,
                                   sub_centers=K)
    ref.W.data = w.t().clone()  # pml stores (d, C k), class-major columns
    x_ref = x.clone().requires_grad_()
    ref_loss = ref(x_ref, y)
    ref_loss.backward()
    head = PartialFC(D, num_classes, margin=CombinedMargin.arcface(s=16.0, m=m, extension="linear"),
                     sub_centers=K).double()
    with torch.no_grad():
        head.weight.copy_(w)
    x_head = x.clone().requires_grad_()
    loss = head(x_head, y)
    loss.backward()
    torch.testing.assert_close(loss.detach(), ref_loss.detach(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(x_head.grad, x_ref.grad, rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(head.weight.grad, ref.W.grad.t(), rtol=1e-7, atol=1e-10)


# --- prediction ---------------------------------------------------------------------------
def _predict(rank, world, num_classes, sizes, k):
    g = torch.Generator().manual_seed(11)
    x_all = torch.randn(sum(sizes), D, generator=g)
    w_all = torch.randn(num_classes * K, D, generator=g)
    head = PartialFC(D, num_classes, sub_centers=K)
    with torch.no_grad():
        head.weight.copy_(w_all[head.class_start * K: head.class_end * K])
    lo = sum(sizes[:rank])
    scores, ids = head.predict(x_all[lo: lo + sizes[rank]], k=k)
    cos = torch.nn.functional.normalize(x_all[lo: lo + sizes[rank]].double(), dim=1) \
        @ torch.nn.functional.normalize(w_all.double(), dim=1).t()
    best = cos.view(sizes[rank], num_classes, K).amax(2).topk(k, dim=1)
    assert torch.equal(ids, best.indices), (ids, best.indices)
    torch.testing.assert_close(scores.double(), best.values, rtol=1e-5, atol=1e-6)
    return True


@pytest.mark.parametrize("world,sizes", [(1, [6]), (3, [4, 0, 5])])
def test_predict_takes_the_nearest_sub_center(world, sizes):
    if world == 1:
        assert _predict(0, 1, 10, sizes, 4)
    else:
        assert run_distributed(_predict, world, 10, sizes, 4) == [True] * world


# --- state: init, re-sharding, layout checks ----------------------------------------------
def _shard_state(rank, world, num_classes):
    head = PartialFC(D, num_classes, sub_centers=K, seed=5)
    return {"shard": head.state_dict(), "consolidated": consolidate_state_dict(head)}


def _reload(rank, world, num_classes, old_shards, consolidated, expected):
    head = PartialFC(D, num_classes, sub_centers=K, seed=99)
    load_head_shards(head, old_shards)
    assert torch.equal(head.weight, expected[head.class_start * K: head.class_end * K])
    other = PartialFC(D, num_classes, sub_centers=K, seed=98)
    other.load_state_dict(consolidated)
    assert torch.equal(other.weight, expected[other.class_start * K: other.class_end * K])
    return True


def test_init_is_world_size_independent_and_reshards():
    num_classes = 14
    whole = PartialFC(D, num_classes, sub_centers=K, seed=5).weight.detach()
    assert whole.shape == (num_classes * K, D)
    saved = run_distributed(_shard_state, 2, num_classes)
    # every rank's rows are its classes' rows of the one-rank matrix: init by global row id
    assert torch.equal(torch.cat([r["shard"]["weight"] for r in saved]), whole)
    assert torch.equal(saved[0]["consolidated"]["weight"], whole)
    shards = [r["shard"] for r in saved]
    assert run_distributed(_reload, 3, num_classes, shards, saved[0]["consolidated"], whole) == [True] * 3


def test_state_of_another_sub_center_count_is_refused():
    state = PartialFC(D, 6, sub_centers=K).state_dict()
    with pytest.raises(ValueError, match="another head"):
        PartialFC(D, 6).load_state_dict(state)
    with pytest.raises(ValueError, match="sub-centers"):
        load_head_shards(PartialFC(D, 6, sub_centers=2), [state])


def test_planner_counts_the_rows_of_every_sub_center():
    pytest.importorskip("torch.distributed._tools.mem_tracker")
    from partialfc.plan import plan_memory
    one = plan_memory(num_classes=4000, embedding_size=32, batch_per_rank=16, device="cpu")
    three = plan_memory(num_classes=4000, embedding_size=32, batch_per_rank=16, device="cpu", sub_centers=3)
    assert three["weights"] == 3 * one["weights"] == 3 * 4000 * 32 * 4
    assert three["peak"] > 2.5 * one["peak"]


# --- the cleaning step, against pytorch-metric-learning's get_outliers --------------------------
def _noisy_data(num_classes=6, per_class=20, noise=0.15, seed=0):
    """Samples near one random sub-center of their class (a few near another), some with random labels."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.nn.functional.normalize(torch.randn(num_classes * K, D, generator=g, dtype=torch.float64), dim=1)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    main = torch.randint(0, K, (num_classes,), generator=g)
    which = torch.where(torch.rand(labels.shape[0], generator=g) < 0.2,
                        torch.randint(0, K, labels.shape, generator=g), main[labels])
    x = centers[labels * K + which] + 0.2 * torch.randn(labels.shape[0], D, generator=g, dtype=torch.float64)
    flip = torch.rand(labels.shape[0], generator=g) < noise
    labels = torch.where(flip, torch.randint(0, num_classes, labels.shape, generator=g), labels)
    return x, labels, centers


def _clean(rank, world, sizes, batch):
    x, y, centers = _noisy_data()
    num_classes = centers.shape[0] // K
    head = PartialFC(D, num_classes, sub_centers=K).double()
    with torch.no_grad():
        head.weight.copy_(centers[head.class_start * K: head.class_end * K] * 3.0)  # norms do not matter
    lo = sum(sizes[:rank])
    xs, ys = x[lo: lo + sizes[rank]], y[lo: lo + sizes[rank]]
    n_batches = max(-(-s // batch) for s in sizes)
    batches = [(xs[i * batch:(i + 1) * batch], ys[i * batch:(i + 1) * batch]) for i in range(n_batches)]
    result = clean_sub_centers(head, batches, max_angle=60.0)
    return {"class_start": head.class_start, "dominant": result.dominant, "counts": result.counts,
            "outliers": (result.outliers + lo).tolist(), "angles": result.angles,
            "clean_weight": result.head.weight.detach(), "sub_centers": result.head.sub_centers}


@pytest.mark.parametrize("world,sizes,batch", [(1, [120], 32), (2, [70, 50], 16), (3, [50, 0, 70], 25)])
def test_cleaning_matches_pytorch_metric_learning(world, sizes, batch):
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    results = [_clean(0, 1, sizes, batch)] if world == 1 else run_distributed(_clean, world, sizes, batch)
    x, y, centers = _noisy_data()
    num_classes = centers.shape[0] // K
    ref = pml.SubCenterArcFaceLoss(num_classes=num_classes, embedding_size=D, sub_centers=K)
    ref.W.data = centers.t().clone()
    ref_outliers, ref_dominant = ref.get_outliers(x, y, threshold=60.0)
    assert len(ref_outliers) > 0  # the data has noise for the check to see
    assert sorted(o for r in results for o in r["outliers"]) == sorted(ref_outliers)
    for r in results:
        c0, n = r["class_start"], r["dominant"].shape[0]
        for c in range(c0, c0 + n):
            chosen = centers[c * K + int(r["dominant"][c - c0])]
            torch.testing.assert_close(chosen, ref_dominant[:, c])
            assert int(r["counts"][c - c0].sum()) == int((y == c).sum())
        assert r["sub_centers"] == 1
        torch.testing.assert_close(r["clean_weight"], 3.0 * ref_dominant[:, c0:c0 + n].t())
    # the angles really are the angles to the dominant sub-center
    angles = torch.cat([r["angles"] for r in results])
    cos_ref = torch.nn.functional.normalize(x, dim=1) @ ref_dominant
    expected = torch.rad2deg(torch.acos(cos_ref.gather(1, y[:, None]).squeeze(1).clamp(-1, 1)))
    torch.testing.assert_close(angles, expected, rtol=1e-9, atol=1e-7)


def test_cleaning_functions_check_their_inputs():
    head = PartialFC(D, 4, sub_centers=K)
    with pytest.raises(ValueError, match="outside"):
        sub_center_counts(head, torch.randn(2, D), torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="one sub-center per local class"):
        keep_dominant(head, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        keep_dominant(head, torch.full((4,), 3))
    with pytest.raises(ValueError, match="one sub-center per local class"):
        angles_to_dominant(head, torch.randn(2, D), torch.tensor([0, 1]), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="width|batch"):
        sub_center_counts(head, torch.randn(2, D + 1), torch.tensor([0, 1]))


def _bad_cleaning_input_on_one(rank, world):
    head = PartialFC(D, 8, sub_centers=K)
    labels = torch.tensor([0, 1, 2]) if rank == 0 else torch.tensor([0, 1])  # rank 1: one label short
    try:
        sub_center_counts(head, torch.randn(3, D), labels)
    except ValueError as err:
        return str(err)
    return "no error"


def test_bad_cleaning_input_on_one_rank_is_the_same_error_everywhere():
    """Rank 1 alone gives a label too few: both ranks raise the same error naming rank 1 (no hang
    in the gather that rank 1 would have joined with another batch size)."""
    messages = run_distributed(_bad_cleaning_input_on_one, 2)
    assert messages[0] == messages[1] and "rank(s) [1]" in messages[0] and "one label per row" in messages[0]


# --- the training app: config, checkpoint, resume on another world size ---------------------------
def test_trainer_checkpoints_and_resumes_sub_centers_on_another_world_size(tmp_path):
    """2 ranks train 2 steps with 3 sub-centers; the checkpoint holds 3 rows per class, and one
    process loads it (re-sharded: all 40 classes' 120 rows) into the head the config builds."""
    import torch
    from launch.checkpoint import _load, load_checkpoint, read_meta
    from launch.config import load_config
    from launch.models import build_backbone
    from launch.trainer import build_head
    from tests.test_train_e2e import CONFIG, torchrun
    base = tmp_path / "base"
    torchrun(2, base, "--train.batch_size", "12", "--train.steps", "2", "--train.ckpt_every", "2",
             "--head.sub_centers", "3")
    ckpt = base / "checkpoints" / "step_00000002"
    meta = read_meta(ckpt)
    assert meta["sub_centers"] == 3 and meta["shards"] == [[0, 20], [20, 40]]
    rows = [_load(ckpt / f"head_rank{r}.pt")["weight"] for r in range(2)]
    assert [w.shape[0] for w in rows] == [60, 60]

    def backbone(cfg):
        return build_backbone(cfg.model.backbone, cfg.model.embedding_size, cfg.data.in_channels,
                              cfg.data.image_size)
    cfg = load_config(str(CONFIG), ["--head.sub_centers", "3"])
    head = build_head(cfg, 40)
    trainer_state = load_checkpoint(ckpt, backbone=backbone(cfg), head=head)
    assert trainer_state["resharded_from"] == 2 and head.step == 2
    assert torch.equal(head.weight.detach(), torch.cat(rows))
    # a head of one row per class refuses the checkpoint with a clear error
    plain = load_config(str(CONFIG), [])
    with pytest.raises(ValueError, match="sub-center"):
        load_checkpoint(ckpt, backbone=backbone(plain), head=build_head(plain, 40))
