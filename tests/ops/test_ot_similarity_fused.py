"""ot_similarity fused backends (cpu = C++/OpenMP/SIMD; triton plumbing) against the reference.

Comparisons follow design.md §4: float64 results must match the reference (index sets too, on
these inputs); in float32 the top entries of a nearly converged plan are near-ties at the level of
fp32 rounding (the fp32 reference itself disagrees with the fp64 one on ~10% of the problems), so
there the selected entries are checked through the float64 reference plan: each selected entry
must rank within ``LP_TOL`` of the reference's entry of the same rank, and its value must be the
exact similarity of that pair.
"""
import os

import pytest
import torch

import concept_kernels as ck
from concept_kernels import _backends, _ext
from concept_kernels.ops.ot_similarity import function as fused_fn
from concept_kernels.ops.ot_similarity.reference import log_plan, sinkhorn_log, stop_groups
from concept_kernels.testing import assert_close, logit_like_rows, ot_problem

NO_EXT = not _ext.HAS_EXT
needs_ext = pytest.mark.skipif(NO_EXT, reason=f"extension not built: {_ext.EXT_ERROR}")

SELECTS = ("sample", "topk", "cost")
STOPS = ("problem", "row", "all")
LP_TOL = 0.05  # log-plan slack for fp32 near-ties (fp32 rounding + a stop one iteration apart)


# The vector paths of the float32 CPU forward that this build has: "narrow" (8-problem lane groups;
# cost GEMM by column groups below 90% of a chunk's groups: Zen 4, AVX2) in every build, "wide"
# (16-problem lane groups; dense GEMM from 45%: AVX-512 at full width) only in AVX-512 builds. Each
# machine runs the paths it has (an AVX2 build runs its narrow path; nothing is skipped for lack of
# the wide one): build with CONCEPT_KERNELS_CPU_ARCH=x86-64-v3 to run the AVX2 side anywhere.
SIMD_PATHS = ("narrow", "wide") if _ext.simd_bits() == 512 else ("narrow",)


@pytest.fixture(params=SIMD_PATHS)
def simd_path(request, monkeypatch):
    """Each vector path of the float32 CPU forward that this build has, whichever this CPU would
    pick (see SIMD_PATHS)."""
    monkeypatch.setenv("CONCEPT_KERNELS_WIDE_SIMD", "1" if request.param == "wide" else "0")
    return request.param


def _ref_lp64(q, b, i, *, eps=0.01, max_iter=200, tol=1e-3, stop="problem"):
    """The reference's log plan (B, M, P*P) and similarities, computed in float64."""
    q, b = q.detach().double(), b.double()
    B, P, _ = q.shape
    M = i.shape[1]
    sim = torch.einsum("bpd,bmqd->bmpq", q, b[i])
    C = (1 - sim).reshape(B * M, P, P)
    f, g, _ = sinkhorn_log(C, eps=eps, max_iter=max_iter, tol=tol, groups=stop_groups(B, M, stop, q.device))
    return log_plan(C, f, g, eps).reshape(B, M, P * P), sim.reshape(B, M, P * P)


def _fwd(q, b, i, select, k, choice=None, stop="problem", eps=0.01, max_iter=200, tol=1e-3, backend="cpu"):
    """The custom op directly: (out (B, M, kk), aux)."""
    sel = ("sample", "topk", "cost").index(select)
    ch = choice if select == "sample" else torch.empty(0, dtype=torch.long)
    return fused_fn.ot_similarity_fused(q, b, i, ch, sel, k, eps, max_iter, tol, ("problem", "row", "all").index(stop),
                                        backend)


def _check_selection(out, aux, q, b, i, *, k, choice=None, stop="problem", eps=0.01, rank_tol=LP_TOL):
    """Near-tie-aware check of a sample/topk result against the float64 reference plan."""
    lp, sim = _ref_lp64(q, b, i, eps=eps, stop=stop)
    ranked = lp.sort(dim=-1, descending=True).values[..., :k]  # (B, M, k)
    want = ranked if choice is None else ranked.gather(-1, choice[..., None])
    got_lp = lp.gather(-1, aux)
    assert (got_lp - want).abs().max() <= rank_tol, f"selected entries off the reference ranking by {(got_lp - want).abs().max():.3g}"
    assert_close(out, sim.gather(-1, aux), name="out = similarity at the selected entries", dtype=out.dtype)
    return (aux == lp.topk(k, dim=-1).indices if choice is None else aux == lp.topk(k, dim=-1).indices.gather(-1, choice[..., None]))


@needs_ext
@pytest.mark.parametrize("stop", STOPS)
@pytest.mark.parametrize("select", SELECTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.usefixtures("simd_path")
def test_cpu_matches_reference(select, stop, dtype):
    q, b, i = ot_problem(3, 40, 50, dim=32, seed=1, dtype=dtype)
    k = 6 if select == "topk" else 3
    choice = torch.randint(k, (3, 40)) if select == "sample" else None
    got = ck.ot_similarity(q, b, i, select=select, k=k, choice=choice, stop=stop, backend="cpu")
    ref = ck.ot_similarity(q, b, i, select=select, k=k, choice=choice, stop=stop, backend="reference")
    assert got.shape == ref.shape and got.dtype == ref.dtype == dtype
    if dtype == torch.float64:
        assert_close(got, ref, name=f"{select}/{stop} fp64")
        if select != "cost":  # index sets agree too (well separated in fp64)
            out, aux = _fwd(q, b, i, select, k, choice, stop)
            assert _check_selection(out, aux, q, b, i, k=k, choice=choice, stop=stop, rank_tol=1e-9).all()
    elif select == "cost":
        # a stop decided one iteration apart (err within fp32 rounding of tol) moves 1 - <pi, C> by
        # ~1e-5..1e-4: compare to the float64 reference with that slack, and most problems tightly
        ref64 = ck.ot_similarity(q.double(), b.double(), i, select="cost", stop=stop, backend="reference")
        assert (got.double() - ref64).abs().max() < 3e-4
        assert ((got - ref).abs() <= 1e-5).float().mean() > 0.9
    else:
        out, aux = _fwd(q, b, i, select, k, choice, stop)
        exact = _check_selection(out, aux, q, b, i, k=k, choice=choice, stop=stop)
        assert exact.float().mean() > 0.8  # most index sets agree exactly even in fp32
        assert_close(got, out.squeeze(-1) if select == "sample" else out, name="api vs op")


@needs_ext
def test_scalar_solver_matches_reference(monkeypatch):
    """The scalar per-problem solver (what the CUDA launcher runs) on the CPU."""
    monkeypatch.setenv("CONCEPT_KERNELS_OT_SCALAR", "1")
    q, b, i = ot_problem(2, 30, 40, dim=24, seed=2, dtype=torch.float64)
    for select, k in (("topk", 5), ("cost", 1)):
        for stop in ("problem", "all"):
            got = ck.ot_similarity(q, b, i, select=select, k=k, stop=stop, backend="cpu")
            ref = ck.ot_similarity(q, b, i, select=select, k=k, stop=stop, backend="reference")
            assert_close(got, ref, name=f"scalar solver {select}/{stop}")
    q32, b32 = q.float(), b.float()
    out, aux = _fwd(q32, b32, i, "topk", 5)
    _check_selection(out, aux, q32, b32, i, k=5)


@needs_ext
@pytest.mark.parametrize("select", SELECTS)
def test_gradients_match_reference_autograd(select):
    q, b, i = ot_problem(2, 7, 9, dim=20, seed=3, dtype=torch.float64)
    k = 4
    choice = torch.randint(k, (2, 7)) if select == "sample" else None
    w = torch.randn(2, 7, k) if select == "topk" else torch.randn(2, 7)
    grads = []
    for backend in ("cpu", "reference"):
        x = q.clone().requires_grad_(True)
        (ck.ot_similarity(x, b, i, select=select, k=k, choice=choice, backend=backend) * w.double()).sum().backward()
        grads.append(x.grad)
    assert_close(grads[0], grads[1], name=f"grad {select}")


def _check_backward_pieces(q, b, i, select, dtype):
    """The fused CPU backward against a float64 scatter of the selected entries, and bitwise equal
    with 1 and 2 threads.

    Tolerance from the summation: each output dq[b, p, d] is a sum of n terms x = go * pi * y
    (select=cost: n = M * P, pi the plan entries) or x = go * y (sample/topk: n = the entries
    selected in row p). Computed in `dtype` with unit roundoff u = eps / 2, in ANY summation order
    and with or without FMA (at most 2 roundings per product), its error is at most
    (n + 2) * u * sum|x| (Higham, Accuracy and Stability of Numerical Algorithms, §4.2); the float64
    reference adds the same bound with u64, and rounding it to `dtype` adds u * |want|."""
    k = 5 if select == "topk" else 3
    choice = torch.randint(k, i.shape) if select == "sample" else None
    out, aux = _fwd(q, b, i, select, k, choice)
    go = torch.randn(out.shape, dtype=dtype)
    grads = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            grads.append(fused_fn.ot_similarity_fused_bwd(go, q, b, i, aux, SELECTS.index(select), "cpu"))
    finally:
        torch.set_num_threads(old)
    assert torch.equal(grads[0], grads[1])
    B, P, D = q.shape
    Y = b.double()[i]  # (B, M, P, D): bank rows of every problem
    if select == "cost":  # aux = plan (B, M, P, P): dq_i = sum_m go * sum_j pi_ij y_j
        g = go.double()[..., 0]  # (B, M)
        want = torch.einsum("bm,bmij,bmjd->bid", g, aux.double(), Y)
        magnitude = torch.einsum("bm,bmij,bmjd->bid", g.abs(), aux.double().abs(), Y.abs())
        terms = torch.full((B, P, 1), float(i.shape[1] * P), dtype=torch.float64)
    else:  # aux = flat plan entries i * P + j: dq_i += go * y_j
        rows, cols = aux // P, aux % P
        picked = Y.gather(2, cols[..., None].expand(-1, -1, -1, D))  # (B, M, kk, D)
        x = (go.double()[..., None] * picked).reshape(B, -1, D)  # go (B, M, kk)
        at_row = rows.reshape(B, -1, 1)
        want = torch.zeros(B, P, D, dtype=torch.float64).scatter_add_(1, at_row.expand(-1, -1, D), x)
        magnitude = torch.zeros(B, P, D, dtype=torch.float64).scatter_add_(1, at_row.expand(-1, -1, D), x.abs())
        terms = torch.zeros(B, P, 1, dtype=torch.float64).scatter_add_(
            1, at_row, torch.ones(at_row.shape, dtype=torch.float64))
    u, u64 = torch.finfo(dtype).eps / 2, torch.finfo(torch.float64).eps / 2
    bound = (terms + 2) * (u + u64) * magnitude + u * want.abs()
    err = (grads[0].double() - want).abs()
    worst = (err - bound).flatten().argmax()
    assert (err <= bound).all(), (
        f"grad {select} {dtype}: error {err.flatten()[worst].item():.3e} > summation bound "
        f"{bound.flatten()[worst].item():.3e} at flat index {worst.item()}")


@needs_ext
@pytest.mark.parametrize("select", SELECTS)
@pytest.mark.parametrize("dtype,dim", [(torch.float32, 200), (torch.float64, 200), (torch.float32, 301)])
def test_backward_over_many_pieces_of_bank_rows(select, dtype, dim):
    """The CPU backward cuts the problems (in bank-row order) into pieces of at most 256 KB of bank
    rows, buckets each piece's entries by output row and sums pieces into up to 16 span accumulators
    fixed by the shapes. 1,200 problems over 400 rows of 9 x 200 (about 11 pieces; select=cost has
    81 entries per problem, more pieces; D = 301 = a block of 16 zmm, 2 vectors, a half vector and
    5 single columns)."""
    q, b, i = ot_problem(4, 300, 400, dim=dim, seed=31, dtype=dtype)
    _check_backward_pieces(q, b, i, select, dtype)


@needs_ext
@pytest.mark.parametrize("select", SELECTS)
@pytest.mark.parametrize("layout", ["rows_shared_by_thousands", "bank_far_larger_than_problems"])
def test_backward_pieces_cut_inside_a_row_and_without_row_starts(select, layout):
    """Pieces also end inside one bank row once they hold 16,384 entries (2 rows shared by 9,600
    problems: 24,000 entries per row for topk, 388,800 for cost), and are found by scanning the
    problem order when the bank is too large for the counting sort's row starts (R > 4 * problems
    + 1024)."""
    if layout == "rows_shared_by_thousands":
        q, b, i = ot_problem(16, 600, 2, dim=24, seed=37)
    else:
        q, b, i = ot_problem(2, 100, 2000, dim=24, seed=41)
    _check_backward_pieces(q, b, i, select, torch.float32)


@needs_ext
@pytest.mark.parametrize("select", SELECTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backward_of_a_large_batch_in_query_order(select, dtype):
    """B = 4000 queries of M = 8 problems: grad_query (4000 x 9 x 40) is too large to stay in cache,
    so the backward runs in query order (each output row written once) instead of bank-row pieces
    (issue #19: 684 ms there vs 46 ms for B = 8, M = 4000)."""
    q, b, i = ot_problem(4000, 8, 600, dim=40, seed=43, dtype=dtype)
    _check_backward_pieces(q, b, i, select, dtype)


@needs_ext
@pytest.mark.parametrize("select,k", [("sample", 3), ("topk", 4)])
def test_gradcheck_float64(select, k):
    q, b, i = ot_problem(2, 3, 5, patches=4, dim=6, seed=5, dtype=torch.float64)
    q.requires_grad_(True)
    choice = torch.randint(k, (2, 3)) if select == "sample" else None
    fn = lambda x: ck.ot_similarity(x, b, i, select=select, k=k, choice=choice, eps=0.1, backend="cpu")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q,), eps=1e-6, atol=1e-6)


@needs_ext
@pytest.mark.parametrize("select", SELECTS)
def test_opcheck(select):
    q, b, i = ot_problem(2, 4, 6, patches=5, dim=8, seed=6)
    k = 3
    ch = torch.randint(k, (2, 4)) if select == "sample" else torch.empty(0, dtype=torch.long)
    sel = SELECTS.index(select)
    args = (q.clone().requires_grad_(True), b, i, ch, sel, k, 0.05, 50, 1e-3, 0, "cpu")
    torch.library.opcheck(fused_fn.ot_similarity_fused, args)
    # non-contiguous inputs reach the op too (it makes them contiguous)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(True)
    torch.library.opcheck(fused_fn.ot_similarity_fused, (qt, b, i, ch, sel, k, 0.05, 50, 1e-3, 0, "cpu"))
    out, aux = _fwd(q, b, i, select, k, ch)
    grad = torch.randn_like(out)
    torch.library.opcheck(fused_fn.ot_similarity_fused_bwd, (grad, q, b, i, aux, sel, "cpu"))
    fused_fn.register_cpp_fakes()
    torch.library.opcheck(torch.ops.concept_kernels.ot_similarity_fwd.default, (q, b, i, ch, sel, k, 0.05, 50, 1e-3, 1))
    torch.library.opcheck(torch.ops.concept_kernels.ot_similarity_bwd.default, (grad, q, b, i, aux, sel))


@needs_ext
def test_non_contiguous_inputs_through_the_api():
    q, b, i = ot_problem(2, 6, 8, dim=12, seed=7, dtype=torch.float64)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)
    bt = b.transpose(1, 2).contiguous().transpose(1, 2)
    it = i.t().contiguous().t()
    assert not (qt.is_contiguous() or bt.is_contiguous() or it.is_contiguous())
    for select in SELECTS:
        a = ck.ot_similarity(qt, bt, it, select=select, k=3, choice=torch.zeros(2, 6, dtype=torch.long) if select == "sample" else None, backend="cpu")
        c = ck.ot_similarity(q, b, i, select=select, k=3, choice=torch.zeros(2, 6, dtype=torch.long) if select == "sample" else None, backend="cpu")
        assert torch.equal(a, c)


@needs_ext
def test_torch_compile_fullgraph():
    q, b, i = ot_problem(2, 5, 7, dim=16, seed=8)
    choice = torch.randint(3, (2, 5))

    def f(x):
        return ck.ot_similarity(x, b, i, select="sample", k=3, choice=choice, backend="cpu").sum() + \
            ck.ot_similarity(x, b, i, select="topk", k=4, backend="cpu").sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x1, x2 = q.clone().requires_grad_(True), q.clone().requires_grad_(True)
    y1, y2 = compiled(x1), f(x2)
    torch.testing.assert_close(y1, y2)
    y1.backward()
    y2.backward()
    torch.testing.assert_close(x1.grad, x2.grad)


@needs_ext
def test_seeded_reproducibility_and_determinism():
    q, b, i = ot_problem(2, 30, 9, seed=9)
    torch.manual_seed(123)
    a = ck.ot_similarity(q, b, i, backend="cpu")
    torch.manual_seed(123)
    c = ck.ot_similarity(q, b, i, backend="cpu")
    torch.manual_seed(124)
    d = ck.ot_similarity(q, b, i, backend="cpu")
    assert torch.equal(a, c) and not torch.equal(a, d)
    torch.manual_seed(123)  # same draw as the reference makes
    r = ck.ot_similarity(q, b, i, backend="reference")
    assert ((a - r).abs() < 1e-5).float().mean() > 0.8  # same choice -> mostly the same entries
    # bitwise reproducible across runs and thread counts (fixed summation order, no atomics)
    x = q.clone().requires_grad_(True)
    ck.ot_similarity(x, b, i, select="topk", k=10, backend="cpu").sum().backward()
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y = q.clone().requires_grad_(True)
        out1 = ck.ot_similarity(y, b, i, select="topk", k=10, backend="cpu")
        out1.sum().backward()
    finally:
        torch.set_num_threads(old)
    assert torch.equal(out1, ck.ot_similarity(q, b, i, select="topk", k=10, backend="cpu"))
    assert torch.equal(x.grad, y.grad)


@needs_ext
@pytest.mark.parametrize("eps", [1e-3, 1e-2, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_small_eps_duplicates_and_d10(eps, dtype):
    g = torch.Generator().manual_seed(10)
    q = logit_like_rows(3, 9, classes=10, generator=g).to(dtype)  # D=10 as in the demo
    q[1] = q[0]  # duplicate query sets
    q[2, 1:] = q[2, 0]  # duplicate vectors inside a set
    bank = torch.cat([q.float(), logit_like_rows(2, 9, classes=10, generator=g)]).to(dtype)
    index = torch.tensor([[0, 1, 3], [0, 1, 4], [2, 2, 3]])
    for select in SELECTS:
        k = 10 if select == "topk" else 3
        choice = torch.randint(k, (3, 3)) if select == "sample" else None
        got = ck.ot_similarity(q, bank, index, select=select, k=k, choice=choice, eps=eps, backend="cpu")
        assert torch.isfinite(got).all(), (select, eps, dtype)
        assert got.dtype == (torch.float32 if dtype == torch.bfloat16 else dtype)
        if select == "cost":
            ref = ck.ot_similarity(q, bank, index, select=select, k=k, choice=choice, eps=eps, backend="reference")
            torch.testing.assert_close(got, ref, atol=1e-9 if dtype == torch.float64 else 3e-4, rtol=0)
        else:  # duplicates and converged plans (all dominant entries at log(1/P)) make ties
            qc = q.to(got.dtype)
            out, aux = _fwd(qc, bank.to(got.dtype), index, select, k, choice, eps=eps)
            _check_selection(out, aux, qc, bank.to(got.dtype), index, k=k, choice=choice, eps=eps)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("P", [1, 2, 7, 8, 9, 10, 16])
@pytest.mark.usefixtures("simd_path")
def test_patch_counts(P, dtype):
    """float64: the per-problem SIMD solver; float32: the lane solver (one problem per lane), whose
    runtime-P form serves every P but 9. 37 problems: two full lane groups and a partial one."""
    q, b, i = ot_problem(2, 37, 6, patches=P, dim=13, seed=11, dtype=dtype)
    k = min(P * P, 10)
    fp64 = dtype == torch.float64
    for select in SELECTS:
        choice = torch.randint(k, (2, 37)) if select == "sample" else None
        got = ck.ot_similarity(q, b, i, select=select, k=k, choice=choice, backend="cpu")
        ref = ck.ot_similarity(q.double(), b.double(), i, select=select, k=k, choice=choice, backend="reference")
        if select == "cost":
            if fp64:
                assert_close(got, ref, name=f"P={P} {select}")
            else:  # a stop one iteration apart (err within fp32 rounding of tol), see above
                assert (got.double() - ref).abs().max() < 3e-4
        else:  # small P converges to permutation plans whose entries tie at log(1/P)
            out, aux = _fwd(q, b, i, select, k, choice)
            _check_selection(out, aux, q, b, i, k=k, choice=choice, rank_tol=1e-6 if fp64 else LP_TOL)
            assert_close(got, out if select == "topk" else out.squeeze(-1), name="api vs op")


@needs_ext
@pytest.mark.parametrize("k", [3, 12, 40, 81])
@pytest.mark.usefixtures("simd_path")
def test_topk_when_rows_hold_many_of_the_top_entries(k):
    """The lane solver ranks k > 2 entries through each plan row's two largest entries and redoes a
    lane with full arg-max passes when a row's third entry would be picked. Diffuse plans (eps = 1)
    and large k make rows hold many of the top entries (k = 40, 81: every lane is redone; k = 12:
    some), so the picks are checked, rank by rank, against the float64 reference plan."""
    q, b, i = ot_problem(3, 40, 50, seed=5, dtype=torch.float32)
    out, aux = _fwd(q, b, i, "topk", k, eps=1.0)
    _check_selection(out, aux, q, b, i, k=k, eps=1.0, rank_tol=1e-4)


@needs_ext
@pytest.mark.usefixtures("simd_path")
def test_many_chunks_of_bank_rows():
    """The float forward works in chunks of bank rows (about 256 problems each, its own GEMM and
    lane groups); 1,500 problems over 5 queries (B*P = 45 columns, padded) span several chunks,
    and bank rows no problem uses (the upper half) are skipped. Selections are checked against the
    float64 reference plan, the costs against the float64 reference."""
    q, b, i = ot_problem(5, 300, 400, dim=24, seed=23, dtype=torch.float32)
    i = i % 200  # rows 200..399 unused
    out, aux = _fwd(q, b, i, "topk", 5)
    _check_selection(out, aux, q, b, i, k=5)
    got = ck.ot_similarity(q, b, i, select="cost", backend="cpu")
    ref = ck.ot_similarity(q.double(), b.double(), i, select="cost", backend="reference")
    assert (got.double() - ref).abs().max() < 3e-4


@needs_ext
@pytest.mark.parametrize("batch,patches", [(2, 4), (2, 9), (8, 9), (11, 9), (3, 16)])
@pytest.mark.usefixtures("simd_path")
def test_gemm_costs_for_every_column_layout(batch, patches):
    """The float forward's GEMM packs the B*P query patches as columns padded to a multiple of 8:
    blocks of full vectors, then fewer vectors and a half vector (B*P = 8, 18, 72, 99, 48 cover a
    half vector alone, after one, after four, after a full block and one, and none). The similarity
    at every selected entry must be the float64 dot product of its two patches."""
    q, b, i = ot_problem(batch, 30, 40, patches=patches, dim=37, seed=31, dtype=torch.float32)
    out, aux = _fwd(q, b, i, "topk", 7)
    rows, cols = aux // patches, aux % patches  # (B, M, k): query patch, bank patch
    qb = q.double()[torch.arange(batch)[:, None, None], rows]  # (B, M, k, D)
    kb = b.double()[i[..., None], cols]
    torch.testing.assert_close(out.double(), (qb * kb).sum(-1), atol=2e-6, rtol=0)
    _check_selection(out, aux, q, b, i, k=7)


def _index_layout(layout, batch, sets, rows, generator):
    """index (batch, sets) into `rows` bank rows: "random"; "all" (every query indexes every row:
    nothing to skip); "halves" (the first half of the queries indexes the first half of the bank,
    the others the second half)."""
    if layout == "random":
        return torch.randint(rows, (batch, sets), generator=generator)
    if layout == "all":
        return torch.arange(sets).remainder(rows).repeat(batch, 1)
    first = (torch.arange(batch) < batch // 2)[:, None]
    half = torch.randint(rows // 2, (batch, sets), generator=generator)
    return torch.where(first, half, half + rows // 2)


@needs_ext
@pytest.mark.parametrize("layout", ["random", "all", "halves"])
@pytest.mark.parametrize("batch,patches", [(8, 9), (5, 16), (6, 4), (7, 12)])
@pytest.mark.usefixtures("simd_path")
def test_gemm_computes_the_columns_each_bank_row_needs(layout, batch, patches):
    """The float forward's GEMM computes, for each bank row, only the 8-column groups of the queries
    that index it (plus the shared block of every query's last P mod 8 patches); a chunk of rows
    that every query indexes runs the dense GEMM. Every cost entry is read by the Sinkhorn, so the
    full plan (select="cost") and the selections are compared against the float64 reference, for
    P = 9 (own block 8 + rest 1), 16 (own only), 4 (rest only), 12 (8 + 4)."""
    q, b, _ = ot_problem(batch, 1, 60, patches=patches, dim=29, seed=41, dtype=torch.float32)
    i = _index_layout(layout, batch, 60, 60, torch.Generator().manual_seed(42))
    out, pi = _fwd(q, b, i, "cost", 1)
    lp, sim = _ref_lp64(q, b, i)
    torch.testing.assert_close(pi.double().reshape(lp.shape), lp.exp(), atol=2e-4, rtol=0)
    torch.testing.assert_close(out.double()[..., 0], (lp.exp() * sim).sum(-1), atol=2e-4, rtol=0)
    out, aux = _fwd(q, b, i, "topk", 5)
    _check_selection(out, aux, q, b, i, k=5)


@needs_ext
@pytest.mark.parametrize("path", SIMD_PATHS)
def test_vector_paths_and_gemms_agree_bitwise(path, monkeypatch):
    """Each lane computes its problem with the same operations whatever the group width and its
    group partners, and the dense and column-group GEMMs sum each similarity in the same k order: the
    float32 forward gives bitwise the results of the narrow path on a random index (column groups
    where a query meets few bank rows) both on that index and on one where every query also indexes
    every bank row (dense GEMM), on each vector path this build has (the wide one against the
    narrow). P = 9 and the runtime-P form; a partial lane group; a bank every query meets."""
    cases = [(8, 400, 420, 9, 64, 0), (8, 200, 400, 9, 64, 5), (5, 300, 400, 12, 37, 3),
             (2, 37, 6, 16, 13, 11)]

    def run(wide, dense):
        monkeypatch.setenv("CONCEPT_KERNELS_WIDE_SIMD", wide)
        results = []
        for B, M, R, P, D, seed in cases:
            q, b, i = ot_problem(B, M, R, patches=P, dim=D, seed=seed, dtype=torch.float32)
            choice = torch.randint(3, (B, M), generator=torch.Generator().manual_seed(seed))
            if dense:  # the same problems first, then every bank row for every query
                i = torch.cat([i, torch.arange(R).expand(B, R)], dim=1)
                choice = torch.cat([choice, torch.zeros(B, R, dtype=torch.long)], dim=1)
            for select, k, ch in (("topk", 10, None), ("sample", 3, choice), ("cost", 1, None)):
                out, aux = _fwd(q, b, i, select, k, ch)
                results.append((out[:, :M], aux[:, :M]))
        return results

    want = run("0", dense=False)
    wide = "1" if path == "wide" else "0"
    for got in ([] if path == "narrow" else [run(wide, dense=False)]) + [run(wide, dense=True)]:
        for (out0, aux0), (out1, aux1) in zip(want, got, strict=True):
            assert torch.equal(aux0, aux1) and torch.equal(out0, out1)


@needs_ext
def test_wide_simd_override_is_validated(monkeypatch):
    """CONCEPT_KERNELS_WIDE_SIMD is 0, 1 or unset; anything else, or 1 where the build has no
    AVX-512, is an error naming the variable (never a silent choice)."""
    q, b, i = ot_problem(2, 5, 6, dim=8, seed=0)
    monkeypatch.setenv("CONCEPT_KERNELS_WIDE_SIMD", "yes")
    with pytest.raises(ValueError, match="CONCEPT_KERNELS_WIDE_SIMD must be 0, 1 or unset"):
        ck.ot_similarity(q, b, i, select="topk", k=3, backend="cpu")
    monkeypatch.setenv("CONCEPT_KERNELS_WIDE_SIMD", "1")
    if _ext.simd_bits() == 512:
        assert _ext.wide_simd() is True
    else:
        with pytest.raises(ValueError, match="CONCEPT_KERNELS_WIDE_SIMD=1, but .* without AVX-512"):
            ck.ot_similarity(q, b, i, select="topk", k=3, backend="cpu")
    monkeypatch.setenv("CONCEPT_KERNELS_WIDE_SIMD", "0")
    assert _ext.wide_simd() is False


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_costs_from_the_gemm_and_from_dot_products_agree(dtype):
    """A bank about as large as the sets per query (R <= 2M) takes its costs from one GEMM of every
    bank patch with every query patch; a much larger bank, from per-problem dot products. The same
    problems through both paths give the same results (to the rounding of the dot products)."""
    q, b, i = ot_problem(3, 40, 50, dim=32, seed=21, dtype=dtype)
    extra = logit_like_rows(200, 9, classes=32, generator=torch.Generator().manual_seed(22)).to(dtype)
    big = torch.cat([b, extra])  # R = 250 > 2M: dot products; indices unchanged
    for select, k in (("topk", 6), ("cost", 1)):
        out_g, aux_g = _fwd(q, b, i, select, k)
        out_d, aux_d = _fwd(q, big, i, select, k)
        if select == "cost":
            torch.testing.assert_close(out_g, out_d, atol=1e-12 if dtype == torch.float64 else 3e-4, rtol=0)
        elif dtype == torch.float64:
            assert torch.equal(aux_g, aux_d)
            assert_close(out_g, out_d, name="gemm vs dot products")
        else:  # fp32: near-ties may flip; both must be valid selections
            _check_selection(out_g, aux_g, q, b, i, k=k)
            _check_selection(out_d, aux_d, q, big, i, k=k)


@needs_ext
def test_auto_picks_cpu_and_limits():
    assert _backends.select("ot_similarity", torch.device("cpu")).name == "cpu"
    q, b, i = ot_problem(1, 2, 3, patches=17, dim=5, seed=12)
    ref = ck.ot_similarity(q, b, i, select="topk", k=3, backend="reference")
    torch.testing.assert_close(ck.ot_similarity(q, b, i, select="topk", k=3), ref)  # auto: P=17 -> reference
    with pytest.raises(ck.BackendUnavailableError, match="cpu kernels take P <= 16"):
        ck.ot_similarity(q, b, i, select="topk", k=3, backend="cpu")
    with pytest.raises(ck.BackendUnavailableError, match="backend 'cuda' was requested but cannot run here"):
        ck.ot_similarity(q[:, :9], b[:, :9], i, backend="cuda")


@pytest.fixture
def no_ext(monkeypatch):
    """Simulate a missing extension, then restore the real state."""
    def broken():
        raise ImportError("simulated: no _C")

    monkeypatch.setattr(_ext, "_import_ext", broken)
    _ext._reset_for_tests()
    yield
    monkeypatch.undo()
    _ext._reset_for_tests()


def test_missing_extension_gives_explicit_errors(no_ext):
    assert not _ext.HAS_EXT
    q, b, i = ot_problem(1, 2, 3, seed=13)
    with pytest.raises(ck.BackendUnavailableError, match="backend 'cpu' was requested but cannot run here.*simulated: no _C"):
        ck.ot_similarity(q, b, i, backend="cpu")
    assert _backends.select("ot_similarity", torch.device("cpu")).name == "reference"  # auto degrades
    ck.ot_similarity(q, b, i)  # runs on the reference
    with pytest.raises(RuntimeError, match="needs the compiled extension.*simulated"):
        _fwd(q, b, i, "topk", 3)


@needs_ext
def test_bad_input_to_the_kernels_is_reported():
    q, b, i = ot_problem(2, 3, 4, seed=14)
    op = torch.ops.concept_kernels.ot_similarity_fwd
    E = torch.empty(0, dtype=torch.long)
    with pytest.raises(RuntimeError, match=r"index values must lie in \[0, 4\)"):
        op(q, b, torch.full((2, 3), 4), E, 1, 3, 0.01, 10, 1e-3, 0)
    with pytest.raises(RuntimeError, match="bank must be Float"):
        op(q, b.double(), i, E, 1, 3, 0.01, 10, 1e-3, 0)
    with pytest.raises(RuntimeError, match="query must be contiguous"):
        op(q.transpose(1, 2).contiguous().transpose(1, 2), b, i, E, 1, 3, 0.01, 10, 1e-3, 0)
    with pytest.raises(RuntimeError, match=r"k must lie in \[1, P\*P = 81\]"):
        op(q, b, i, E, 1, 82, 0.01, 10, 1e-3, 0)
    with pytest.raises(RuntimeError, match=r"choice values must lie in \[0, 3\)"):
        op(q, b, i, torch.full((2, 3), 3), 0, 3, 0.01, 10, 1e-3, 0)
    with pytest.raises(RuntimeError, match="stop must be 0"):
        op(q, b, i, E, 1, 3, 0.01, 10, 1e-3, 5)
    # and through the public API with the cpu backend, before any kernel runs
    with pytest.raises(ValueError, match=r"index values must lie in \[0, 4\)"):
        ck.ot_similarity(q, b, torch.full((2, 3), 4), backend="cpu")
    with pytest.raises(ValueError, match="k must be <= P\\*P = 81"):
        ck.ot_similarity(q, b, i, select="topk", k=82, backend="cpu")
    with pytest.raises(ValueError, match="bank must have shape"):
        ck.ot_similarity(q, b[:, :4], i, backend="cpu")
    with pytest.raises(TypeError, match="index must have dtype int64"):
        ck.ot_similarity(q, b, i.int(), backend="cpu")


def _triton_ready():
    why = _backends.reasons("ot_similarity", "triton", torch.device("cpu"), explicit=True)
    return (not why, "; ".join(why))


@pytest.mark.skipif(not _triton_ready()[0], reason=f"triton backend not usable here: {_triton_ready()[1]}")
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 on CPU")
def test_triton_through_the_same_autograd():
    q, b, i = ot_problem(1, 3, 4, patches=3, dim=8, seed=15, dtype=torch.float64)
    for select, k in (("topk", 3), ("sample", 2), ("cost", 1)):
        choice = torch.randint(k, (1, 3)) if select == "sample" else None
        grads = []
        for backend in ("triton", "reference"):
            x = q.clone().requires_grad_(True)
            out = ck.ot_similarity(x, b, i, select=select, k=k, choice=choice, eps=0.1, backend=backend)
            out.sum().backward()
            grads.append((out, x.grad))
        torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grads[0][1], grads[1][1], atol=1e-5, rtol=1e-5)
