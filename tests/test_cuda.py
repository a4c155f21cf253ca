"""The CUDA paths (issue 5): every representation, the engine's compiled step, the batch-size
choice, the three visualizations and the command line on a GPU, checked against the CPU.

Skipped as a whole where torch sees no CUDA device (this project's CI); run on a lent GPU with
``python -m pytest tests/test_cuda.py``.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

from preimage import Settings, caricature, invert, maximize
from preimage.defaults import PAPER
from preimage.engine import Stage, auto_batch_size, optimize
from preimage.models.zoo import load_model
from preimage.objectives import L2Loss
from preimage.representations import make_representation
from preimage.representations import input_conv

from .conftest import benchmark_module, photo, tiny_cnn

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")

FAST = Settings(iterations=40, fine_iterations=10)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm()).item()


def code_and_gradient(rep, x: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Φ(x) and the gradient of <weights, Φ(x)> with respect to x, as the engine differentiates Φ."""
    x = x.clone().requires_grad_(True)
    code = rep.for_optimization()(x)
    (code.float() * weights.to(code.device)).sum().backward()
    return code.detach().float().cpu(), x.grad.cpu()


@pytest.mark.parametrize("name", ["hog", "hogb", "dsift"])
def test_shallow_codes_and_gradients_on_cuda_match_the_cpu(name):
    rep = make_representation(name)
    x = rep.preprocess(torch.stack([photo("astronaut", 96), photo("coffee", 96)]))
    with torch.no_grad():
        shape = rep(x).shape
    weights = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    cpu_code, cpu_grad = code_and_gradient(rep, x, weights)
    gpu_code, gpu_grad = code_and_gradient(copy.deepcopy(rep).to("cuda"), x.cuda(), weights)
    # float32 on both; HOG's orientation bins may flip on a handful of near-ties (the CPU uses
    # numpy's correctly rounded sqrt / atan2), so compare norms, not every entry
    assert relative(gpu_code, cpu_code) < 1e-4
    assert relative(gpu_grad, cpu_grad) < 1e-3


@pytest.mark.parametrize("precision,tolerance,grad_tolerance", [("fp32", 5e-3, 5e-3), ("bf16", 5e-2, 0.35)])
def test_alexnet_cut_on_cuda_matches_the_cpu(precision, tolerance, grad_tolerance, monkeypatch):
    """fp32 on the GPU (TF32 off: with torch's default TF32 convolutions the gradient was 4 %
    away) and bf16 against the fp32 CPU reference.  bf16's gradient through three random-weight
    ReLU layers flips some gates: the CPU's own bf16 cut is 0.23 away from its fp32 one."""
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    loaded = load_model("alexnet")
    reference = loaded.representation("conv3", precision="fp32")
    gpu = copy.deepcopy(loaded).representation("conv3", precision=precision).to("cuda")
    x = reference.preprocess(photo("astronaut", 227)[None].expand(2, -1, -1, -1))
    with torch.no_grad():
        shape = reference(x).shape
    weights = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    cpu_code, cpu_grad = code_and_gradient(reference, x, weights)
    gpu_code, gpu_grad = code_and_gradient(gpu, x.cuda(), weights)
    assert gpu_code.dtype == torch.float32 and gpu_grad.dtype == torch.float32
    assert relative(gpu_code, cpu_code) < tolerance
    assert relative(gpu_grad, cpu_grad) < grad_tolerance


def test_fp32_stride_2_first_convolution_on_cuda_keeps_cudnns_backward(monkeypatch):
    """On CUDA the fp32 7x7 stride-2 input convolution (12 sub-pixel channels, not a multiple of
    8) is left to autograd: the sub-pixel form measured 0.96-1.5x there, and 2.8x slower in bf16
    at batch 128 (benchmarks/README.md)."""
    def refuse(*args, **kwargs):
        raise AssertionError("sub-pixel backward used")

    monkeypatch.setattr(input_conv._InputGradient, "apply", refuse)
    rep = load_model("vgg-m").representation("conv1").to("cuda")
    phi = rep.for_optimization()
    assert phi.fast_input_gradient  # it qualifies; only the device keeps it off
    x = torch.randn(2, 3, 224, 224, device="cuda", requires_grad=True)
    phi(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.skipif(torch.cuda.is_available() and not torch.cuda.is_bf16_supported(), reason="this GPU has no bf16")
@pytest.mark.parametrize("model,how", [("vgg-m", "padded_input_gradient"), ("alexnet", "input_gradient")])
def test_bf16_first_convolution_on_cuda_uses_its_fast_backward(model, how, monkeypatch):
    """bf16 on CUDA: VGG-M's stride-2 conv1 pads the image to 8 channels, AlexNet's stride-4
    one (48 sub-pixel channels) takes the sub-pixel form; the gradient is autograd's."""
    calls = []
    original = getattr(input_conv, how)

    def counted(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(input_conv, how, counted)
    rep = load_model(model).representation("conv1", precision="bf16").to("cuda")
    x = torch.randn(2, 3, 227, 227, device="cuda") * 50
    grads = []
    for phi in (rep, rep.for_optimization()):
        xx = x.clone().requires_grad_(True)
        phi(xx).float().square().sum().backward()
        grads.append(xx.grad)
    assert calls == [1]
    assert relative(grads[1], grads[0]) < 2e-2


def _hog_problem(n: int):
    """HOG on the GPU and the inversion loss of a 64 x 64 photo's code, for ``n`` seeds."""
    rep = make_representation("hog").to("cuda")
    with torch.no_grad():
        target = rep(rep.preprocess(photo("coffee", 64)[None].cuda())).float()
    return rep, L2Loss(target.expand(n, *target.shape[1:]).contiguous())


def test_compiled_engine_step_on_cuda_follows_the_eager_one():
    rep, loss = _hog_problem(3)
    stages = [Stage(6), Stage(3, lr_factor=0.1, jitter=False)]
    eager = optimize(rep, loss, (64, 64), [0, 1, 2], PAPER, stages, device="cuda", compile=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a compilation failure warns: fail instead
        compiled = optimize(rep, loss, (64, 64), [0, 1, 2], PAPER, stages, device="cuda", compile=True)
    assert compiled.compiled and not eager.compiled
    for term in ("loss", "bounded_range", "tv", "total"):
        torch.testing.assert_close(compiled.energy[term], eager.energy[term], rtol=2e-3, atol=1e-6)
    torch.testing.assert_close(compiled.x, eager.x, rtol=0, atol=0.5)


def test_cpu_and_cuda_runs_reach_the_same_error():
    """Same seeds, same settings: the GPU inversion is as good as the CPU one."""
    rep = make_representation("hog")
    photos = torch.stack([photo("astronaut", 64), photo("chelsea", 64)])
    cpu = invert(rep, photos, seeds=[0], settings=FAST)
    gpu = invert(copy.deepcopy(rep).to("cuda"), photos, seeds=[0], settings=FAST, device="cuda")
    assert gpu.images.device.type == "cpu" and gpu.images.shape == cpu.images.shape
    assert (gpu.error - cpu.error).abs().max().item() < 0.03
    assert gpu.error.max().item() < 0.6


def test_batch_size_on_cuda_follows_free_memory():
    rep = make_representation("hog").to("cuda")
    big = auto_batch_size(rep, (160, 160), "cuda")
    assert 16 < big <= 256  # a GPU takes far more than the CPU's 16
    assert auto_batch_size(rep, (160, 160), "cuda", budget=1) == 1
    assert auto_batch_size(rep, (160, 160), "cuda", cap=7) == 7


@pytest.mark.skipif(torch.cuda.is_available() and not torch.cuda.is_bf16_supported(), reason="this GPU has no bf16")
def test_bf16_maximize_and_caricature_on_cuda():
    loaded = load_model("alexnet")
    rep = loaded.representation("conv5", precision="bf16").to("cuda")
    settings = Settings(iterations=30, fine_iterations=0)
    maxed = maximize(rep, (227, 227), units=[3, 7], settings=settings, device="cuda")
    assert maxed.images.shape == (2, 3, 227, 227) and torch.isfinite(maxed.images).all()
    # from noise the unit is driven up: the (negative, normalized) inner-product loss falls
    # (random weights: the activation itself may stay below zero in 30 steps)
    assert (maxed.energy["loss"][-1] < maxed.energy["loss"][0]).all()
    cartoon = caricature(rep, photo("astronaut", 227)[None], settings=settings, device="cuda")
    assert cartoon.activation[0] > cartoon.extra["initial_activation"][0]


def test_cli_invert_on_cuda(images, tmp_path):
    from click.testing import CliRunner

    from preimage.cli import main

    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["invert", str(images / "coffee.png"), "--rep", "hog", "--size", "48",
                                  "--device", "cuda", "--iterations", "15", "--fine-iterations", "5",
                                  "--out", str(out)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    side = json.loads((out / "coffee.hog.invert.seed0.json").read_text())
    assert side["config"]["device"].startswith("cuda") and 0 < side["error"] < 1.5


def test_jitter_crop_on_cuda_is_one_gather_with_the_cpu_values():
    from preimage.objectives import jitter_crop

    g = torch.Generator().manual_seed(0)
    canvas = torch.randn(6, 3, 20, 21, generator=g)
    offsets = torch.randint(0, 4, (6, 2), generator=g)
    offsets[0] = torch.tensor([0, 3])
    weights = torch.randn(6, 3, 17, 18, generator=g)
    results = []
    for device in ("cpu", "cuda"):
        c = canvas.to(device).detach().requires_grad_(True)
        crop = jitter_crop(c, offsets, (17, 18))
        (crop * weights.to(device)).sum().backward()
        results.append((crop.detach().cpu(), c.grad.cpu()))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=0)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-6, atol=1e-6)


def _graph_and_eager(rep, loss, size, seeds, stages, **kwargs):
    runs = {}
    for graph in (True, False):
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # a failed record (or compile) warns: fail instead
            runs[graph] = optimize(rep, loss, size, seeds, PAPER, stages, device="cuda", graph=graph, **kwargs)
    return runs[True], runs[False]


@pytest.fixture
def deterministic():
    """torch's deterministic algorithms for one test (HOG's CUDA ``index_add_`` then sums in a
    fixed order: 2.4x slower at batch 16 on an H200, 0.064 -> 0.157 ms per image and step)."""
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(was)


@pytest.mark.parametrize("compile", [True, False])
def test_recorded_hog_step_follows_the_eager_one(compile, deterministic):
    """The CUDA-graph step (preimage.graphs) replays the eager step's arithmetic: the same energies
    and the same image, bit for bit, across a stage change (a new step size: a new record) and
    the central crop.  Deterministic algorithms: HOG's ``index_add_`` sums in no fixed order on
    CUDA otherwise, so that two eager runs differ too (on an H200, by up to 2.6 at one pixel of
    ~100 after 20 steps: a pixel near an orientation-bin boundary can go either way)."""
    rep, loss = _hog_problem(3)
    stages = [Stage(12), Stage(8, lr_factor=0.1, jitter=False)]
    graphed, eager = _graph_and_eager(rep, loss, (64, 64), [0, 1, 2], stages, compile=compile)
    assert graphed.graphed and not eager.graphed and graphed.compiled == eager.compiled == compile
    for term in ("loss", "bounded_range", "tv", "total"):
        torch.testing.assert_close(graphed.energy[term], eager.energy[term], rtol=0, atol=0)
    assert torch.equal(graphed.x, eager.x)


@pytest.mark.skipif(torch.cuda.is_available() and not torch.cuda.is_bf16_supported(), reason="this GPU has no bf16")
@pytest.mark.parametrize("model,layer", [("alexnet", "conv3"), ("vgg-m", "conv1"), ("squeezenet", "fire3/concat")])
def test_recorded_cnn_step_follows_the_eager_one(model, layer, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    if model == "squeezenet":  # random weights, from the benchmark suite's prototxt
        (tmp_path / "deploy.prototxt").write_text(benchmark_module().squeezenet_prototxt())
        model = tmp_path / "deploy.prototxt"
    rep = load_model(model).representation(layer, precision="bf16").to("cuda")
    x0 = rep.preprocess(torch.stack([photo("astronaut", 227), photo("chelsea", 227)])).cuda()
    with torch.no_grad():
        target = rep(x0).float()
    stages = [Stage(10), Stage(6, lr_factor=0.1)]
    graphed, eager = _graph_and_eager(rep, L2Loss(target), (227, 227), [0, 1], stages, compile=True)
    assert graphed.graphed and not eager.graphed
    torch.testing.assert_close(graphed.energy["total"], eager.energy["total"], rtol=1e-3, atol=1e-6)
    assert relative(graphed.x, eager.x) < 1e-3


def test_a_step_cuda_cannot_record_runs_eagerly_with_one_warning(monkeypatch):
    """A Φ that reads a value back to the host mid-step cannot be recorded: the run warns once and
    finishes eagerly, with the eager run's results."""
    from preimage import graphs
    from preimage.representations.cnn import ModuleCut

    class HostRead(torch.nn.Module):
        def forward(self, x):
            return x * (1.0 + 0.0 * float(x.detach().abs().max()))  # a host synchronization

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), HostRead()).cuda()
    rep = ModuleCut(net, "2", mean=(0, 0, 0), std=(1, 1, 1))
    with torch.no_grad():
        target = rep(torch.rand(2, 3, 24, 24, device="cuda") * 100)
    stages = [Stage(8)]
    monkeypatch.setattr(graphs, "_warned", False)
    with pytest.warns(RuntimeWarning, match="could not be recorded as a CUDA graph"):
        tried = optimize(rep, L2Loss(target), (24, 24), [0, 1], PAPER, stages, device="cuda", graph=True)
    eager = optimize(rep, L2Loss(target), (24, 24), [0, 1], PAPER, stages, device="cuda", graph=False)
    assert not tried.graphed
    torch.testing.assert_close(tried.energy["total"], eager.energy["total"], rtol=1e-5, atol=1e-6)
    x = torch.ones(4, device="cuda")
    assert (x + 1).sum().item() == 8  # the device still works after the failed record


def test_a_stage_without_jitter_is_recorded_with_a_plain_slice(monkeypatch, deterministic):
    """A stage without jitter (a first layer's, T = 1, or an inversion's last) keeps its one offset
    on the host, recorded or not: the window is a slice, not a gather at device offsets (on an
    H200 that gather cost AlexNet conv1 at batch 128 0.4 ms of a 2.4 ms step); a jittered stage's
    record gathers.  Same results as the eager step either way."""
    from preimage import objectives

    gathered = []
    gather = objectives.gather_crop
    monkeypatch.setattr(objectives, "gather_crop", lambda *args: gathered.append(1) or gather(*args))
    rep, loss = _hog_problem(2)
    graphed, eager = _graph_and_eager(rep, loss, (64, 64), [0, 1], [Stage(8, jitter=False)])
    assert graphed.graphed and not gathered
    assert torch.equal(graphed.x, eager.x)
    jittered = optimize(rep, loss, (64, 64), [0, 1], PAPER, [Stage(8)], device="cuda", graph=True)
    assert jittered.graphed and gathered


def test_the_output_bias_moves_into_the_target_with_the_same_results(monkeypatch):
    """On CUDA the engine inverts a cut that ends at a biased convolution without that bias,
    against Φ0 - b (engine.output_bias_in_target; ATen adds a cuDNN convolution's bias in a pass
    of its own): the same energies and image as with the bias in the code (strict fp32)."""
    from preimage import engine
    from preimage.representations.cnn import ModuleCut

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    model = tiny_cnn(3)
    with torch.no_grad():
        for m in model:
            if isinstance(m, torch.nn.Conv2d):
                m.bias.uniform_(-2, 2)
    rep = ModuleCut(model, "3", mean=(0.4, 0.4, 0.4), std=(0.2, 0.2, 0.2)).cuda()
    with torch.no_grad():
        target = rep(rep.preprocess(photo("coffee", 64)[None].cuda()))
    loss = L2Loss(target.expand(2, *target.shape[1:]).contiguous())
    fold = engine.output_bias_in_target
    folded_flags = []
    monkeypatch.setattr(engine, "output_bias_in_target",
                        lambda p, l, d: (lambda out: folded_flags.append(out[0] is not p) or out)(fold(p, l, d)))
    folded = optimize(rep, loss, (64, 64), [0, 1], PAPER, [Stage(12)], device="cuda", graph=False)
    monkeypatch.setattr(engine, "output_bias_in_target", lambda p, l, d: (p, l))
    plain = optimize(rep, loss, (64, 64), [0, 1], PAPER, [Stage(12)], device="cuda", graph=False)
    assert folded_flags == [True]
    for term in ("loss", "total"):
        torch.testing.assert_close(folded.energy[term], plain.energy[term], rtol=1e-4, atol=1e-7)
    assert relative(folded.x, plain.x) < 1e-4
