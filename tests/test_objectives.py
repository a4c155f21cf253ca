"""Losses and regularizers (eqs. 2-7) against direct NumPy evaluations of the paper's formulas."""

import numpy as np
import pytest
import torch

from preimage.objectives import (
    BoundedRange,
    InnerProductLoss,
    L2Loss,
    ObjectiveError,
    TotalVariation,
    jitter_crop,
)


def tv_reference(x: np.ndarray, beta: float, V: float) -> float:
    """Section 3.2.2 for one (C, H, W) image with explicit loops: u = column, v = row."""
    C, H, W = x.shape
    total = 0.0
    for k in range(C):
        for v in range(H):
            for u in range(W):
                du = x[k, v, u + 1] - x[k, v, u] if u + 1 < W else 0.0
                dv = x[k, v + 1, u] - x[k, v, u] if v + 1 < H else 0.0
                total += (du * du + dv * dv) ** (beta / 2)
    return total / (H * W * V**beta)


@pytest.mark.parametrize("beta", [2.0, 1.5, 1.0])
def test_tv_matches_formula_on_non_square_images(beta):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 7, generator=g, dtype=torch.float64) * 20
    got = TotalVariation(beta, V=80 / 6.5)(x)
    want = [tv_reference(x[n].numpy(), beta, 80 / 6.5) for n in range(2)]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6)


def test_tv_differences_rows_and_columns_not_other_axes():
    # x(v, u) = u: only column differences, all equal to 1 except across the last column.
    H, W, V = 3, 5, 2.0
    ramp = torch.arange(W, dtype=torch.float64).expand(1, 1, H, W).clone()
    tv = TotalVariation(2.0, V)
    assert tv(ramp).item() == pytest.approx(H * (W - 1) / (H * W * V**2))
    # the transposed ramp varies along rows only: H - 1 differences per column
    rampT = torch.arange(H, dtype=torch.float64).view(1, 1, H, 1).expand(1, 1, H, W).clone()
    assert tv(rampT).item() == pytest.approx(W * (H - 1) / (H * W * V**2))
    # an image constant in space but different across channels and batch has no variation
    flat = torch.arange(6, dtype=torch.float64).view(2, 3, 1, 1).expand(2, 3, H, W).clone()
    assert tv(flat).abs().max().item() == 0.0


def test_tv_gradients_finite_on_constant_image_for_beta_below_two():
    x = torch.full((1, 1, 6, 6), 3.0, requires_grad=True)
    TotalVariation(1.0, 10.0)(x).sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("beta", [2.0, 1.5])
def test_regularizer_gradcheck(beta):
    x = (torch.randn(2, 3, 5, 6, dtype=torch.float64) * 30).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: TotalVariation(beta, 12.3)(t), (x,))
    assert torch.autograd.gradcheck(lambda t: BoundedRange(6, 80)(t), (x,))


def test_bounded_range_is_eq5_and_isotropic():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 4, 6, generator=g, dtype=torch.float64) * 60
    B, alpha = 80.0, 6.0
    got = BoundedRange(alpha, B)(x)
    a = x.numpy()
    want = [((a[n] ** 2).sum(0) ** (alpha / 2)).sum() / (4 * 6 * B**alpha) for n in range(2)]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10)
    # a rotation of every pixel's colour vector leaves the isotropic norm unchanged
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))
    rotated = torch.einsum("ij,njhw->nihw", q, x)
    np.testing.assert_allclose(BoundedRange(alpha, B)(rotated).numpy(), got.numpy(), rtol=1e-10)


def test_projection_onto_colour_ball():
    reg = BoundedRange(6, 80)  # B+ = 160
    x = torch.zeros(1, 3, 2, 2)
    x[0, :, 0, 0] = torch.tensor([300.0, 400.0, 0.0])  # norm 500 -> scaled to 160
    x[0, :, 1, 1] = torch.tensor([10.0, -20.0, 30.0])  # inside: untouched
    y = reg.project(x.clone())
    assert torch.linalg.vector_norm(y[0, :, 0, 0]).item() == pytest.approx(160.0)
    torch.testing.assert_close(y[0, :, 0, 0], torch.tensor([96.0, 128.0, 0.0]))
    torch.testing.assert_close(y[0, :, 1, 1], x[0, :, 1, 1])


def test_l2_loss_eq2_and_masked_eq3():
    target = torch.tensor([[3.0, 4.0, 0.0, 1.0]])
    code = torch.tensor([[0.0, 4.0, 2.0, 1.0]])
    assert L2Loss(target)(code).item() == pytest.approx((9 + 4) / 26)
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    assert L2Loss(target, mask)(code).item() == pytest.approx(9 / 25)
    assert L2Loss(target).error(code).item() == pytest.approx(np.sqrt(13 / 26))


def test_zero_norm_target_is_a_clear_error():
    with pytest.raises(ObjectiveError, match="zero norm"):
        L2Loss(torch.zeros(2, 5))
    with pytest.raises(ObjectiveError, match="inside the mask"):
        L2Loss(torch.ones(1, 4), torch.tensor([[0.0, 0, 0, 0]]))
    with pytest.raises(ObjectiveError, match="NaN"):
        L2Loss(torch.tensor([[1.0, float("nan")]]))


def test_inner_product_loss_eq4():
    w = torch.tensor([[0.0, 2.0, 0.0], [1.0, 0.0, 1.0]])
    code = torch.tensor([[5.0, 3.0, -1.0], [1.0, 7.0, 2.0]])
    loss = InnerProductLoss(w, torch.tensor([2.0, 3.0]))
    torch.testing.assert_close(loss(code), torch.tensor([-3.0, -1.0]))
    with pytest.raises(ObjectiveError):
        InnerProductLoss(w, 0.0)


@pytest.mark.parametrize("masked", [False, True])
def test_l2_loss_value_and_grad_equals_autograd(masked):
    """The engine's closed-form loss gradient is autograd's, weighted by C."""
    torch.manual_seed(0)
    target = torch.randn(2, 5, 4, 3)
    mask = (torch.rand(2, 5, 4, 3) > 0.5).float() if masked else None
    loss = L2Loss(target, mask)
    code = torch.randn(2, 5, 4, 3, dtype=torch.float64).float().requires_grad_(True)
    (20.0 * loss(code)).sum().backward()
    values, grad = loss.value_and_grad(code.detach(), weight=20.0)
    torch.testing.assert_close(values, 20.0 * loss(code.detach()))
    torch.testing.assert_close(grad, code.grad)


def test_l2_loss_value_and_grad_keeps_a_bf16_channels_last_code_layout():
    """A bf16 network's channels-last code gets a bf16 channels-last gradient (no layout copy
    in the backward pass) with the fp32 values within bf16 rounding."""
    torch.manual_seed(1)
    target = torch.randn(2, 8, 6, 5)
    loss = L2Loss(target.bfloat16())
    code = torch.randn(2, 8, 6, 5).bfloat16().contiguous(memory_format=torch.channels_last)
    values, grad = loss.value_and_grad(code, weight=3.0)
    assert grad.dtype == torch.bfloat16 and grad.is_contiguous(memory_format=torch.channels_last)
    ref = L2Loss(target.bfloat16().float())
    torch.testing.assert_close(values, 3.0 * ref(code.float()), rtol=2e-2, atol=0)
    diff = code.float() - target.bfloat16().float()
    torch.testing.assert_close(grad.float(), 6.0 * diff / ref.norm2.view(-1, 1, 1, 1), rtol=2e-2, atol=1e-4)


def test_inner_product_loss_value_and_grad_equals_autograd():
    torch.manual_seed(2)
    w = torch.zeros(3, 4, 2, 2)
    w[0, 1, 0, 0] = w[1, 3, 1, 1] = 1.0
    w[2] = torch.rand(4, 2, 2)
    loss = InnerProductLoss(w, torch.tensor([2.0, 5.0, 0.5]))
    code = torch.randn(3, 4, 2, 2, requires_grad=True)
    (7.0 * loss(code)).sum().backward()
    values, grad = loss.value_and_grad(code.detach(), weight=7.0)
    torch.testing.assert_close(values, 7.0 * loss(code.detach()))
    torch.testing.assert_close(grad, code.grad)


def test_jitter_crop_per_element_offsets_and_gradient():
    canvas = torch.arange(2 * 1 * 4 * 5, dtype=torch.float64).view(2, 1, 4, 5).requires_grad_(True)
    offsets = torch.tensor([[0, 1], [1, 0]])
    crop = jitter_crop(canvas, offsets, (3, 4))
    torch.testing.assert_close(crop[0, 0], canvas[0, 0, 0:3, 1:5])
    torch.testing.assert_close(crop[1, 0], canvas[1, 0, 1:4, 0:4])
    crop.sum().backward()
    assert canvas.grad[0, 0, 3].sum() == 0 and canvas.grad[0, 0, :, 0].sum() == 0
    assert canvas.grad[1, 0, 0].sum() == 0 and canvas.grad[1, 0, :, 4].sum() == 0
    assert canvas.grad.sum() == 2 * 12


def test_gather_crop_is_the_per_element_crop_and_gradchecks():
    """The GPU's one-kernel crop (used off the CPU) against the CPU's per-element copies."""
    from preimage.objectives import gather_crop

    g = torch.Generator().manual_seed(0)
    canvas = torch.randn(5, 3, 9, 11, dtype=torch.float64, generator=g).requires_grad_(True)
    offsets = torch.randint(0, 4, (5, 2), generator=g)
    offsets[0] = torch.tensor([3, 0])  # not all equal
    crop = gather_crop(canvas, offsets, (6, 8))
    reference = jitter_crop(canvas, offsets, (6, 8))
    assert crop.is_contiguous()
    torch.testing.assert_close(crop, reference, rtol=0, atol=0)
    weights = torch.randn(crop.shape, dtype=torch.float64, generator=g)
    (ours,) = torch.autograd.grad((crop * weights).sum(), canvas)
    (theirs,) = torch.autograd.grad((reference * weights).sum(), canvas)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    small = canvas[:2, :, :5, :6].detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda c: gather_crop(c, offsets[:2].clamp_max(2), (3, 4)), (small,))


@pytest.mark.parametrize("alpha", [6.0, 4.0, 2.5])
def test_bounded_range_closed_form_gradient_equals_autograd(alpha):
    reg = BoundedRange(alpha, 80.0)
    x = (torch.randn(3, 3, 7, 9, dtype=torch.float64) * 60).requires_grad_(True)
    values, grad = reg.value_and_grad(x.detach())
    torch.testing.assert_close(values, reg(x).detach())
    (ref,) = torch.autograd.grad(reg(x).sum(), x)
    torch.testing.assert_close(grad, ref)


@pytest.mark.parametrize("beta", [2.0, 1.5, 1.0])
def test_total_variation_closed_form_gradient_equals_autograd(beta):
    tv = TotalVariation(beta, 80 / 6.5)
    x = (torch.randn(2, 3, 6, 8, dtype=torch.float64) * 40).requires_grad_(True)
    values, grad = tv.value_and_grad(x.detach())
    torch.testing.assert_close(values, tv(x).detach())
    (ref,) = torch.autograd.grad(tv(x).sum(), x)
    torch.testing.assert_close(grad, ref)
