"""The data term's gradient left in the jitter windows (objectives.WindowGradient, issue 5): the
engine's C update reads it where it lies, bit for bit what it would read from the canvas
gradient written out, for plain image gradients (a network's input gradient, bf16 channels-last
views into padded tensors) and for the phases of strided first layers (AᵀA)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from preimage import fused, native
from preimage.defaults import PAPER
from preimage.engine import Stage, optimize
from preimage.objectives import L2Loss, WindowGradient, uncrop
from preimage.representations.base import Geometry
from preimage.representations.cnn import ModuleCut, low_precision

from .test_native import CONSTANTS, needs_library


def _phases(N: int, C: int, A: int, s: int, B: int, dtype: torch.dtype, layout: str, g: torch.Generator) -> torch.Tensor:
    """A (N, C, A, s, B, s) window source: phases channels-last (as gram_phases leaves them), an
    NCHW phase tensor, or (s = 1) a view into a padded channels-last image."""
    if layout == "padded":
        full = torch.randn(N, A + 2, B + 1, C, generator=g).to(dtype)
        return full[:, 1 : A + 1, :B].permute(0, 3, 1, 2)[:, :, :, None, :, None]
    d = torch.randn(N, C * s * s, A, B, generator=g).to(dtype)
    if layout == "nhwc":
        d = d.contiguous(memory_format=torch.channels_last)
    return d.view(N, C, s, s, A, B).permute(0, 1, 4, 2, 5, 3)


CASES = [  # s, C, (A, B), window (H, W), origin (top, left), canvas margin T - 1
    (1, 3, (9, 11), (9, 11), (0, 0), 3),
    (1, 3, (10, 12), (8, 9), (1, 2), 2),
    (1, 1, (6, 5), (6, 5), (0, 0), 1),
    (2, 3, (6, 7), (11, 13), (0, 0), 3),  # the phase image is 12 x 14: one row and column beyond the window
    (2, 3, (5, 6), (11, 12), (1, 1), 3),  # beyond the phase image: zero rows and columns
    (4, 3, (4, 5), (15, 17), (2, 3), 3),
    (4, 2, (3, 3), (12, 11), (0, 1), 0),
]


LAYOUTS = [(case, layout) for case in CASES for layout in ("nhwc", "nchw", "padded")
           if layout != "padded" or case[0] == 1]  # a padded view is a plain image gradient (s = 1)


@needs_library
@pytest.mark.parametrize("threads", [1, 3], indirect=True)
@pytest.mark.parametrize("case, layout", LAYOUTS,
                         ids=[f"s{c[0]}-C{c[1]}-{c[3][0]}x{c[3][1]}@{c[4]}-{lay}" for c, lay in LAYOUTS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("extras", ["", "scale", "divisor", "both"])
def test_the_c_canvas_is_the_torch_canvas(case: tuple, dtype: torch.dtype, layout: str, extras: str,
                                          threads: int) -> None:
    """native.window_canvas gives, bit for bit, WindowGradient.image() written into a zero canvas
    (objectives.uncrop), for every stride, origin, layout and dtype, and is zero outside the
    windows and beyond the phase image."""
    s, C, (A, B), (H, W), origin, margin = case
    N = 3
    g = torch.Generator().manual_seed(s * 100 + C)
    values = _phases(N, C, A, s, B, dtype, layout, g)
    offsets = torch.randint(0, margin + 1, (N, 2), generator=g)
    scale = torch.rand(N, generator=g) * 3 if extras in ("scale", "both") else None
    divisor = torch.linspace(50, 60, C) if extras in ("divisor", "both") else None
    window = WindowGradient(values, offsets, (H, W), origin, divisor=divisor, scale=scale)
    shape = (N, C, H + margin, W + margin)
    out = native.window_canvas(window, shape)
    expected = uncrop(window.image(), offsets.tolist(), shape)
    assert out is not None and out.dtype == torch.float32 and out.is_contiguous()
    assert torch.equal(out, expected)
    inside = torch.zeros(shape, dtype=torch.bool)
    for n, (r, c) in enumerate(offsets.tolist()):
        inside[n, :, r : r + H, c : c + W] = True
    assert (out[~inside] == 0).all() and (out[inside] != 0).any()
    top, left = origin
    if top + H > A * s:  # window rows beyond the phase image are zero
        r = offsets[0, 0] + A * s - top
        assert (out[0, :, r : offsets[0, 0] + H] == 0).all()


@needs_library
@pytest.mark.parametrize("threads", [1, 2, 3], indirect=True)
@pytest.mark.parametrize("case", [CASES[1], CASES[4], CASES[5]], ids=["s1", "s2", "s4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_update_reads_windows_as_it_reads_the_canvas(case: tuple, dtype: torch.dtype, threads: int) -> None:
    """native.update with a WindowGradient: x, G, mu and the regularizers' values are bit for bit
    those of the update fed the canvas gradient written out, over several steps."""
    s, C, (A, B), (H, W), origin, margin = case
    N = 2
    g = torch.Generator().manual_seed(7)
    shape = (N, C, H + margin, W + margin)
    x0 = torch.randn(shape, generator=g) * 90
    states = [[x0.clone(), torch.zeros(shape), torch.zeros(shape)] for _ in range(2)]
    for _ in range(3):
        window = WindowGradient(_phases(N, C, A, s, B, dtype, "nhwc", g), torch.randint(0, margin + 1, (N, 2), generator=g),
                                (H, W), origin, divisor=torch.linspace(1, 2, C), scale=torch.rand(N, generator=g))
        got = native.update(*states[0][:1], window, *states[0][1:], 5.0, **CONSTANTS)
        ref = native.update(*states[1][:1], window.canvas(shape), *states[1][1:], 5.0, **CONSTANTS)
        assert got is not None and ref is not None
        assert all(torch.equal(a, b) for a, b in zip(got, ref))
    assert all(torch.equal(a, b) for a, b in zip(*states))


@needs_library
def test_windows_the_kernels_do_not_take_fall_back() -> None:
    """Windows beyond the canvas, fp64 values, a divisor per wrong channel count: window_canvas
    declines (None), the update declines, and canvas() still writes the canvas in PyTorch."""
    values = torch.randn(2, 3, 5, 1, 6, 1)
    shape = (2, 3, 7, 8)
    inside = WindowGradient(values, torch.tensor([[2, 2], [0, 1]]), (5, 6))
    assert native.window_canvas(inside, shape) is not None
    for bad in (WindowGradient(values, torch.tensor([[3, 0], [0, 0]]), (5, 6)),
                WindowGradient(values.double(), torch.tensor([[0, 0], [0, 0]]), (5, 6)),
                WindowGradient(values, torch.tensor([[0, 0], [0, 0]]), (5, 6), divisor=torch.ones(2))):
        assert native.window_canvas(bad, shape) is None
        x = torch.randn(shape)
        assert native.update(x, bad, torch.zeros(shape), torch.zeros(shape), 1.0, **CONSTANTS) is None
    fallback = WindowGradient(values.double(), torch.tensor([[2, 2], [0, 1]]), (5, 6)).canvas(shape)
    assert fallback.dtype == torch.float64 and torch.equal(fallback.float(), native.window_canvas(inside, shape))


class _Strided(nn.Module):
    def __init__(self, stride: int, kernel: int = 5, channels: int = 8, padding: int = 0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, channels, kernel, stride=stride, padding=padding)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.relu(self.conv1(x)))


def _engine_runs(cut: ModuleCut, monkeypatch: pytest.MonkeyPatch) -> tuple[list[str], object, object]:
    """The engine's fused step as it is, and with every window written out before the update."""
    x0 = torch.randn(2, 3, 40, 40, generator=torch.Generator().manual_seed(3)) * 50
    with torch.no_grad():
        loss = L2Loss(cut(x0))
    stages = [Stage(4), Stage(2, lr_factor=0.1, jitter=False)]
    settings = dataclasses.replace(PAPER, jitter=3)
    seen: list[str] = []
    real = native.update

    def spy(x: torch.Tensor, grad: object, *args: object, **kwargs: object) -> object:
        seen.append(type(grad).__name__)
        return real(x, grad, *args, **kwargs)

    monkeypatch.setattr(native, "update", spy)
    windowed = optimize(cut, loss, (40, 40), [0, 1], settings, stages, compile=True)

    def written(x: torch.Tensor, grad: object, *args: object, **kwargs: object) -> object:
        return real(x, grad if isinstance(grad, torch.Tensor) else grad.canvas(x.shape), *args, **kwargs)  # type: ignore[attr-defined]

    monkeypatch.setattr(native, "update", written)
    canvas = optimize(cut, loss, (40, 40), [0, 1], settings, stages, compile=True)
    return seen, windowed, canvas


@needs_library
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_engine_through_phi_passes_windows(precision: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through Φ (the C crop's backward pass fills the sink), the engine hands the update a
    WindowGradient every step and lands bit for bit where the written-out canvas lands."""
    torch.manual_seed(0)
    model = _Strided(2) if precision == "fp32" else low_precision(_Strided(2))
    cut = ModuleCut(model, "conv2", channels_last=precision == "bf16", geometry=Geometry(stride=2, receptive_field=9))
    seen, windowed, canvas = _engine_runs(cut, monkeypatch)
    assert seen == ["WindowGradient"] * 6 and not windowed.quadratic  # type: ignore[attr-defined]
    assert torch.equal(windowed.x, canvas.x)  # type: ignore[attr-defined]
    assert torch.equal(windowed.energy["total"], canvas.energy["total"])  # type: ignore[attr-defined]


@needs_library
@pytest.mark.parametrize("stride, kernel, channels", [(1, 3, 64), (2, 5, 64), (4, 11, 192)])
def test_engine_with_gram_passes_phase_windows(stride: int, kernel: int, channels: int,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """With AᵀA (a cut at the first convolution, wide enough for AᵀA to be chosen), the update
    reads the phases themselves and lands bit for bit where the written-out canvas lands."""
    torch.manual_seed(0)
    cut = ModuleCut(_Strided(stride, kernel, channels), "conv1", geometry=Geometry(stride=stride, receptive_field=kernel))
    seen, windowed, canvas = _engine_runs(cut, monkeypatch)
    assert windowed.quadratic and seen == ["WindowGradient"] * 6  # type: ignore[attr-defined]
    assert torch.equal(windowed.x, canvas.x)  # type: ignore[attr-defined]
    assert torch.equal(windowed.energy["total"], canvas.energy["total"])  # type: ignore[attr-defined]


@needs_library
def test_engine_writes_the_window_out_when_the_fused_step_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fused step that gives up (None) leaves the eager step the canvas gradient, written out."""
    torch.manual_seed(0)
    cut = ModuleCut(_Strided(2), "conv2", geometry=Geometry(stride=2, receptive_field=9))
    x0 = torch.randn(1, 3, 40, 40) * 50
    with torch.no_grad():
        loss = L2Loss(cut(x0))
    plain = optimize(cut, loss, (40, 40), [0], PAPER, [Stage(5)], compile=False)
    monkeypatch.setattr(fused, "step", lambda *args, **kwargs: None)
    failed = optimize(cut, loss, (40, 40), [0], PAPER, [Stage(5)], compile=True)
    assert not failed.compiled
    torch.testing.assert_close(failed.x, plain.x, rtol=0, atol=1e-3)


class _TwoReaders(_Strided):
    """The image read by the first convolution and by a second path (its mean), before the cut."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.relu(self.conv1(x)) * (1 + x.mean() / 100))


def _handed_off_and_not(cut: ModuleCut, monkeypatch: pytest.MonkeyPatch) -> tuple[int, object, object]:
    """The engine with the first convolution putting its phases in the crop's sink (counted), and
    with no crop carrying a CropWindow (the gradient shuffled into an image, then the crop's)."""
    from preimage.models import fusion
    from preimage.objectives import CropWindow
    from preimage.representations import input_conv

    x0 = torch.randn(2, 3, 40, 40, generator=torch.Generator().manual_seed(3)) * 50
    with torch.no_grad():
        loss = L2Loss(cut(x0))
    stages = [Stage(4), Stage(2, lr_factor=0.1, jitter=False)]
    settings = dataclasses.replace(PAPER, jitter=3)
    puts = []
    real_put = CropWindow.put
    monkeypatch.setattr(CropWindow, "put", lambda self, *a: (puts.append(a[0].shape), real_put(self, *a)))
    handed = optimize(cut, loss, (40, 40), [0, 1], settings, stages, compile=True)
    monkeypatch.setattr(input_conv, "crop_window", lambda t: None)
    monkeypatch.setattr(fusion, "crop_window", lambda t: None)
    shuffled = optimize(cut, loss, (40, 40), [0, 1], settings, stages, compile=True)
    return len(puts), handed, shuffled


@needs_library
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("model, layer, stride", [(_Strided, "conv2", 2), (_Strided, "conv2", 4), (_Strided, "conv1", 2),
                                                  (_Strided, "conv2", 1), (_TwoReaders, "conv2", 2)],
                         ids=["conv-relu-s2", "conv-relu-s4", "conv-s2", "conv-relu-s1", "two-readers"])
def test_the_first_convolution_hands_its_phases_to_the_update(precision: str, model: type, layer: str, stride: int,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The image-facing convolution's input gradient goes to the update as its phases (ordered
    (c, y, x), never shuffled into an image) through the crop's CropWindow, every step, whether
    the convolution is fused with its ReLU or not (a cut at it, AᵀA off) and at every stride;
    the engine lands where the shuffled image gradient takes it: bit for bit, or, where a
    second reader's gradient is added to the phases (in fp32 instead of the model's dtype),
    within rounding."""
    monkeypatch.setenv("PREIMAGE_QUADRATIC", "0")
    monkeypatch.setattr(ModuleCut, "loss_in_windows", lambda *args: None)  # a cut at conv1: through autograd
    torch.manual_seed(0)
    net = model(stride, kernel=5 if stride < 4 else 11)
    net = net if precision == "fp32" else low_precision(net)
    cut = ModuleCut(net, layer, channels_last=precision == "bf16", geometry=Geometry(stride=stride, receptive_field=9))
    puts, handed, shuffled = _handed_off_and_not(cut, monkeypatch)
    assert puts == 6 and not handed.quadratic  # type: ignore[attr-defined]
    if model is _TwoReaders and precision == "bf16":
        torch.testing.assert_close(handed.x, shuffled.x, rtol=0, atol=0.05)  # type: ignore[attr-defined]
    else:
        assert torch.equal(handed.x, shuffled.x)  # type: ignore[attr-defined]
        assert torch.equal(handed.energy["total"], shuffled.energy["total"])  # type: ignore[attr-defined]


def _losses(cut: ModuleCut, kind: str) -> object:
    """An inversion loss (plain or masked) or an activation-maximization loss of ``cut``'s code."""
    from preimage.objectives import InnerProductLoss

    x0 = torch.randn(2, 3, 40, 40, generator=torch.Generator().manual_seed(3)) * 50
    with torch.no_grad():
        code = cut(x0).float()
    if kind == "inner":
        onehot = torch.zeros_like(code)
        onehot[:, 1, code.shape[2] // 2, code.shape[3] // 2] = 1
        return InnerProductLoss(onehot, 500.0)
    mask = None
    if kind == "masked":
        mask = torch.zeros_like(code)
        mask[:, :, : code.shape[2] // 2] = 1
    return L2Loss(code, mask)


@needs_library
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("stride", [1, 2, 4])
@pytest.mark.parametrize("kind", ["l2", "masked", "inner"])
def test_a_cut_at_one_convolution_skips_autograd(precision: str, stride: int, kind: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Φ one convolution of the image (AᵀA off, or a loss it does not take): the engine takes the
    loss and the phases of the input gradient straight from the convolution
    (ModuleCut.loss_in_windows) every step and lands bit for bit where autograd takes it."""
    monkeypatch.setenv("PREIMAGE_QUADRATIC", "0")
    torch.manual_seed(0)
    net = _Strided(stride, kernel=3 if stride == 1 else 5 if stride == 2 else 11, padding=stride // 2 + 1)
    net = net if precision == "fp32" else low_precision(net)
    cut = ModuleCut(net, "conv1", channels_last=precision == "bf16", std=(40.0, 50.0, 60.0),
                    geometry=Geometry(stride=stride, receptive_field=9))
    loss = _losses(cut, kind)
    stages = [Stage(4), Stage(2, lr_factor=0.1, jitter=False)]
    settings = dataclasses.replace(PAPER, jitter=3)
    calls = []
    real = ModuleCut.loss_in_windows

    def counted(self: ModuleCut, *args: object) -> object:
        result = real(self, *args)  # type: ignore[arg-type]
        calls.append(result is not None)
        return result

    monkeypatch.setattr(ModuleCut, "loss_in_windows", counted)
    direct = optimize(cut, loss, (40, 40), [0, 1], settings, stages, compile=True)
    monkeypatch.setattr(ModuleCut, "loss_in_windows", lambda *args: None)
    through = optimize(cut, loss, (40, 40), [0, 1], settings, stages, compile=True)
    assert calls == [True] * 6
    assert torch.equal(direct.x, through.x)  # type: ignore[attr-defined]
    assert torch.equal(direct.energy["total"], through.energy["total"])  # type: ignore[attr-defined]


class _Scaled(_Strided):
    """A non-linearity before the first convolution: not one convolution of the image."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv1(torch.tanh(x / 100) * 100)


def test_only_a_cut_that_is_one_convolution_skips_autograd() -> None:
    """A cut past the first convolution, or one with anything before it, is not taken for it."""
    torch.manual_seed(0)
    geometry = Geometry(stride=2, receptive_field=9)
    assert ModuleCut(_Strided(2), "conv1", geometry=geometry).single_convolution() is not None
    assert ModuleCut(_Strided(2), "conv2", geometry=geometry).single_convolution() is None
    assert ModuleCut(_Scaled(2), "conv1", geometry=geometry).single_convolution() is None
    cut = ModuleCut(_Scaled(2), "conv1", geometry=geometry)
    canvas = torch.randn(1, 3, 42, 42)
    assert cut.loss_in_windows(canvas, torch.zeros(1, 2, dtype=torch.long), (40, 40), lambda c, **k: (c, c), 1.0) is None
