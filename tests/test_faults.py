"""Faults of the head, each pinned by a test that failed before the fix (commit a7dc333).

Numbers are checked against independent references: the float64 single-process oracle of
:mod:`tests.oracle` (plain autograd over the full logit matrix) or the same model run eagerly.

Multi-rank tests run on real gloo ranks (:func:`tests.dist_utils.run_distributed`). Spawning ranks
dominates the run time, so the scenarios that keep the ranks in step even when the head misbehaves
(every rank fails, or not, at the same point) share one 2-rank session: each scenario runs in
its own ``try`` on every rank and the session returns, per scenario, what each rank saw or the
traceback it raised; the tests assert on their scenario. Scenarios that can leave one rank
waiting in a collective (mixed dtypes, a rank that skips the backward) get a spawn of their own.
The functions added with the fixes (``consolidate_state_dict``, ``load_head_shards``) are imported
where they are used, so the other tests still run against older code.
"""
import copy
import functools
import io
import traceback

import pytest
import torch
from torch import nn

from partialfc import CombinedMargin, PartialFC, shard_bounds
from partialfc.state import read_layout
from tests.dist_utils import run_distributed
from tests.oracle import reference_grads, reference_loss

MARGIN = CombinedMargin.arcface(s=16.0, m=0.5)
MARGIN_KW = dict(s=MARGIN.s, m1=MARGIN.m1, m2=MARGIN.m2, m3=MARGIN.m3, extension=MARGIN.extension,
                 straight_through=MARGIN.straight_through)
TIMEOUT = 60  # seconds per spawn: a rank stuck in a collective fails the test instead of blocking CI


def _problem(seed, sizes, num_classes, d):
    """A global problem every rank can rebuild: x (B, d), labels (B,), full weight (C, d), float64."""
    g = torch.Generator().manual_seed(seed)
    total = sum(sizes)
    x_all = torch.randn(total, d, generator=g, dtype=torch.float64) * 2
    y_all = torch.randint(0, num_classes, (total,), generator=g)
    w_all = torch.randn(num_classes, d, generator=g, dtype=torch.float64)
    return x_all, y_all, w_all


def _head(d, num_classes, w_all, dtype=torch.float64, **kw):
    """A head on the default group holding this rank's rows of ``w_all`` (bounds by shard_bounds)."""
    head = PartialFC(d, num_classes, margin=MARGIN, **kw).to(dtype)
    start, end = shard_bounds(num_classes, head.world_size, head.rank)
    with torch.no_grad():
        head.weight.copy_(w_all[start:end])
    return head


def _local(rank, sizes, *tensors):
    lo = sum(sizes[:rank])
    return [t[lo: lo + sizes[rank]] for t in tensors]


# the shared 2-rank session ------------------------------------------------------------------------
_SESSION_SCENARIOS = []


def _scenario(fn):
    _SESSION_SCENARIOS.append(fn)
    return fn


def _session(rank, world, *args):
    out = {}
    for fn in _SESSION_SCENARIOS:
        try:
            out[fn.__name__] = fn(rank, world, *args)
        except BaseException:  # noqa: BLE001 - pytest.raises' "DID NOT RAISE" too; reported per scenario
            out[fn.__name__] = {"error": traceback.format_exc()}
    return out


def _session_args():
    """Inputs the session needs from a process without a process group (world 1)."""
    single_rank_sd = PartialFC(6, 7, margin=MARGIN).state_dict()
    w11 = torch.randn(11, 6, generator=torch.Generator().manual_seed(6)).double()  # fp32 values
    return single_rank_sd, w11


@functools.lru_cache(maxsize=None)
def _session_results():
    try:
        return run_distributed(_session, 2, *_session_args(), timeout=TIMEOUT)
    except BaseException as e:  # noqa: BLE001 - cached: every test of the session reports it, one spawn
        return e


def _from_session(name):
    """``[rank 0's result, rank 1's result]`` of one scenario; fails the test with its traceback."""
    results = _session_results()
    if isinstance(results, BaseException):
        pytest.fail(f"the 2-rank session failed: {results}")
    per_rank = [r[name] for r in results]
    errors = [f"--- rank {i} ---\n{r['error']}" for i, r in enumerate(per_rank)
              if isinstance(r, dict) and "error" in r]
    if errors:
        pytest.fail(f"scenario {name} raised:\n" + "\n".join(errors), pytrace=False)
    return per_rank


# 1. embeddings of different dtypes on different ranks ----------------------------------------------
def _mixed_dtypes(rank, world):
    d, C, sizes = 8, 13, [3, 4]
    x_all, y_all, w_all = _problem(1, sizes, C, d)
    head = _head(d, C, w_all)
    x, y = _local(rank, sizes, x_all, y_all)
    x = x.to(torch.float64 if rank == 0 else torch.float32).requires_grad_()
    with pytest.raises(ValueError, match="dtype") as info:
        head(x, y)
    return str(info.value)


def test_mixed_dtypes_same_error_on_every_rank():
    """Bug: float64 embeddings on rank 0 and float32 on rank 1 went into one all-gather of
    mismatched payloads (an error on one rank, a hang or garbage on the other) instead of a clear
    error. Now every rank raises the same ValueError naming the dtypes."""
    messages = run_distributed(_mixed_dtypes, 2, timeout=TIMEOUT)
    assert messages[0] == messages[1], messages
    assert "dtypes" in messages[0] and "float64" in messages[0] and "float32" in messages[0], messages[0]


def _empty_rank_other_dtype(rank, world):
    d, C, sizes = 8, 13, [5, 0]
    x_all, y_all, w_all = _problem(2, sizes, C, d)
    head = _head(d, C, w_all)
    if rank == 0:
        x, y = _local(rank, sizes, x_all, y_all)
        x = x.clone().requires_grad_()
    else:  # an empty batch built the obvious way: default dtype float32 (requires grad: see test 3)
        x, y = torch.empty(0, d).requires_grad_(), torch.empty(0, dtype=torch.long)
    loss = head(x, y)
    loss.backward()
    return loss.detach(), x.grad, head.weight.grad


def test_empty_rank_of_other_dtype_is_accepted():
    """Bug: a rank with an empty float32 batch next to float64 ranks broke the all-gather (payloads of
    different dtypes). An empty rank's dtype does not matter: it adopts the others' dtype, and the
    loss and gradients equal the float64 oracle."""
    d, C, sizes = 8, 13, [5, 0]
    x_all, y_all, w_all = _problem(2, sizes, C, d)
    ref_loss, ref_gx, ref_gw = reference_grads(x_all, w_all, y_all, **MARGIN_KW)
    results = run_distributed(_empty_rank_other_dtype, 2, timeout=TIMEOUT)
    for rank, (loss, gx, gw) in enumerate(results):
        torch.testing.assert_close(loss, ref_loss, rtol=1e-11, atol=1e-12)
        start, end = shard_bounds(C, 2, rank)
        torch.testing.assert_close(gw, ref_gw[start:end], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(results[0][1], 2 * ref_gx, rtol=1e-9, atol=1e-12)  # DDP convention: x world
    assert results[1][1].shape == (0, d) and results[1][1].dtype == torch.float32


# 2. a global batch of 0 or 1 row when d * itemsize is not a multiple of 8 ----------------------------
ODD_CASES = {  # name: (d, embedding dtype, per-rank batch sizes, seed)
    "fp32_d5_one_row": (5, torch.float32, [1, 0], 10),
    "fp32_d5_no_rows": (5, torch.float32, [0, 0], 11),
    "bf16_d6_one_row": (6, torch.bfloat16, [1, 0], 12),
    "bf16_d6_no_rows": (6, torch.bfloat16, [0, 0], 13),
}
ODD_C = 7


@_scenario
def _odd_width(rank, world, *_):
    out = {}
    for name, (d, dtype, sizes, seed) in ODD_CASES.items():
        try:  # each case on its own: every rank fails or passes a case at the same point
            x_all, y_all, w_all = _problem(seed, sizes, ODD_C, d)
            head = _head(d, ODD_C, w_all, dtype=torch.float32)  # fp32 rows; bf16 embeddings are promoted
            x, y = _local(rank, sizes, x_all.to(dtype), y_all)
            x = x.clone().requires_grad_()  # every rank trains: this test is about the gather only
            loss = head(x, y)
            loss.backward()
            out[name] = (loss.detach(), x.grad, head.weight.grad)
        except Exception:  # noqa: BLE001
            out[name] = {"error": traceback.format_exc()}
    return out


@pytest.mark.parametrize("name", list(ODD_CASES))
def test_tiny_global_batch_with_odd_row_width(name):
    """Bug: labels ride in the embeddings' all-gather as extra columns; with one global row (or none)
    the label columns were already "contiguous" at an element offset of d, so viewing them as int64
    failed when d * itemsize is not a multiple of 8: fp32 d=5 and bf16 d=6 crashed on 2 ranks (rank 0
    one row, rank 1 none; and both none). Now the loss equals the float64 oracle evaluated on the very
    inputs the head received (the bf16-rounded embeddings; the weight is fp32, so the head computes
    in fp32 and an fp32 tolerance is justified), and a wrong label would be far outside it."""
    d, dtype, sizes, seed = ODD_CASES[name]
    per_rank = [r[name] for r in _from_session("_odd_width")]
    errors = [f"--- rank {i} ---\n{r['error']}" for i, r in enumerate(per_rank) if isinstance(r, dict)]
    if errors:
        pytest.fail("\n".join(errors), pytrace=False)
    x_all, y_all, w_all = _problem(seed, sizes, ODD_C, d)
    x_in = x_all.to(dtype).double()  # exactly what rank 0 passed
    w_in = w_all.float().double()  # exactly the head's fp32 rows
    ref_loss, ref_gx, ref_gw = reference_grads(x_in, w_in, y_all, **MARGIN_KW)
    tol = dict(rtol=1e-5, atol=1e-5)  # fp32 arithmetic on |logits| <= s = 16
    for rank, (loss, gx, gw) in enumerate(per_rank):
        assert torch.isfinite(loss)
        torch.testing.assert_close(loss.double(), ref_loss, **tol)
        start, end = shard_bounds(ODD_C, 2, rank)
        torch.testing.assert_close(gw.double(), ref_gw[start:end], rtol=1e-4, atol=1e-5)
        assert gx.shape == (sizes[rank], d) and gx.dtype == dtype
    if sizes[0] == 1:
        # the returned embedding gradient is rounded to the embeddings' dtype: bf16 keeps 8 bits
        rtol = 1e-5 if dtype == torch.float32 else 2 ** -7
        torch.testing.assert_close(per_rank[0][1].double(), 2 * ref_gx, rtol=rtol,
                                   atol=rtol * float(ref_gx.abs().max()))
        # the check is sharp enough to see a label that did not survive the round trip
        for wrong in range(ODD_C):
            if wrong != int(y_all[0]):
                other = reference_loss(x_in, w_in, torch.tensor([wrong]), **MARGIN_KW)
                assert abs(float(other) - float(ref_loss)) > 100 * tol["atol"], wrong
    else:
        assert float(ref_loss) == 0.0  # an empty global batch: loss 0 by convention


# 3. a rank with an empty batch that needs no grad / a rank under no_grad -----------------------------
def _empty_rank_without_grad(rank, world):
    d, C, sizes = 8, 11, [4, 0]
    x_all, y_all, w_all = _problem(3, sizes, C, d)
    head = _head(d, C, w_all)
    if rank == 0:
        x, y = _local(rank, sizes, x_all, y_all)
        x = x.clone().requires_grad_()
    else:  # nothing to train on: a plain empty tensor, no requires_grad
        x, y = torch.empty(0, d, dtype=torch.float64), torch.empty(0, dtype=torch.long)
    loss = head(x, y)
    loss.backward()  # must not hang: rank 0's backward reduce-scatter needs rank 1 too
    return loss.detach(), x.grad, head.weight.grad


def test_empty_rank_without_grad_joins_backward():
    """Bug: a rank whose embeddings do not require grad (an empty batch, torch.empty(0, d)) had no
    all-gather node in its graph, so its backward skipped the reduce-scatter that the training rank
    waited in: rank 0 hung. Now both ranks complete backward, and rank 0's embedding gradient and
    both ranks' weight gradients equal the float64 oracle."""
    d, C, sizes = 8, 11, [4, 0]
    x_all, y_all, w_all = _problem(3, sizes, C, d)
    ref_loss, ref_gx, ref_gw = reference_grads(x_all, w_all, y_all, **MARGIN_KW)
    results = run_distributed(_empty_rank_without_grad, 2, timeout=TIMEOUT)
    for rank, (loss, gx, gw) in enumerate(results):
        torch.testing.assert_close(loss, ref_loss, rtol=1e-11, atol=1e-12)
        start, end = shard_bounds(C, 2, rank)
        torch.testing.assert_close(gw, ref_gw[start:end], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(results[0][1], 2 * ref_gx, rtol=1e-9, atol=1e-12)
    assert results[1][1] is None  # rank 1's input never asked for a gradient


@_scenario
def _one_rank_under_no_grad(rank, world, *_):
    d, C, sizes = 8, 11, [3, 2]
    x_all, y_all, w_all = _problem(4, sizes, C, d)
    head = _head(d, C, w_all)
    x, y = _local(rank, sizes, x_all, y_all)
    x = x.clone().requires_grad_()
    with torch.set_grad_enabled(rank == 0), pytest.raises(ValueError, match="no_grad") as info:
        head(x, y)  # rank 1 evaluates under no_grad while rank 0 trains
    return str(info.value)


def test_rank_under_no_grad_same_error_on_every_rank():
    """Bug: a rank that ran the step under torch.no_grad() while the other trained built no backward
    graph, so the training rank's backward reduce-scatter waited forever. Now every rank raises the
    same ValueError in forward, naming no_grad and the rank."""
    messages = _from_session("_one_rank_under_no_grad")
    assert messages[0] == messages[1], messages
    assert "rank(s) [1]" in messages[0], messages[0]


# 4. double backward ---------------------------------------------------------------------------------
@_scenario
def _double_backward(rank, world, *_):
    d, C, sizes = 6, 9, [3, 2]
    x_all, y_all, w_all = _problem(5, sizes, C, d)
    head = _head(d, C, w_all)
    x, y = _local(rank, sizes if world > 1 else [sum(sizes)], x_all, y_all)
    x = x.clone().requires_grad_()
    loss = head(x, y)
    with pytest.raises(RuntimeError, match="double backward") as info:
        torch.autograd.grad(loss, x, create_graph=True)
    return str(info.value)


def test_double_backward_refused_single_rank():
    """Bug: autograd.grad(loss, x, create_graph=True) (a gradient penalty through the head) returned a
    first gradient that silently did not depend on x (the hand-written backward is not
    differentiable). Now it raises a RuntimeError saying double backward is not supported."""
    assert _double_backward(0, 1).startswith("PartialFC")


def test_double_backward_refused_on_every_rank():
    """Same bug on a 2-rank gloo group (the all-gather's backward as well): every rank raises."""
    messages = _from_session("_double_backward")
    assert all("double backward" in m for m in messages), messages


# 5. state dicts that name their rows ------------------------------------------------------------------
LAYOUT_KEYS = ("num_classes", "embedding_size", "class_start", "class_end", "world_size", "rank",
               "rows_per_class", "step")


def test_state_dict_names_its_rows():
    """Bug: ``_extra_state`` held only {"step"}: nothing said which classes' rows a state dict holds,
    so a wrong shard loaded silently. Now it carries the layout of the rows and the step."""
    head = PartialFC(6, 7, margin=MARGIN)
    head(torch.randn(3, 6), torch.tensor([0, 4, 6]))
    extra = head.state_dict()["_extra_state"]
    assert torch.is_tensor(extra)  # a tensor, so that safetensors can store it
    extra = read_layout(extra)
    assert {k: extra.get(k) for k in LAYOUT_KEYS} == dict(
        num_classes=7, embedding_size=6, class_start=0, class_end=7, world_size=1, rank=0, rows_per_class=1,
        step=1)


def _snapshot(sd):
    return {k: (id(v), v.clone() if torch.is_tensor(v) else copy.deepcopy(v)) for k, v in sd.items()}


def _unchanged(sd, snap):
    """Same keys, the same objects, the same values."""
    if set(sd) != set(snap):
        return False
    for k, v in sd.items():
        ident, saved = snap[k]
        same = torch.equal(v, saved) if torch.is_tensor(v) else v == saved
        if id(v) != ident or not same:
            return False
    return True


def _bits(t):
    return t.detach().clone().view(torch.int32 if t.dtype == torch.float32 else torch.int64)


def _raised(fn, exc_type):
    """The message of the ``exc_type`` that ``fn()`` raises, or "no error"."""
    try:
        fn()
    except exc_type as e:
        return str(e)
    return "no error"


@_scenario
def _state_layouts(rank, world, single_rank_sd, w11):
    import torch.distributed as dist
    d, out = 6, {}
    # a 7-class single-rank state dict into a 14-class 2-rank head: 7 rows on each rank, shapes agree
    head14 = PartialFC(d, 14, margin=MARGIN)
    out["extra14"] = head14.state_dict()["_extra_state"]
    before, snap = _bits(head14.weight), _snapshot(single_rank_sd)
    out["msg14"] = _raised(lambda: head14.load_state_dict(single_rank_sd), ValueError)
    out["weight14_unchanged"] = torch.equal(_bits(head14.weight), before)
    out["caller_sd_unchanged"] = _unchanged(single_rank_sd, snap)
    # rank 0's state dict of a 10-class head loaded on rank 1 (5 rows each: the shapes agree)
    head10 = PartialFC(d, 10, margin=MARGIN, seed=1)
    box = [head10.state_dict() if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    before = _bits(head10.weight)
    out["msg10"] = _raised(lambda: head10.load_state_dict(box[0]), ValueError)  # rank 0: its own rows
    out["weight10_unchanged"] = torch.equal(_bits(head10.weight), before)
    return out


def test_state_dict_of_other_rows_refused():
    """Bug: a 7-class single-rank state dict loaded silently into rank 1 of a 14-class 2-rank head (same
    row count, other classes), and a state dict saved by rank 0 of a 2-rank 10-class head loaded
    silently into rank 1. Now both raise a ValueError naming load_head_shards, before anything is
    copied (the weight is unchanged bit for bit), and the caller's state dict is not mutated."""
    results = _from_session("_state_layouts")
    for rank, out in enumerate(results):
        assert "load_head_shards" in out["msg14"], out["msg14"]
        assert out["weight14_unchanged"] and out["caller_sd_unchanged"]
        assert out["weight10_unchanged"]
    assert results[0]["msg10"] == "no error"  # rank 0's own rows load as before
    assert "load_head_shards" in results[1]["msg10"], results[1]["msg10"]
    for rank, out in enumerate(results):  # the layout each rank's state dict names
        extra = read_layout(out["extra14"])
        assert tuple(extra.get(k) for k in ("class_start", "class_end", "world_size", "rank")) == \
            (7 * rank, 7 * rank + 7, 2, rank), extra


@_scenario
def _state_consolidate(rank, world, single_rank_sd, w11):
    from partialfc import consolidate_state_dict
    head11 = _head(6, 11, w11, dtype=torch.float32)  # 6 + 5 rows, set explicitly from w11
    head11.step = 4
    shard = {k: v.clone() if torch.is_tensor(v) else v for k, v in head11.state_dict().items()}
    return {"consolidated": consolidate_state_dict(head11), "shard": shard}


def _state_three_ranks(rank, world, consolidated_path, shards, w11):
    from partialfc import load_head_shards
    start, end = shard_bounds(11, 3, rank)
    want = w11[start:end].float()
    head = PartialFC(6, 11, margin=MARGIN, seed=7)
    head.load_state_dict(torch.load(consolidated_path, weights_only=True))
    from_consolidated = (torch.equal(head.weight.detach(), want), head.step)
    other = PartialFC(6, 11, margin=MARGIN, seed=8)
    load_head_shards(other, shards)
    from_shards = (torch.equal(other.weight.detach(), want), other.step)
    # shard 1 of 2 (classes [6, 11)) is not any 3-rank layout's rows: loading it alone raises
    single = _raised(lambda: PartialFC(6, 11, margin=MARGIN).load_state_dict(shards[1]), ValueError)
    return from_consolidated, from_shards, single


def test_consolidated_state_loads_on_any_world_and_shards_reshard(tmp_path):
    """Bug: there was no way to move a head between world sizes (a state saved from rank 0 only kept
    only rank 0's classes). Now consolidate_state_dict (collective) gives all 11 rows on both ranks of
    a 2-rank head; saved to a file and loaded into the heads of a 3-rank world, each takes exactly
    its rows; load_head_shards(head, [sd_rank0, sd_rank1]) re-shards the 2-rank states to 3 ranks."""
    _, w11 = _session_args()
    results = _from_session("_state_consolidate")
    for out in results:
        assert torch.equal(out["consolidated"]["weight"], w11.float())  # all 11 rows, in class order
        assert read_layout(out["consolidated"]["_extra_state"])["step"] == 4
    path = tmp_path / "consolidated.pt"
    torch.save(results[0]["consolidated"], path)
    three = run_distributed(_state_three_ranks, 3, str(path), [results[0]["shard"], results[1]["shard"]], w11,
                            timeout=TIMEOUT)
    for rank, (from_consolidated, from_shards, single_msg) in enumerate(three):
        assert from_consolidated == (True, 4), (rank, from_consolidated)
        assert from_shards == (True, 4), (rank, from_shards)
        assert "load_head_shards" in single_msg, (rank, single_msg)


def test_legacy_state_dict_still_loads():
    """Guard for the fix above (the old code loaded it too): a state dict written before the layout
    was saved (``_extra_state`` = {"step": 3}) with the right number of rows still loads."""
    head = PartialFC(6, 7, margin=MARGIN)
    w = torch.randn(7, 6)
    head.load_state_dict({"weight": w, "_extra_state": {"step": 3}})
    assert torch.equal(head.weight.detach(), w) and head.step == 3


# 6. embedding norms that over- or underflow when squared ----------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_huge_and_tiny_embedding_rows(dtype):
    """Bug: |x| was computed as sqrt(sum x^2) in the accumulation dtype (fp32): rows of 1e19 overflowed
    to inf and rows of 1e-25 underflowed to 0, and either way the row was treated as a zero vector
    (wrong loss, zero gradient). The loss only depends on the direction: it must equal the oracle on
    the unscaled rows, and the embedding gradient of a row scaled by c is the unscaled one / c."""
    d, C, B = 8, 9, 6
    g = torch.Generator().manual_seed(7)
    x = torch.randn(B, d, generator=g, dtype=torch.float64)
    w = torch.randn(C, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (B,), generator=g)
    c = torch.tensor([1e19, 1e-25, 1.0, 1e19, 1e-25, 1.0], dtype=torch.float64)[:, None]
    x_in = (x * c).to(dtype)
    unscaled = x_in.double() / c  # the direction the head was given, in float64
    head = PartialFC(d, C, margin=MARGIN)  # fp32 rows
    with torch.no_grad():
        head.weight.copy_(w)
    ref_loss, ref_gx, ref_gw = reference_grads(unscaled, head.weight, y, **MARGIN_KW)
    xg = x_in.clone().requires_grad_()
    loss = head(xg, y)
    loss.backward()
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(head.weight.grad.double(), ref_gw, rtol=1e-4, atol=1e-5)
    # the gradient of row i is ref_gx[i] / c_i; compared row-relative (the rows span 44 decades)
    rtol = 1e-5 if dtype == torch.float32 else 2 ** -7  # bf16: the returned gradient keeps 8 bits
    expected = ref_gx / c
    got = xg.grad.double()
    assert torch.isfinite(got).all()
    row_scale = expected.abs().amax(dim=1, keepdim=True)
    torch.testing.assert_close(got / row_scale, expected / row_scale, rtol=rtol, atol=rtol)


# 7. deepcopy / pickle of a head with an explicit process group -----------------------------------------
def _pickled(module):
    buf = io.BytesIO()
    torch.save(module, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@_scenario
def _copy_and_pickle(rank, world, *_):
    import torch.distributed as dist
    d, C, sizes = 6, 9, [3, 2]
    whole = dist.new_group([0, 1])
    lone = dist.new_group([0])  # a proper subgroup of the world (every rank takes part in creating it)
    x_all, y_all, w_all = _problem(8, sizes, C, d)
    x, y = _local(rank, sizes, x_all, y_all)
    head = PartialFC(d, C, margin=MARGIN, group=whole).double()
    with torch.no_grad():
        head.weight.copy_(w_all[head.class_start: head.class_end])
    out = {"loss": float(head(x, y).detach())}
    twin = copy.deepcopy(head)
    out["twin_shares_group"] = twin.group is whole
    out["twin_own_weight"] = twin.weight is not head.weight and torch.equal(twin.weight, head.weight)
    out["twin_loss"] = float(twin(x, y).detach())
    back = _pickled(head)
    out["back_group_is_none"] = back.group is None
    out["back_loss"] = float(back(x, y).detach())
    if rank == 0:  # a head on the subgroup {0}: only rank 0 is a member
        solo = PartialFC(d, C, margin=MARGIN, group=lone).double()
        solo_loss = float(solo(x, y).detach())
        restored = _pickled(solo)
        with pytest.raises(RuntimeError, match="head.group") as info:
            restored(x, y)
        out["solo_msg"] = str(info.value)
        restored.group = lone
        out["solo_restored_same"] = float(restored(x, y).detach()) == solo_loss
    return out


def test_deepcopy_and_pickle_with_explicit_group():
    """Bug: a head built with group=dist.new_group([0, 1]) could not be deep-copied (EMA or model
    averaging copies) nor pickled (torch.save(model)): a ProcessGroup cannot be copied. Now a deepcopy
    shares the group and computes the same loss; pickling works, a head whose group was the whole
    world comes back with group None (the default group) and works, and a head on a proper subgroup
    comes back with a clear RuntimeError on forward saying to set head.group."""
    d, C, sizes = 6, 9, [3, 2]
    x_all, y_all, w_all = _problem(8, sizes, C, d)
    ref_loss = float(reference_loss(x_all, w_all, y_all, **MARGIN_KW))
    results = _from_session("_copy_and_pickle")
    for out in results:
        assert out["loss"] == pytest.approx(ref_loss, rel=1e-11)
        assert out["twin_shares_group"] and out["twin_own_weight"]
        assert out["twin_loss"] == out["loss"] and out["back_loss"] == out["loss"]
        assert out["back_group_is_none"]
    assert "head.group" in results[0]["solo_msg"] and results[0]["solo_restored_same"]


# 8. torch.compile ---------------------------------------------------------------------------------------
class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Linear(10, 8)
        self.head = PartialFC(8, 13, margin=MARGIN)

    def forward(self, inp, labels):
        return self.head(self.backbone(inp), labels)


def test_torch_compile_same_losses_no_recompilation():
    """Bug: under torch.compile dynamo traced into the head, whose Python step counter and host-side
    batch sizes change every step, so the model recompiled every step (and past the recompile limit
    fell back to eager). Now the head runs eagerly inside the compiled model: the losses equal the
    eager model's and no new frame or graph is compiled after step 2."""
    from torch._dynamo.utils import counters
    torch.manual_seed(0)
    eager = _Net()
    twin = copy.deepcopy(eager)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(5, 10, generator=g), torch.randint(0, 13, (5,), generator=g)) for _ in range(6)]
    torch._dynamo.reset()
    counters.clear()
    try:
        compiled = torch.compile(twin, backend="eager")
        opt_e = torch.optim.SGD(eager.parameters(), lr=0.5)
        opt_c = torch.optim.SGD(twin.parameters(), lr=0.5)
        losses_e, losses_c, seen = [], [], {}
        for step, (inp, lab) in enumerate(batches, start=1):
            for model, opt, losses in ((eager, opt_e, losses_e), (compiled, opt_c, losses_c)):
                opt.zero_grad()
                loss = model(inp, lab)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
            seen[step] = (counters["frames"]["ok"], counters["stats"]["unique_graphs"])
        assert seen[2][0] >= 1, "nothing was compiled"
        assert seen[6] == seen[2], f"(frames compiled, unique graphs) after each step: {seen}"
        torch.testing.assert_close(losses_c, losses_e, rtol=1e-6, atol=1e-6)
        assert len(set(losses_e)) == 6  # the steps really differ
    finally:
        torch._dynamo.reset()
