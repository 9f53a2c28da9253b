"""Loss library tests: golden values from the spec's formulas (evaluated here with Python's
math module, independently of the implementation), reductions, masks, dtypes, grad mode,
immutability and argument validation."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from components.losses import REDUCTIONS, build_loss, describe_losses, loss_names

C_COUNTS = [500.0, 120.0, 30.0, 4.0]
N_SAMPLES = 1000
REQUIRED = {"cb": {"class_counts": C_COUNTS}, "db": {"class_counts": C_COUNTS, "num_samples": N_SAMPLES}}
ALL = ["bce", "focal", "asl", "hill", "apl", "ral", "poly1", "cb", "db"]


def make(name, **kw):
    return build_loss(name, **{**REQUIRED.get(name, {}), **kw})


def sig(x):
    return 1 / (1 + math.exp(-x))


def bce_ref(x, y):
    p = sig(x)
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


# --- reference formulas, one element, straight from shared/specs/losses.md ------------------
def asym_pieces(x, y, gamma_neg, gamma_pos, clip, eps):
    p = sig(x)
    omq = min(1 - p + clip, 1.0)  # 1 - q
    P, Q = max(p, eps), max(omq, eps)
    pt = y * p + (1 - y) * omq
    g = gamma_pos * y + gamma_neg * (1 - y)
    w = (1 - pt) ** g if (gamma_pos > 0 or gamma_neg > 0) else 1.0
    return p, omq, P, Q, w


def asl_ref(x, y, gamma_neg=4, gamma_pos=0, clip=0.05, eps=1e-8):
    p, omq, P, Q, w = asym_pieces(x, y, gamma_neg, gamma_pos, clip, eps)
    return -(y * math.log(P) + (1 - y) * math.log(Q)) * w


def apl_ref(x, y, gamma_neg=4, gamma_pos=0, clip=0.05, eps=1e-8, ep=1.0, en=0.0, epp=-2.5):
    p, omq, P, Q, w = asym_pieces(x, y, gamma_neg, gamma_pos, clip, eps)
    lp = -(math.log(P) + ep * (1 - P) + 0.5 * epp * (1 - P) ** 2)
    ln = -(math.log(Q) + en * Q)
    return (y * lp + (1 - y) * ln) * w


def ral_ref(x, y, form="code", lamb=1.5, gamma_neg=4, gamma_pos=0, clip=0.05, eps=1e-8, ep=1.0, en=0.0, epp=-2.5):
    p, omq, P, Q, w = asym_pieces(x, y, gamma_neg, gamma_pos, clip, eps)
    lp = -(math.log(P) + ep * (1 - P) + 0.5 * epp * (1 - P) ** 2)
    ln = -(math.log(Q) + en * Q)
    ln *= (lamb - p) * p**2 * (lamb - omq) if form == "code" else (lamb - p)
    return (y * lp + (1 - y) * ln) * w


def hill_ref(x, y, lamb=1.5, margin=1.0, gamma=2.0):
    s = sig(x - margin)
    p = sig(x)
    return y * (-((1 - s) ** gamma) * math.log(s)) + (1 - y) * (lamb - p) * p**2


def focal_ref(x, y, gamma=2.0, alpha=0.25):
    p = sig(x)
    pt = y * p + (1 - y) * (1 - p)
    a = alpha * y + (1 - alpha) * (1 - y) if alpha >= 0 else 1.0
    return a * (1 - pt) ** gamma * bce_ref(x, y)


def poly1_ref(x, y, epsilon=1.0):
    p = sig(x)
    pt = y * p + (1 - y) * (1 - p)
    return bce_ref(x, y) + epsilon * (1 - pt)


XS = [-4.0, -1.5, -0.2, 0.0, 0.7, 2.0, 5.0]


def eval_elementwise(name, xs, ys, **kw):
    loss = make(name, reduction="none", **kw)
    x = torch.tensor([xs], dtype=torch.float64)
    y = torch.tensor([ys], dtype=torch.float64)
    return loss(x, y)[0].tolist()


@pytest.mark.parametrize(
    "name,ref,kw",
    [
        ("asl", asl_ref, {}),
        (
            "asl",
            lambda x, y: asl_ref(x, y, gamma_neg=2, gamma_pos=1, clip=0.1),
            {"gamma_neg": 2, "gamma_pos": 1, "clip": 0.1},
        ),
        ("apl", apl_ref, {}),
        (
            "apl",
            lambda x, y: apl_ref(x, y, ep=-0.5, en=0.3, epp=0.5),
            {"epsilon_pos": -0.5, "epsilon_neg": 0.3, "epsilon_pos_pow": 0.5},
        ),
        ("ral", ral_ref, {}),
        ("ral", lambda x, y: ral_ref(x, y, form="paper"), {"hill_form": "paper"}),
        (
            "ral",
            lambda x, y: ral_ref(x, y, lamb=2.5, gamma_neg=2, gamma_pos=1, clip=0.0, en=-0.4),
            {"lamb": 2.5, "gamma_neg": 2, "gamma_pos": 1, "clip": 0.0, "epsilon_neg": -0.4},
        ),
        ("hill", hill_ref, {}),
        ("focal", focal_ref, {}),
        ("focal", lambda x, y: focal_ref(x, y, gamma=1.0, alpha=-1), {"gamma": 1.0, "alpha": -1}),
        ("poly1", poly1_ref, {}),
        ("poly1", lambda x, y: poly1_ref(x, y, epsilon=-0.5), {"epsilon": -0.5}),
        ("bce", bce_ref, {}),
    ],
)
@pytest.mark.parametrize("y", [0.0, 1.0])
def test_golden_values_match_spec_formulas(name, ref, kw, y):
    got = eval_elementwise(name, XS, [y] * len(XS), **kw)
    want = [ref(x, y) for x in XS]
    assert got == pytest.approx(want, rel=1e-9, abs=1e-12)


# The spec's own RAL table (float64, defaults): x, (y=0 loss, dL/dx), (y=1 loss, dL/dx)
RAL_TABLE = [
    (-3, 0.0, 0.0, 3.230260, -1.014983),
    (-1, 3.6e-05, 0.000225, 1.250261, -0.893784),
    (0, 0.005822, 0.023264, 0.505647, -0.5625),
    (1, 0.119332, 0.255711, 0.134732, -0.204522),
    (3, 1.076681, 0.477914, 0.003973, -0.007606),
]


@pytest.mark.parametrize("x,l0,g0,l1,g1", RAL_TABLE)
def test_ral_spec_golden_table(x, l0, g0, l1, g1):
    loss = build_loss("ral", reduction="none")
    for y, want_l, want_g in ((0.0, l0, g0), (1.0, l1, g1)):
        t = torch.tensor([[float(x)]], dtype=torch.float64, requires_grad=True)
        v = loss(t, torch.tensor([[y]], dtype=torch.float64))
        v.sum().backward()
        assert v.item() == pytest.approx(want_l, abs=1e-6)
        assert t.grad.item() == pytest.approx(want_g, abs=1e-6)


def test_class_balanced_weights():
    beta = 0.99
    loss = build_loss("cb", class_counts=C_COUNTS, beta=beta, reduction="none")
    raw = [(1 - beta) / (1 - beta**n) for n in C_COUNTS]
    w = [r / sum(raw) * len(raw) for r in raw]
    x = [[0.3, -1.0, 2.0, -0.5]]
    y = [[1.0, 0.0, 1.0, 1.0]]
    got = loss(torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64))[0].tolist()
    want = [w[c] * bce_ref(x[0][c], y[0][c]) for c in range(4)]
    assert got == pytest.approx(want, rel=1e-6)
    assert w[3] > w[0]  # rarer class, larger weight


def db_ref(xrow, yrow, counts, N, alpha=0.1, beta=10.0, mu=0.2, init_bias=0.05, neg_scale=2.0, gamma=2.0, bp=2.0):
    inv = [1 / n for n in counts]
    rep = sum(y * i for y, i in zip(yrow, inv))
    out = []
    for c, (x, y) in enumerate(zip(xrow, yrow)):
        w = alpha + 1 if rep == 0 else alpha + sig(beta * (inv[c] / rep - mu))
        z = x - math.log(N / counts[c] - 1) * init_bias
        if y == 0:
            z, w = z * neg_scale, w / neg_scale
        ce = bce_ref(z, y)
        out.append(bp * (1 - math.exp(-ce)) ** gamma * w * ce)
    return out


@pytest.mark.parametrize("yrow", [[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
def test_distribution_balanced_values(yrow):
    x = [0.3, -1.0, 2.0, -0.5]
    got = eval_elementwise("db", x, yrow)
    assert got == pytest.approx(db_ref(x, yrow, C_COUNTS, N_SAMPLES), rel=1e-6)
    assert all(math.isfinite(v) for v in got)  # a sample with no positive stays finite


# --- reduces to BCE when the knobs are off ---------------------------------------------------
def random_batch(n=16, c=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=g, dtype=dtype) * 3
    y = (torch.rand(n, c, generator=g) < 0.3).to(dtype)
    return x, y


@pytest.mark.parametrize(
    "name,kw",
    [
        ("asl", {"gamma_neg": 0, "gamma_pos": 0, "clip": 0}),
        ("apl", {"gamma_neg": 0, "gamma_pos": 0, "clip": 0, "epsilon_pos": 0, "epsilon_neg": 0, "epsilon_pos_pow": 0}),
        ("focal", {"gamma": 0, "alpha": -1}),
        ("poly1", {"epsilon": 0}),
        ("cb", {"beta": 0.0}),
    ],
)
def test_knobs_off_equals_bce(name, kw):
    x, y = random_batch(c=4)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(x, y, reduction="sum")
    got = make(name, reduction="sum", **kw)(x, y)
    assert got.item() == pytest.approx(bce.item(), rel=1e-7)


def test_bce_pos_weight_matches_torch():
    x, y = random_batch(c=4)
    pw = [1.0, 2.0, 5.0, 0.5]
    want = torch.nn.functional.binary_cross_entropy_with_logits(x, y, pos_weight=torch.tensor(pw, dtype=x.dtype))
    assert build_loss("bce", pos_weight=pw)(x, y).item() == pytest.approx(want.item(), rel=1e-6)


# --- gradients, dtypes, numerics -------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_gradient_signs(name):
    """Positives push logits up (dL/dx < 0); negatives push them down (dL/dx > 0)."""
    loss = make(name, reduction="sum")
    x = torch.tensor([[-1.0, 0.5, 1.0, 2.0]], dtype=torch.float64, requires_grad=True)
    loss(x, torch.ones(1, 4, dtype=torch.float64)).backward()
    assert (x.grad < 0).all(), x.grad
    x.grad = None
    loss(x, torch.zeros(1, 4, dtype=torch.float64)).backward()
    assert (x.grad > 0).all(), x.grad


@pytest.mark.parametrize("name", ALL + ["ral-paper"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_finite_for_extreme_logits(name, dtype):
    loss = make("ral", hill_form="paper", reduction="sum") if name == "ral-paper" else make(name, reduction="sum")
    grid = torch.tensor([-100.0, -60.0, -17.5, -5.0, -1e-3, 0.0, 1e-3, 5.0, 17.5, 60.0, 100.0])
    x = grid.reshape(-1, 1).repeat(2, 4).to(dtype).requires_grad_()  # every logit as positive and negative
    y = torch.zeros(x.shape)
    y[: len(grid)] = 1.0
    out = loss(x, y)
    assert out.dtype in (torch.float32, torch.float64)
    out.backward()
    assert torch.isfinite(out).all()
    assert torch.isfinite(x.grad.float()).all()


@pytest.mark.parametrize("name", ALL)
def test_autocast_logits_computed_in_fp32(name):
    x, y = random_batch(dtype=torch.float32, c=4)
    ref = make(name)(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = make(name)(x, y)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)


@pytest.mark.parametrize("name", ALL)
def test_no_grad_stays_off_and_inputs_untouched(name):
    x, y = random_batch(c=4, dtype=torch.float32)
    x0, y0 = x.clone(), y.clone()
    with torch.no_grad():
        make(name)(x, y)
        assert not torch.is_grad_enabled()
    assert torch.equal(x, x0) and torch.equal(y, y0)
    xr = x.clone().requires_grad_()
    make(name)(xr, y).backward()
    assert torch.equal(xr.detach(), x0) and torch.equal(y, y0)
    assert torch.is_grad_enabled()


def test_detach_focal_weight_changes_gradient_only():
    x, y = random_batch(c=4)
    grads, values = [], []
    for detach in (True, False):
        xr = x.clone().requires_grad_()
        v = build_loss("ral", detach_focal_weight=detach)(xr, y)
        v.backward()
        grads.append(xr.grad)
        values.append(v.item())
    assert values[0] == pytest.approx(values[1], rel=1e-12)
    assert not torch.allclose(grads[0], grads[1])


def test_buffers_follow_module_device_and_dtype():
    loss = build_loss("db", class_counts=C_COUNTS, num_samples=N_SAMPLES)
    names = {n for n, _ in loss.named_buffers()}
    assert {"class_counts", "inv_freq", "logit_bias"} <= names
    assert {n for n, _ in build_loss("cb", class_counts=C_COUNTS).named_buffers()} >= {"class_weights"}
    moved = loss.to("meta")
    assert all(b.device.type == "meta" for b in moved.buffers())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ALL)
def test_cuda_matches_cpu(name):
    x, y = random_batch(dtype=torch.float32, c=4)
    loss = make(name)
    want = loss(x, y)
    with torch.autocast("cuda", dtype=torch.float16):
        got = loss.cuda()(x.cuda().half(), y.cuda())
    assert got.device.type == "cuda" and torch.isfinite(got)
    assert got.item() == pytest.approx(want.item(), rel=1e-2)


# --- reductions and masks --------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(
    name=st.sampled_from(ALL),
    n=st.integers(1, 6),
    seed=st.integers(0, 10_000),
    scale=st.floats(0.1, 30.0),
)
def test_reductions_consistent_and_nonnegative(name, n, seed, scale):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64) * scale
    y = (torch.rand(n, 4, generator=g) < 0.4).double()
    per = make(name, reduction="none")(x, y)
    assert per.shape == (n, 4)
    assert (per >= -1e-12).all()
    total = per.sum().item()
    assert make(name, reduction="sum")(x, y).item() == pytest.approx(total, rel=1e-9, abs=1e-12)
    assert make(name, reduction="mean")(x, y).item() == pytest.approx(total / (n * 4), rel=1e-9, abs=1e-12)
    assert make(name, reduction="batchmean")(x, y).item() == pytest.approx(total / n, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("name", ALL)
def test_masked_elements_give_no_loss_and_no_gradient(name):
    x, y = random_batch(n=6, c=4)
    mask = torch.ones_like(x)
    mask[0, 1] = mask[3, 2] = mask[5, 0] = 0
    xr = x.clone().requires_grad_()
    per = make(name, reduction="none")(xr, y, mask=mask)
    assert per[0, 1] == 0 and per[3, 2] == 0 and per[5, 0] == 0
    per.sum().backward()
    assert xr.grad[0, 1] == 0 and xr.grad[3, 2] == 0 and xr.grad[5, 0] == 0
    xf = x.clone().requires_grad_()
    full = make(name, reduction="none")(xf, y)
    full.sum().backward()
    keep = mask.bool()
    assert torch.equal(xr.grad[keep], xf.grad[keep])  # the rest is untouched by the mask
    full = full.detach()
    mean = make(name, reduction="mean")(x, y, mask=mask).item()
    assert mean == pytest.approx((full * mask).sum().item() / mask.sum().item(), rel=1e-9)


# --- errors that say what to fix -------------------------------------------------------------
@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: build_loss("nope"), "unknown loss 'nope'.*ral"),
        (lambda: build_loss("ral", lam=2), "no parameter.*lam.*accepted"),
        (lambda: build_loss("ral", lamb=0.5), "lamb=0.5.*lamb >= 1"),
        (lambda: build_loss("hill", lamb=0.9), "lamb"),
        (lambda: build_loss("asl", clip=-0.1), "clip=-0.1.*0 <= clip < 1"),
        (lambda: build_loss("asl", gamma_neg=-1), "gamma_neg"),
        (lambda: build_loss("ral", hill_form="eq6"), "hill_form.*code \\| paper"),
        (lambda: build_loss("bce", reduction="avg"), "reduction.*batchmean"),
        (lambda: build_loss("focal", alpha=1.5), "alpha"),
        (lambda: build_loss("poly1", epsilon=-2), "epsilon"),
        (lambda: build_loss("cb"), "requires parameter.*class_counts"),
        (lambda: build_loss("cb", class_counts=[1, -2]), "class_counts"),
        (lambda: build_loss("cb", class_counts=[1, 2], beta=1.0), "beta"),
        (lambda: build_loss("db", class_counts=[5, 20], num_samples=10), "num_samples"),
        (lambda: build_loss("ral", eps=float("nan")), "eps"),
    ],
)
def test_bad_parameters_raise_clear_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize(
    "x,y,mask,match",
    [
        (torch.zeros(2, 3), torch.zeros(2, 4), None, r"shape \(N, C\).*\(2, 3\).*\(2, 4\)"),
        (torch.zeros(6), torch.zeros(6), None, "shape"),
        (torch.zeros(2, 3), torch.full((2, 3), 2.0), None, r"targets must lie in \[0, 1\]"),
        (torch.zeros(2, 3), torch.full((2, 3), float("nan")), None, r"\[0, 1\]"),
        (torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(3, 2), "mask must have"),
    ],
)
def test_bad_inputs_raise_clear_errors(x, y, mask, match):
    with pytest.raises(ValueError, match=match):
        build_loss("ral")(x, y, mask=mask)


def test_a_caller_whose_targets_are_checked_can_skip_the_check_and_its_host_sync():
    loss = build_loss("ral")
    loss.check_targets = False  # as ralflow's trainer sets it: prepared labels are 0 or 1
    assert torch.isfinite(loss(torch.zeros(2, 3), torch.full((2, 3), 2.0)))  # unchecked: computed as given
    assert build_loss("ral").check_targets  # every other caller keeps the check


def test_class_count_mismatch_is_reported():
    with pytest.raises(ValueError, match="class_counts has 4 classes but the logits have 3"):
        build_loss("cb", class_counts=C_COUNTS)(torch.zeros(2, 3), torch.zeros(2, 3))


def test_registry_lists_every_loss_with_spec_defaults():
    assert loss_names() == ALL
    by_name = {d["name"]: d["params"] for d in describe_losses()}
    assert by_name["ral"] == {
        "gamma_neg": 4,
        "gamma_pos": 0,
        "clip": 0.05,
        "eps": 1e-8,
        "lamb": 1.5,
        "epsilon_pos": 1.0,
        "epsilon_neg": 0.0,
        "epsilon_pos_pow": -2.5,
        "detach_focal_weight": False,
        "hill_form": "code",
        "reduction": "sum",
    }
    assert by_name["asl"]["detach_focal_weight"] is True
    assert by_name["db"]["class_counts"] == "<required>"
    assert set(REDUCTIONS) == {"sum", "mean", "batchmean", "none"}


# --- the fused ASL/APL/RAL kernel's analytic gradient vs autograd of the spec formula -------
def spec_autograd(x, y, gamma_neg, gamma_pos, clip, eps, ep=0.0, en=0.0, epp=0.0, hill=None, lamb=1.5, detach=True):
    """The spec's formula as plain torch ops; autograd differentiates it."""
    p = torch.sigmoid(x)
    omq = (1 - p + clip).clamp(max=1) if clip > 0 else 1 - p
    P, Q = p.clamp(min=eps), omq.clamp(min=eps)
    lp = -(torch.log(P) + ep * (1 - P) + 0.5 * epp * (1 - P) ** 2)
    ln = -(torch.log(Q) + en * Q)
    if hill == "code":
        ln = ln * (lamb - p) * p**2 * (lamb - omq)
    elif hill == "paper":
        ln = ln * (lamb - p)
    loss = y * lp + (1 - y) * ln
    if gamma_pos > 0 or gamma_neg > 0:

        def weight():
            pt = y * p + (1 - y) * omq
            return torch.pow(1 - pt, gamma_pos * y + gamma_neg * (1 - y))

        if detach:
            with torch.no_grad():
                w = weight()
        else:
            w = weight()
        loss = loss * w
    return loss


GRAD_CASES = [
    ("asl", {}, {}),
    (
        "asl",
        {"gamma_pos": 1, "gamma_neg": 2, "clip": 0.0, "detach_focal_weight": False},
        {"gamma_pos": 1, "gamma_neg": 2, "clip": 0.0, "detach": False},
    ),
    ("apl", {}, {"ep": 1.0, "epp": -2.5}),
    (
        "apl",
        {"gamma_pos": 2, "detach_focal_weight": False, "epsilon_neg": 0.5},
        {"gamma_pos": 2, "ep": 1.0, "epp": -2.5, "en": 0.5, "detach": False},
    ),
    ("ral", {}, {"ep": 1.0, "epp": -2.5, "hill": "code", "detach": False}),
    ("ral", {"hill_form": "paper"}, {"ep": 1.0, "epp": -2.5, "hill": "paper", "detach": False}),
    (
        "ral",
        {"detach_focal_weight": True, "gamma_pos": 1, "clip": 0.2, "lamb": 2.0},
        {"ep": 1.0, "epp": -2.5, "hill": "code", "detach": True, "gamma_pos": 1, "clip": 0.2, "lamb": 2.0},
    ),
    (
        "ral",
        {"clip": 0.0, "gamma_neg": 0, "epsilon_neg": -0.3, "epsilon_pos": -0.5, "epsilon_pos_pow": 1.0},
        {"clip": 0.0, "gamma_neg": 0, "en": -0.3, "ep": -0.5, "epp": 1.0, "hill": "code", "detach": False},
    ),
    # gamma_neg <= 1 with a clip: the kernel must mask where the clip saturates (p <= clip)
    (
        "ral",
        {"gamma_neg": 1, "clip": 0.1},
        {"gamma_neg": 1, "clip": 0.1, "ep": 1.0, "epp": -2.5, "hill": "code", "detach": False},
    ),
    (
        "apl",
        {"gamma_neg": 0.0, "clip": 0.1, "epsilon_neg": 0.4},
        {"gamma_neg": 0.0, "clip": 0.1, "en": 0.4, "ep": 1.0, "epp": -2.5},
    ),
    # clip below eps: the eps floor on 1 - q is live again
    (
        "apl",
        {"gamma_neg": 1.5, "clip": 1e-9, "detach_focal_weight": False},
        {"gamma_neg": 1.5, "clip": 1e-9, "ep": 1.0, "epp": -2.5, "detach": False},
    ),
]


@pytest.mark.parametrize("name,kw,ref_kw", GRAD_CASES)
def test_fused_gradient_matches_autograd_of_spec_formula(name, kw, ref_kw):
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(64, 6, generator=g, dtype=torch.float64) * 4).requires_grad_()
    y = (torch.rand(64, 6, generator=g) < 0.35).double()
    base = {"gamma_neg": 4, "gamma_pos": 0, "clip": 0.05, "eps": 1e-8}
    want = spec_autograd(x, y, **{**base, **ref_kw})
    (gw,) = torch.autograd.grad(want.sum(), x)
    got = build_loss(name, reduction="none", **kw)(x, y)
    (gg,) = torch.autograd.grad(got.sum(), x)
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-14)
    assert torch.allclose(gg, gw, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("name", ["asl", "apl", "ral"])
def test_fused_gradient_passes_gradcheck(name):
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(5, 4, generator=g, dtype=torch.float64) * 2).requires_grad_()
    y = (torch.rand(5, 4, generator=g) < 0.5).double()
    loss = build_loss(name, reduction="sum", gamma_pos=1, detach_focal_weight=False)
    assert torch.autograd.gradcheck(lambda t: loss(t, y), (x,))


@pytest.mark.parametrize("exponent", [0, 0.5, 1, 2, 3, 4, 5, 7, 8, 9, 2.5])
def test_power_matches_pow_and_never_aliases_its_input(exponent):
    from components.losses.base import power

    base = (torch.rand(7, 3, dtype=torch.float64) * 1.5).requires_grad_()
    got, want = power(base, exponent), base.pow(exponent)
    assert torch.allclose(got, want, rtol=1e-12, atol=0)
    (g_got,) = torch.autograd.grad(got.sum(), base)
    (g_want,) = torch.autograd.grad(want.sum(), base)
    assert torch.allclose(g_got, g_want, rtol=1e-12, atol=1e-300)
    plain = base.detach().clone()
    out = power(plain, exponent)
    out.mul_(0)  # the fused kernel scales its result in place: base must be untouched
    assert out.data_ptr() != plain.data_ptr() and torch.equal(plain, base.detach())
