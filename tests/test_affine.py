"""An affine Φ's inversion loss from ``AᵀA`` (representations/affine.py): the same code, loss
value and gradient as the convolution and autograd, and the engine's choice of it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from preimage.defaults import Settings
from preimage.engine import Stage, optimize
from preimage.models.networks import PaddedConv2d
from preimage.objectives import L2Loss, jitter_crop
from preimage.representations import ModuleCut
from preimage.representations.affine import BORDER_LOW_PRECISION_BATCH, ConvGram, QuadraticL2, quadratic_loss
from preimage.representations.cnn import low_precision

# (kernel, stride, (top, bottom, left, right) padding, image size): VGG's conv1_1, AlexNet's,
# SqueezeNet's and VGG-M's conv1, asymmetric padding, unread trailing rows, kernel < stride, 1 x 1
CASES = [
    (3, 1, (1, 1, 1, 1), (30, 33)),
    (11, 4, (0, 0, 0, 0), (59, 62)),
    (7, 2, (0, 0, 0, 0), (41, 44)),
    (5, 2, (2, 1, 0, 3), (33, 36)),
    (11, 4, (0, 0, 0, 0), (62, 61)),
    (2, 3, (1, 1, 1, 1), (20, 23)),
    (1, 1, (0, 0, 0, 0), (9, 12)),
    (4, 2, (1, 1, 1, 1), (21, 24)),
]


def _conv(kernel: int, stride: int, padding: tuple[int, int, int, int], out: int = 6) -> ConvGram:
    g = torch.Generator().manual_seed(kernel * 10 + stride)
    weight = torch.randn(out, 3, kernel, kernel, generator=g, dtype=torch.float64)
    bias = torch.randn(out, generator=g, dtype=torch.float64)
    return ConvGram(weight, bias, stride, padding)


def _reference(conv: ConvGram, x: torch.Tensor) -> torch.Tensor:
    t, b, lf, rt = conv.padding
    return F.conv2d(F.pad(x, (lf, rt, t, b)), conv.weight, conv.bias, stride=conv.stride)


@pytest.mark.parametrize("kernel, stride, padding, size", CASES)
def test_forward_and_adjoint_are_the_convolutions(kernel, stride, padding, size) -> None:
    """A x on the phases is the padded strided convolution; Aᵀ is its gradient."""
    conv = _conv(kernel, stride, padding)
    x = torch.randn(2, 3, *size, dtype=torch.float64, requires_grad=True)
    want = _reference(conv, x)
    assert conv.out_size(size) == tuple(want.shape[-2:])
    torch.testing.assert_close(conv.forward(x), want, rtol=1e-12, atol=1e-10)
    g = torch.randn_like(want)
    (grad,) = torch.autograd.grad(want, x, g)
    torch.testing.assert_close(conv.adjoint(g, size), grad, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("kernel, stride, padding, size", CASES)
def test_quadratic_loss_is_the_l2_loss_through_the_convolution(kernel, stride, padding, size) -> None:
    """Value and gradient of ``||A x + b - Φ0||² / ||Φ0||²`` from AᵀA equal autograd's through
    the convolution, border included, for every batch element and a weight C."""
    conv = _conv(kernel, stride, padding)
    x = torch.randn(3, 3, *size, dtype=torch.float64, requires_grad=True)
    target = torch.randn_like(_reference(conv, x)) * 3
    loss = L2Loss(target)
    want = 7.0 * loss(_reference(conv, x))
    (grad,) = torch.autograd.grad(want.sum(), x)
    quad = QuadraticL2(conv, target, loss.norm2, size)
    for _ in range(2):  # the second call reuses the padded buffer
        value, got = quad.value_and_grad(x.detach(), weight=7.0)
        torch.testing.assert_close(value.double(), want.detach(), rtol=1e-6, atol=0)
        torch.testing.assert_close(got, grad, rtol=1e-10, atol=1e-10)
    unbiased = _reference(conv, x) - conv.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(conv.gram(x.detach()), conv.adjoint(unbiased, size))


def test_the_canvas_form_is_the_loss_of_the_jittered_crops() -> None:
    """With offsets, the loss is that of jitter_crop's windows of the canvas and the gradient is
    the canvas's (autograd through the crop), zero outside each window."""
    conv = _conv(7, 2, (0, 1, 2, 0))
    size = (29, 31)
    canvas = torch.randn(3, 3, size[0] + 3, size[1] + 3, dtype=torch.float64, requires_grad=True)
    offsets = torch.tensor([[0, 3], [2, 1], [3, 0]])
    crops = jitter_crop(canvas, offsets, size)
    target = torch.randn_like(_reference(conv, crops.detach()))
    loss = L2Loss(target)
    quad = QuadraticL2(conv, target, loss.norm2, size)
    want, want_grad = quad.value_and_grad(crops.detach(), weight=3.0)
    (grad,) = torch.autograd.grad(crops, canvas, want_grad)
    for _ in range(2):  # the second call reuses the padded buffer
        value, got = quad.value_and_grad(canvas.detach(), weight=3.0, offsets=offsets)
        torch.testing.assert_close(value, want, rtol=1e-12, atol=0)
        torch.testing.assert_close(got, grad, rtol=0, atol=0)
    assert got.shape == canvas.shape and got[0, :, :, :3].abs().max() == 0


@pytest.mark.parametrize("batch", [2, BORDER_LOW_PRECISION_BATCH])
@pytest.mark.parametrize("kernel, stride, padding, size", CASES[:4])
def test_bf16_gram_is_exact_to_bf16_rounding(kernel, stride, padding, size, batch) -> None:
    """With bf16 convolutions (a bf16 model's), AᵀA x differs from the exact one by bf16's
    rounding of inputs, kernel and outputs (measured 0.3 %: within 2⁻⁷, and far above fp32's
    1e-7), and the loss's gradient by as much of its AᵀA x term; the border in fp32 (small
    batches) or in bf16."""
    exact = _conv(kernel, stride, padding, out=16)
    conv = ConvGram(exact.weight.float(), exact.bias.float(), stride, padding, torch.bfloat16)
    assert conv.kernel.dtype == torch.bfloat16 and conv.weight.dtype == torch.float32
    g = torch.Generator().manual_seed(3)
    x = torch.randn(batch, 3, *size, dtype=torch.float64, generator=g) * 50
    want = exact.gram(x)
    got = conv.gram(x.float())
    assert got.dtype == torch.float32
    error = ((got.double() - want).norm() / want.norm()).item()
    assert 1e-4 < error < 2**-7, error
    target = exact.forward(torch.randn(x.shape, dtype=x.dtype, generator=g) * 50) * 0.9
    norm2 = target.square().sum((1, 2, 3))
    value, grad = QuadraticL2(exact, target, norm2, size).value_and_grad(x)
    value16, grad16 = QuadraticL2(conv, target.float(), norm2.float(), size).value_and_grad(x.float())
    torch.testing.assert_close(value16.double(), value, rtol=1e-3, atol=0)
    scaled = want * (2 / norm2).view(-1, 1, 1, 1)  # the gradient's AᵀA x term
    grad_error = ((grad16.double() - grad).norm() / scaled.norm()).item()
    assert 1e-4 < grad_error < 2**-7, grad_error


class _Loss(torch.autograd.Function):
    """QuadraticL2 as an autograd function, so that gradcheck can test its gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, quad: QuadraticL2) -> torch.Tensor:  # type: ignore[override]
        value, grad = quad.value_and_grad(x)
        ctx.save_for_backward(grad.clone())
        return value

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return grad * g.view(-1, 1, 1, 1), None


def test_gradcheck() -> None:
    """The closed-form gradient against finite differences of the closed-form value."""
    conv = _conv(5, 2, (2, 1, 0, 3))
    x = torch.randn(2, 3, 13, 12, dtype=torch.float64, requires_grad=True)
    target = torch.randn_like(_reference(conv, x))
    quad = QuadraticL2(conv, target, torch.full((2,), 50.0, dtype=torch.float64), (13, 12))
    assert torch.autograd.gradcheck(lambda x: _Loss.apply(x, quad), (x,))


def test_affine_recognizes_a_first_convolution_only() -> None:
    """A cut at an image-facing convolution is affine (with the model's std folded in); a cut
    after its ReLU, a model that clamps its input first, a grouped convolution are not."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 5, stride=2, padding=2), nn.ReLU(), nn.Conv2d(8, 4, 3))
    rep = ModuleCut(net, "0")  # torchvision's normalization: divides by std
    conv = rep.affine()
    assert conv is not None and conv.stride == 2 and conv.padding == (2, 2, 2, 2)
    x = torch.randn(2, 3, 40, 41) * 60
    torch.testing.assert_close(conv.forward(x), rep(x), rtol=1e-5, atol=1e-4)
    assert ModuleCut(net, "1").affine() is None and ModuleCut(net, "2").affine() is None

    class Clamped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x.clamp(-1, 1))

    assert ModuleCut(Clamped(), "conv").affine() is None
    assert ModuleCut(nn.Sequential(nn.Conv2d(3, 6, 3, groups=3)), "0").affine() is None
    padded = nn.Sequential(PaddedConv2d(3, 8, 7, stride=2, pad=(0, 1, 0, 1)))
    prep = ModuleCut(padded, "0", mean=(104, 117, 123), std=(1, 1, 1))
    conv = prep.affine()
    assert conv is not None and conv.padding == (0, 1, 0, 1)
    torch.testing.assert_close(conv.forward(x), prep(x), rtol=1e-5, atol=1e-4)


def test_the_engine_uses_it_where_exact_and_faster(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where AᵀA costs at most twice the convolution in fp32, at most as much in bf16: VGG's and
    SqueezeNet's conv1 in both precisions (AᵀA's convolutions in the model's), AlexNet's conv1
    in fp32 only; never with a mask, off the CPU, or with PREIMAGE_QUADRATIC=0."""
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    stride1 = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1))
    stride2 = nn.Sequential(nn.Conv2d(3, 96, 7, stride=2))
    stride4 = nn.Sequential(nn.Conv2d(3, 96, 11, stride=4))
    size = (227, 227)  # AlexNet conv1 costs 1.8 x at 227², 2.1 x at 67²

    def loss_for(rep: ModuleCut, mask: bool = False) -> L2Loss:
        with torch.no_grad():
            code = rep(torch.randn(1, 3, *size) * 50).float()
        return L2Loss(code, torch.ones_like(code) if mask else None)

    for model, precision, wanted in [(stride1, torch.float32, True), (stride1, torch.bfloat16, True),
                                     (stride2, torch.float32, True), (stride2, torch.bfloat16, True),
                                     (stride4, torch.float32, True), (stride4, torch.bfloat16, False)]:
        rep = ModuleCut(model if precision == torch.float32 else low_precision(model, precision), "0")
        quadratic = quadratic_loss(rep, loss_for(rep), size, cpu)
        assert (quadratic is not None) == wanted, (model, precision)
        if quadratic is not None:
            assert quadratic.conv.compute_dtype == precision and quadratic.conv.kernel.dtype == precision
    rep = ModuleCut(stride1, "0")
    assert quadratic_loss(rep, loss_for(rep, mask=True), size, cpu) is None
    assert quadratic_loss(rep, loss_for(rep), size, torch.device("meta")) is None
    monkeypatch.setenv("PREIMAGE_QUADRATIC", "0")
    assert quadratic_loss(rep, loss_for(rep), size, cpu) is None


@pytest.mark.parametrize("stride", [1, 2])
def test_the_engine_gives_the_same_inversion(stride: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Optimizing through AᵀA follows the same path as optimizing through Φ: the same energies
    and images after 30 jittered steps, to float rounding; for a bf16 model, the same final loss
    to bf16 rounding."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 16 if stride == 1 else 96, 3 if stride == 1 else 7, stride=stride, padding=1))
    size = (32, 32)
    settings = Settings(jitter=3, C=100.0)
    for rep in (ModuleCut(model, "0"), ModuleCut(low_precision(model, torch.bfloat16), "0")):
        with torch.no_grad():
            target = rep(torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(2)) * 200 - 100).float()
        monkeypatch.setenv("PREIMAGE_QUADRATIC", "1")
        assert quadratic_loss(rep, L2Loss(target), size, torch.device("cpu")) is not None
        runs = {}
        for flag in ("1", "0"):
            monkeypatch.setenv("PREIMAGE_QUADRATIC", flag)
            runs[flag] = optimize(rep, L2Loss(target), size, [0, 1], settings, [Stage(30)])
        fast, slow = runs["1"], runs["0"]
        assert fast.quadratic and not slow.quadratic
        assert fast.energy["loss"][-1].max() < 0.9 * fast.energy["loss"][0].min()  # it did optimize
        if rep.compute_dtype == torch.float32:
            torch.testing.assert_close(fast.energy["loss"], slow.energy["loss"], rtol=1e-3, atol=1e-6)
            torch.testing.assert_close(fast.x, slow.x, rtol=1e-3, atol=1e-2)
        else:
            torch.testing.assert_close(fast.energy["loss"][-1], slow.energy["loss"][-1], rtol=2e-3, atol=0)
