"""The engine and the three visualizations on a small CNN built here (nothing downloaded)."""

import pytest
import torch

from preimage import (
    ModuleCut,
    ObjectiveError,
    RepresentationError,
    Settings,
    caricature,
    invert,
    maximize,
)
from preimage.engine import Stage, noise_init, percentile95

from .conftest import photo, tiny_cnn

FAST = Settings(iterations=60, fine_iterations=10)


@pytest.fixture
def rep():
    return ModuleCut(tiny_cnn(), "3")


def test_geometry_is_probed(rep):
    # conv5/s2 -> pool2 -> conv3: stride 4, receptive field 5 + (2-1)*2 + (3-1)*4 = 15
    assert rep.geometry.stride == 4
    assert rep.geometry.receptive_field == 15
    assert rep.geometry.jitter == 1


def test_noise_init_95th_percentile_is_B_over_sqrt3():
    x = noise_init((3, 50, 50), seed=3, scale=80 / 3**0.5)
    assert torch.quantile(x.flatten(), 0.95).item() == pytest.approx(80 / 3**0.5, rel=1e-5)


@pytest.mark.parametrize("shape", [(3, 230, 230), (1, 161, 160), (3, 7, 5), (1, 2, 2), (1, 1, 1)])
def test_percentile95_is_torch_quantile_bit_for_bit(shape):
    """Every seed's start depends on it: the selection must give quantile's very bits."""
    for seed in range(5):
        x = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1
        assert torch.equal(percentile95(x.flatten()), torch.quantile(x.flatten(), 0.95))
    ties = torch.tensor([0.0, 1.0, 1.0, 1.0, 2.0, 5.0, 5.0])
    assert torch.equal(percentile95(ties), torch.quantile(ties, 0.95))


def test_invert_reduces_error_and_returns_everything(rep):
    img = photo(size=48)[None]
    r = invert(rep, img, seeds=[0, 1], settings=FAST.replace(C=100))
    assert r.images.shape == (2, 3, 48, 48) and r.x.shape == (2, 3, 48, 48)
    assert set(r.energy) == {"loss", "bounded_range", "tv", "total"}
    assert r.energy["total"].shape == (70, 2)
    assert (r.error < 0.6).all(), r.error  # from noise (error ~1) to a reconstruction
    assert r.energy["loss"][-1].mean() < r.energy["loss"][0].mean() / 3
    assert r.elements == [{"image": 0, "seed": 0}, {"image": 0, "seed": 1}]
    assert r.config["settings"]["C"] == 100 and r.config["settings"]["eta0"] == pytest.approx(0.01 * 80**2 / 6)
    assert r.config["stages"][1] == {"iterations": 10, "lr_factor": 0.1, "jitter": False}


def test_same_seed_same_output_on_cpu(rep):
    img = photo(size=32)[None]
    a = invert(rep, img, seeds=[5], settings=FAST.replace(jitter=2))
    b = invert(rep, img, seeds=[5], settings=FAST.replace(jitter=2))
    c = invert(rep, img, seeds=[6], settings=FAST.replace(jitter=2))
    assert torch.equal(a.x, b.x)
    assert not torch.equal(a.x, c.x)


def test_pixels_stay_in_the_B_plus_ball(rep):
    r = maximize(rep, (32, 32), [1], settings=Settings(iterations=40, B=20))
    assert r.x.pow(2).sum(1).sqrt().max() <= 40 + 1e-3


def test_activation_maximization_raises_the_unit(rep):
    from preimage.visualizations import code_shape, one_hot

    shape = code_shape(rep, (40, 40))
    w = one_hot(shape, 3)
    g = torch.Generator().manual_seed(0)
    start = torch.stack([noise_init((3, 40, 40), 0, 80 / 3**0.5, g)])
    with torch.no_grad():
        before = (rep(start) * w).sum().item()
    r = maximize(rep, (40, 40), [3, 7], seeds=[0], settings=Settings(iterations=80))
    assert r.activation[0] > before + 1.0
    assert (r.activation > 0).all()
    assert r.error[0] == pytest.approx(-r.activation[0].item() / (1.0 * (15 / 100) ** 2), rel=1e-4)


def test_caricature_increases_inner_product(rep):
    img = photo(size=40)[None]
    r = caricature(rep, img, settings=Settings(iterations=40, C=20))
    assert r.activation[0] > 1.5 * r.extra["initial_activation"][0]


def test_masked_inversion_uses_only_the_window(rep):
    img = photo(size=48)[None]
    mask = torch.zeros(16, 12, 12)  # stride 4: a 12 x 12 code
    mask[:, 5:7, 5:7] = 1
    r = invert(rep, img, mask=mask, settings=FAST.replace(C=100))
    # pixels far outside the window's receptive field are pulled to zero by the regularizers
    far = r.x[0, :, :4, :4].abs().mean()
    near = r.x[0, :, 20:28, 20:28].abs().mean()
    assert far < 0.2 * near


def test_cut_stops_at_the_layer_and_removes_hooks():
    class Boom(torch.nn.Module):
        def forward(self, x):
            raise AssertionError("layers after the cut must not run")

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), Boom())
    rep = ModuleCut(net, "1", geometry=None)
    out = rep(torch.randn(1, 3, 10, 10))
    assert out.shape == (1, 4, 8, 8)
    assert all(len(m._forward_hooks) == 0 for m in net.modules())
    assert not any(p.requires_grad for p in net.parameters())


def test_hooks_removed_when_the_model_raises():
    class Fails(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("bad")

    net = torch.nn.Sequential(Fails(), torch.nn.ReLU())
    rep = ModuleCut.__new__(ModuleCut)
    ModuleCut.__init__(rep, net, "1", geometry=__import__("preimage").Geometry(1, 1))
    with pytest.raises(RuntimeError, match="bad"):
        rep(torch.randn(1, 3, 4, 4))
    assert all(len(m._forward_hooks) == 0 for m in net.modules())


def test_unknown_layer_and_wrong_shape_are_clear_errors(rep):
    with pytest.raises(RepresentationError, match="unknown layer 'features.9'"):
        ModuleCut(tiny_cnn(), "features.9")
    with pytest.raises(RepresentationError, match=r"expected input of shape \(N, 3, H, W\)"):
        rep(torch.zeros(1, 1, 8, 8))


def test_zero_norm_target_and_nan_input_are_clear_errors(rep):
    black = torch.zeros(1, 3, 32, 32)
    relu_dead = ModuleCut(torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3, bias=False), torch.nn.ReLU()), "1",
                          mean=(0, 0, 0))
    with pytest.raises(ObjectiveError, match="zero norm"):
        invert(relu_dead, black, settings=FAST)
    nan = torch.full((1, 3, 16, 16), float("nan"))
    with pytest.raises(RepresentationError, match="NaN"):
        invert(rep, nan, settings=FAST)


def test_an_energy_that_becomes_nan_stops_the_run_where_it_is_checked(rep):
    """The energy is checked every ``callback_every`` iterations: a loss finite for 12 iterations,
    then NaN, stops the run at iteration 20 with a one-line error naming it."""
    from preimage import PreimageError
    from preimage.engine import optimize

    calls = []

    def loss(code: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return code.float().pow(2).flatten(1).sum(1) * (1.0 if len(calls) <= 12 else float("nan"))

    with pytest.raises(PreimageError, match="NaN or infinite at iteration 20$"):
        optimize(rep, loss, (24, 24), [0], FAST, [Stage(40)], callback_every=10)
    assert len(calls) == 20


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_invert_on_cuda_matches_the_cpu_quality(rep):
    img = photo(size=48)[None]
    cpu = invert(rep, img, seeds=[0], settings=FAST.replace(C=100))
    gpu = invert(rep.to("cuda"), img, seeds=[0], settings=FAST.replace(C=100), device="cuda")
    assert gpu.x.device.type == "cpu" and gpu.images.shape == cpu.images.shape
    assert abs(gpu.error[0].item() - cpu.error[0].item()) < 0.05


def test_chunked_optimization_equals_one_batch() -> None:
    """Big batches run in chunks (memory): each element's result does not depend on the chunking."""
    from preimage.engine import auto_batch_size, element_bytes, optimize
    from preimage.objectives import L2Loss
    from preimage.representations.cnn import ModuleCut

    from .conftest import tiny_cnn

    rep = ModuleCut(tiny_cnn(), "2", mean=(0, 0, 0), std=(1, 1, 1))
    x0 = torch.rand(5, 3, 24, 24) * 200 - 100
    with torch.no_grad():
        target = rep(x0)
    s = Settings(iterations=6, fine_iterations=0, jitter=3)
    stages = [Stage(6)]
    seen: list[tuple[int, int]] = []
    whole = optimize(rep, L2Loss(target), (24, 24), list(range(5)), s, stages, batch_size=5)
    parts = optimize(rep, L2Loss(target), (24, 24), list(range(5)), s, stages, batch_size=2,
                     callback=lambda t, total, e: seen.append((t, total)), callback_every=3)
    torch.testing.assert_close(parts.x, whole.x, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(parts.energy["total"], whole.energy["total"], rtol=1e-4, atol=1e-5)
    assert seen[-1] == (18, 18) and all(b == 18 for _, b in seen)  # one count over the 3 chunks
    per = element_bytes(rep, (24, 24))
    assert per > 40 * 3 * 24 * 24 * 4
    assert auto_batch_size(rep, (24, 24), budget=3 * per) == 3
    assert auto_batch_size(rep, (24, 24), budget=1000 * per) == 16  # the CPU cap
    assert auto_batch_size(rep, (24, 24), budget=1) == 1


def test_auto_batch_size_amortizes_the_weights_a_cut_reads() -> None:
    """On CPU a weight-heavy cut (a big fully connected layer) gets a big batch, which reads its
    weights once per step for many elements; a cut before that layer does not read them and
    keeps the batch whose largest activation stays cache-sized."""
    from torch import nn

    from preimage.engine import CPU_ACTIVATION, _probe, auto_batch_size, element_bytes
    from preimage.representations.cnn import ModuleCut

    net = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.AdaptiveAvgPool2d(16), nn.Flatten(), nn.Linear(64 * 16 * 16, 2048))
    conv = ModuleCut(net, "0", mean=(0, 0, 0), std=(1, 1, 1))
    fc = ModuleCut(net, "3", mean=(0, 0, 0), std=(1, 1, 1))
    budget = 1 << 40
    largest = _probe(conv, (224, 224), "cpu")[2]
    assert largest == 64 * 224 * 224 * 4  # its code, the biggest activation
    assert auto_batch_size(conv, (224, 224), budget=budget) == CPU_ACTIVATION // largest < 16
    assert auto_batch_size(fc, (224, 224), budget=budget) == 16
    # small activations: a big batch, however many image-sized buffers an element needs
    small = ModuleCut(nn.Sequential(nn.Conv2d(3, 8, 3, stride=4)), "0", mean=(0, 0, 0), std=(1, 1, 1))
    assert element_bytes(small, (224, 224)) > CPU_ACTIVATION
    assert auto_batch_size(small, (224, 224), budget=budget) == 16
    assert auto_batch_size(fc, (224, 224), budget=3 * element_bytes(fc, (224, 224))) == 3  # memory first


def test_each_seed_jitters_by_its_own_draws_step_by_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine draws a stage's shifts at once; they are each seed's generator's draws as they
    were made step by step (after the noise start), and a stage without jitter draws none."""
    from preimage.engine import Stage, optimize
    from preimage.objectives import L2Loss
    from preimage.representations import base
    from preimage.representations.cnn import ModuleCut

    from .conftest import tiny_cnn

    rep = ModuleCut(tiny_cnn(), "2", mean=(0, 0, 0), std=(1, 1, 1))
    with torch.no_grad():
        target = rep(torch.rand(2, 3, 24, 24) * 200 - 100)
    seen: list[list[list[int]]] = []
    real = base.jitter_crop
    monkeypatch.setattr(base, "jitter_crop", lambda x, offsets, size: (seen.append(offsets.tolist()), real(x, offsets, size))[1])
    s = Settings(iterations=5, fine_iterations=0, jitter=4)
    optimize(rep, L2Loss(target), (24, 24), [7, 9], s, [Stage(5), Stage(2, jitter=False), Stage(3)], compile=False)
    expected = []
    gens = [torch.Generator().manual_seed(seed) for seed in (7, 9)]
    for g in gens:
        torch.rand((3, 27, 27), generator=g)  # the noise start (engine.noise_init)
    for stage, jitter in ((5, True), (2, False), (3, True)):
        for _ in range(stage):
            expected.append([torch.randint(0, 4, (2,), generator=g).tolist() for g in gens] if jitter else [[1, 1], [1, 1]])
    assert seen == expected


def test_cuda_graphs_are_wanted_on_cuda_unless_told(monkeypatch):
    from preimage import graphs

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(graphs, "_default", None)
    monkeypatch.delenv("PREIMAGE_CUDA_GRAPHS", raising=False)
    assert graphs.wanted(None, cuda) and graphs.wanted(True, cuda)
    assert not graphs.wanted(False, cuda)
    assert not graphs.wanted(None, cpu) and not graphs.wanted(True, cpu)
    for off in ("0", "false", "No", " off "):
        monkeypatch.setenv("PREIMAGE_CUDA_GRAPHS", off)
        assert not graphs.wanted(None, cuda) and graphs.wanted(True, cuda)
    monkeypatch.setenv("PREIMAGE_CUDA_GRAPHS", "on")
    assert graphs.wanted(None, cuda) and not graphs.wanted(False, cuda)


def test_the_process_default_for_cuda_graphs_comes_before_the_environment(monkeypatch):
    """graphs.set_default (the CLI's --cuda-graphs / --no-cuda-graphs) decides for runs that do
    not say, over PREIMAGE_CUDA_GRAPHS; None hands back to it."""
    from preimage import graphs

    cuda = torch.device("cuda")
    monkeypatch.setattr(graphs, "_default", None)
    monkeypatch.setenv("PREIMAGE_CUDA_GRAPHS", "0")
    graphs.set_default(True)
    assert graphs.wanted(None, cuda) and not graphs.wanted(False, cuda)
    assert not graphs.wanted(None, torch.device("cpu"))
    monkeypatch.setenv("PREIMAGE_CUDA_GRAPHS", "1")
    graphs.set_default(False)
    assert not graphs.wanted(None, cuda) and graphs.wanted(True, cuda)
    graphs.set_default(None)
    assert graphs.wanted(None, cuda)
    monkeypatch.setenv("PREIMAGE_CUDA_GRAPHS", "0")
    assert not graphs.wanted(None, cuda)


def _biased_cut(layer: str = "3") -> ModuleCut:
    model = tiny_cnn(3)
    with torch.no_grad():  # biases far from zero, so that leaving one out shows
        for m in model:
            if isinstance(m, torch.nn.Conv2d):
                m.bias.uniform_(-2, 2)
    return ModuleCut(model, layer, mean=(0.4, 0.4, 0.4), std=(0.2, 0.2, 0.2)).for_optimization()


def test_a_cut_without_its_output_bias_is_the_cut_minus_the_bias():
    """ModuleCut.without_output_bias: cut(x) + b == Φ(x); Φ keeps its bias, also after the cut's
    own stop (an exception) and after a failing call; None where the cut is not a convolution."""
    rep = _biased_cut("3")
    x = torch.randn(2, 3, 32, 32) * 50
    expected = rep(x)
    cut, bias = rep.without_output_bias()
    code = cut(x)
    assert code.shape == expected.shape and not torch.allclose(code, expected, atol=0.1)
    torch.testing.assert_close(code + bias.view(1, -1, 1, 1), expected, rtol=1e-5, atol=1e-4)
    with pytest.raises(RuntimeError):  # raised inside the model: too small for its pooling
        cut(torch.randn(2, 3, 2, 2))
    torch.testing.assert_close(rep(x), expected, rtol=0, atol=0)  # the shared module has its bias back
    assert cut.without_output_bias() is None  # already without it
    assert _biased_cut("4").without_output_bias() is None  # a ReLU
    x.requires_grad_(True)
    (grad,) = torch.autograd.grad((cut(x) * code).sum(), x)
    (ref,) = torch.autograd.grad((rep(x) * code).sum(), x)
    torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("masked", [False, True])
def test_a_shifted_l2_loss_is_the_loss_of_the_shifted_code(masked):
    """L2Loss.shifted(b)(c) == loss(c + b), values and gradients, the normalization kept."""
    from preimage.objectives import L2Loss

    g = torch.Generator().manual_seed(0)
    target = torch.randn(3, 5, 4, 6, generator=g)
    mask = (torch.rand(3, 5, 4, 6, generator=g) > 0.3).float() if masked else None
    loss = L2Loss(target, mask)
    bias = torch.randn(5, generator=g) * 3
    code = torch.randn(3, 5, 4, 6, generator=g)
    shifted = loss.shifted(bias)
    torch.testing.assert_close(shifted(code), loss(code + bias.view(1, -1, 1, 1)))
    value, grad = shifted.value_and_grad(code, weight=7.0)
    ref_value, ref_grad = loss.value_and_grad(code + bias.view(1, -1, 1, 1), weight=7.0)
    torch.testing.assert_close(value, ref_value)
    torch.testing.assert_close(grad, ref_grad)
    torch.testing.assert_close(loss.target, target, rtol=0, atol=0)  # the original is untouched


def test_the_engine_moves_the_output_bias_into_the_target_on_cuda_only():
    """engine.output_bias_in_target: on CUDA, an L2 loss of a cut ending at a biased convolution
    becomes the bias-free cut against Φ0 - b (the same loss and gradient); on the CPU, for a ReLU
    cut or another loss, (phi, loss) as given.  Checked on CPU tensors (only the device's kind decides)."""
    from preimage.engine import output_bias_in_target
    from preimage.objectives import InnerProductLoss, L2Loss

    rep = _biased_cut("3")
    photos = torch.rand(2, 3, 32, 32) * 255
    loss = L2Loss(rep(photos).detach())
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert output_bias_in_target(rep, loss, cpu) == (rep, loss)
    relu_cut = _biased_cut("4")
    assert output_bias_in_target(relu_cut, L2Loss(relu_cut(photos).detach()), cuda)[0] is relu_cut
    other = InnerProductLoss(torch.ones_like(loss.target), torch.ones(2))
    assert output_bias_in_target(rep, other, cuda) == (rep, other)
    cut, shifted = output_bias_in_target(rep, loss, cuda)
    assert cut is not rep and shifted is not loss
    x = (torch.randn(2, 3, 32, 32) * 40).requires_grad_(True)
    value, g_code = shifted.value_and_grad(cut(x).detach(), weight=3.0)
    ref_value, ref_g = loss.value_and_grad(rep(x).detach(), weight=3.0)
    torch.testing.assert_close(value, ref_value, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g_code, ref_g, rtol=1e-4, atol=1e-7)
