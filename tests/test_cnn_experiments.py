"""Issue 4's experiments on CNNs: Table 5, classification consistency, the figure grids, masked
inversion from the command line, the paper's C schedule, and bf16 networks."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

from preimage.cli import main
from preimage.defaults import Settings
from preimage.evaluation import evaluate_folder
from preimage.figures import filter_layers, paper_C, spread
from preimage.models import load_model
from preimage.models.caffe import CaffeLRN
from preimage.objectives import L2Loss
from preimage.representations.cnn import ModuleCut, low_precision
from preimage.table5 import main_layers, select_layers
from preimage.visualizations import invert, mask_support, window_mask

from .conftest import SHARED, photo, tiny_cnn
from .test_caffe import TINY_PROTOTXT

FAST = ["--iterations", "4", "--fine-iterations", "1"]


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    proto = tmp_path / "tiny" / "deploy.prototxt"
    proto.parent.mkdir()
    proto.write_text(TINY_PROTOTXT)
    return proto


def run(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


# ------------------------------------------------------------------------------ layer choice


def test_main_layers_keep_block_outputs() -> None:
    names = ["conv1", "relu1", "fire2/squeeze", "fire2/relu", "fire2/concat", "pool2", "fire3/a", "fire3/concat", "fc"]
    assert main_layers(names) == ["conv1", "relu1", "fire2/concat", "pool2", "fire3/concat", "fc"]


def test_select_layers_on_a_caffe_net(tiny: Path) -> None:
    loaded = load_model(tiny)
    assert select_layers(loaded, "main") == ["conv1", "relu1", "norm1", "pool1", "fire/concat", "pool2", "ip1",
                                             "relu.ip1", "ip2"]  # no dropout, no softmax
    assert "fire/e3" in select_layers(loaded, "all")
    assert select_layers(loaded, "pool1,ip2") == ["pool1", "ip2"]
    with pytest.raises(ValueError, match="no layer 'nope'"):
        select_layers(loaded, "conv1,nope")
    # a concatenation is shown through the convolution behind its first channels (linear units)
    assert filter_layers(loaded, select_layers(loaded, "main")) == ["conv1", "fire/e1"]


def test_paper_C_schedule_of_section_5_2() -> None:
    alex = SimpleNamespace(arch="alexnet", layers=load_model("alexnet").layers)
    got = {n: paper_C(alex, n) for n in ("conv1", "relu3", "conv4", "relu4", "conv5", "relu5", "pool5", "fc8")}
    assert got == {"conv1": 300, "relu3": 300, "conv4": 100, "relu4": 100, "conv5": 20, "relu5": 20, "pool5": 1,
                   "fc8": 1}
    vgg = SimpleNamespace(arch="vgg-vd-16", layers=[f"{k}{b}_{i}" for b in range(1, 6) for i in range(1, 4)
                                                    for k in ("conv", "relu")] + ["pool5", "fc6", "fc8"])
    assert [paper_C(vgg, n) for n in ("conv4_3", "relu4_3", "conv5_1", "conv5_3", "fc6")] == [300, 300, 100, 20, 1]
    assert spread(list("abcdef"), 3) == ["c", "d", "f"] and spread(list("ab"), 5) == ["a", "b"]


@pytest.mark.skipif(not (SHARED / "models" / "squeezenet-v1.0" / "squeezenet_v1.0.caffemodel").is_file(),
                    reason="needs ../shared/models/squeezenet-v1.0 (real weights)")
def test_filter_grid_units_are_never_dead() -> None:
    """Fig. 11 on SqueezeNet maximizes fireN/conv1x1_2 before its ReLU: every unit moves above
    zero (through the rectified concat, units that start inactive had no gradient and stayed
    blank: 16 of 80 tiles)."""
    from preimage.figures import filter_grid

    loaded = load_model(SHARED / "models" / "squeezenet-v1.0" / "deploy.prototxt",
                        SHARED / "models" / "squeezenet-v1.0" / "squeezenet_v1.0.caffemodel")
    assert filter_layers(loaded, ["fire8/concat"]) == ["fire8/conv1x1_2"]
    panel = filter_grid(loaded, ["fire8/conv1x1_2"], 4, {"fire8/conv1x1_2": torch.full((64,), 100.0)},
                        Settings(iterations=30), precision="bf16")
    assert all(t["activation"] > 0 for t in panel.tiles), panel.tiles


def test_paper_C_of_other_networks_follows_the_receptive_field(tiny: Path) -> None:
    """Networks without AlexNet's / VGG's layer names get C from their receptive field: the
    thresholds reproduce the paper's AlexNet schedule, and C never grows with depth."""
    from preimage.figures import RF_BOUNDS
    from preimage.geometry import receptive_fields

    alex = load_model("alexnet")
    rf = {row[0]: row[2] for row in receptive_fields(alex.module, 227)}
    for layer in ("conv1", "relu3", "conv4", "relu4", "conv5", "relu5", "pool5", "fc8"):
        by_rf = next((C for b, C in zip(RF_BOUNDS, (300.0, 100.0, 20.0)) if rf[layer] <= b * 227), 1.0)
        assert by_rf == paper_C(alex, layer), layer
    loaded = load_model(tiny)
    layers = select_layers(loaded, "main")
    got = [paper_C(loaded, n) for n in layers]
    assert got == sorted(got, reverse=True) and got[0] == 300.0 and got[-1] == 1.0, got
    if (SHARED / "models" / "squeezenet-v1.0" / "deploy.prototxt").is_file():
        squeeze = load_model(SHARED / "models" / "squeezenet-v1.0" / "deploy.prototxt")
        assert [paper_C(squeeze, n) for n in ("fire7/concat", "fire8/concat", "fire9/concat", "pool_final")] == \
            [300.0, 100.0, 20.0, 1.0]


# ---------------------------------------------------------------------- Table 5 and consistency


def test_consistency_is_the_share_of_agreeing_top1(images: Path, tmp_path: Path) -> None:
    rep = ModuleCut(tiny_cnn(), "1", mean=(0, 0, 0), std=(1, 1, 1))
    files = sorted(images.iterdir())
    s = Settings(iterations=3, fine_iterations=0)
    same = evaluate_folder(rep, files, tmp_path / "a", s, size=32, classifier=lambda x: torch.zeros(len(x)))
    assert same["consistency"] == 1.0
    calls = {"n": 0}

    def alternate(x: torch.Tensor) -> torch.Tensor:  # reconstructions first, then originals
        calls["n"] += 1
        return torch.full((len(x),), calls["n"] % 2)

    differ = evaluate_folder(rep, files, tmp_path / "b", s, size=32, classifier=alternate)
    assert differ["consistency"] == 0.0
    side = json.loads((tmp_path / "b" / f"{files[0].stem}.json").read_text())
    assert side["top1"] != side["top1_original"]
    # resumed summaries keep the classes
    again = evaluate_folder(rep, files, tmp_path / "b", s, size=32, classifier=alternate, resume=True)
    assert again["consistency"] == 0.0 and calls["n"] == 2


def test_evaluate_folder_lets_the_engine_choose_its_batch(images: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """``batch_size`` is what is inverted and saved together; the engine optimizes each such
    chunk in its own (cache-sized) batches, recorded in the sidecars."""
    from preimage import engine

    rep = ModuleCut(tiny_cnn(), "1", mean=(0, 0, 0), std=(1, 1, 1))
    files = sorted(images.iterdir())[:3]
    monkeypatch.setattr(engine, "auto_batch_size", lambda *args, **kwargs: 2)
    evaluate_folder(rep, files, tmp_path, Settings(iterations=2, fine_iterations=0), size=32, batch_size=3)
    config = json.loads((tmp_path / f"{files[0].stem}.json").read_text())["config"]
    assert config["batch_size"] == 3 and config["engine_batch_size"] == 2


def test_table5_command_writes_table_plot_and_resumes(tiny: Path, images: Path, tmp_path: Path) -> None:
    out = tmp_path / "t5"
    args = ["table5", "--model", tiny, "--images", images, "--layers", "conv1,ip2", "--C", "1,100", *FAST,
            "--batch-size", "2", "--out", out]
    r = run(*args)
    assert r.exit_code == 0, r.output
    assert {"table5.md", "table5.json", "table5.png"} <= {p.name for p in out.iterdir()}
    table = json.loads((out / "table5.json").read_text())
    assert table["layers"] == ["conv1", "ip2"] and table["C"] == [1.0, 100.0] and table["n_images"] == 3
    for cell in table["cells"].values():
        assert 0 <= cell["consistency"] <= 1 and 0 < cell["mean_error"] < 2 and cell["n_images"] == 3
    md = (out / "table5.md").read_text()
    assert "| conv1 |" in md and "consistency C = 100" in md
    sidecars = sorted((out / "conv1" / "C100").glob("*.json"))
    stamps = {p: p.stat().st_mtime_ns for p in sidecars if p.name != "summary.json"}
    assert len(stamps) == 3
    r = run(*args)
    assert r.exit_code == 0, r.output
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())  # resumed: nothing redone
    # --report assembles the table from finished cells only, computing nothing
    r = run("table5", "--model", tiny, "--images", images, "--layers", "conv1,ip1,ip2", "--C", "100,7", "--report",
            "--out", out)
    assert r.exit_code == 0, r.output
    report = json.loads((out / "table5.json").read_text())
    assert set(report["cells"]) == {"conv1@100", "ip2@100"} and not (out / "ip1").exists()
    assert "| ip1 | – | – |" in (out / "table5.md").read_text()
    assert "unknown" in run("table5", "--model", "resnet-7", "--images", images, "--out", out).output


# ---------------------------------------------------------------------------------- figures


def test_figures_command_writes_every_grid(tiny: Path, images: Path, tmp_path: Path) -> None:
    out = tmp_path / "figs"
    r = run("figures", "--model", tiny, "--images", images, "--limit", "2", "--stats-limit", "3", "--filters", "2",
            "--seeds", "0,1", "--window", "1", "--classes", "0,3", *FAST, "--out", out)
    assert r.exit_code == 0, r.output
    for stem in ("fig05-layers", "fig08-diversity", "fig09-window", "fig10-streams", "fig11-filters",
                 "fig13-classes", "fig14-caricatures"):
        assert (out / f"{stem}.png").is_file() and (out / f"{stem}.json").is_file(), stem
    fig5 = json.loads((out / "fig05-layers.json").read_text())
    assert [t["layer"] for t in fig5["tiles"]] == select_layers(load_model(tiny), "main")
    boxes = {t["layer"]: t["box"] for t in json.loads((out / "fig09-window.json").read_text())["tiles"]}
    # the receptive field of a 1x1 window grows with depth: conv1's box lies inside pool1's
    a, b = boxes["conv1"], boxes["pool1"]
    assert b[0] <= a[0] and b[1] <= a[1] and b[2] >= a[2] and b[3] >= a[3] and (b[2] - b[0]) > (a[2] - a[0])
    assert a[2] - a[0] + 1 == 5  # conv1: 5x5 kernel
    filters = json.loads((out / "fig11-filters.json").read_text())["tiles"]
    assert {(t["layer"], t["unit"]) for t in filters} == {("conv1", 0), ("conv1", 1), ("fire/e1", 0), ("fire/e1", 1)}
    classes = json.loads((out / "fig13-classes.json").read_text())["tiles"]
    assert [(t["layer"], t["class"]) for t in classes] == [("ip2", 0), ("ip2", 3)]
    # figures already made are kept (an interrupted run continues)
    stamp = (out / "fig05-layers.png").stat().st_mtime_ns
    r = run("figures", "--model", tiny, "--images", images, "--figures", "5", *FAST, "--out", out)
    assert r.exit_code == 0 and (out / "fig05-layers.png").stat().st_mtime_ns == stamp
    assert "unknown figure" in run("figures", "--model", tiny, "--figures", "6", "--out", out).output
    r = run("figures", "--model", tiny, "--images", images, "--figures", "5", "--C", "7", "--overwrite", *FAST,
            "--out", out)
    assert r.exit_code == 0, r.output
    assert {t["C"] for t in json.loads((out / "fig05-layers.json").read_text())["tiles"]} == {7.0}


def test_invert_window_and_channels_from_the_cli(tiny: Path, images: Path, tmp_path: Path) -> None:
    out = tmp_path / "masked"
    img = images / "astronaut.png"
    r = run("invert", img, "--model", tiny, "--layer", "pool1", "--window", "1", "--size", "29", *FAST, "--out", out)
    assert r.exit_code == 0, r.output
    side = json.loads((out / "astronaut.tiny-pool1.invert.window1.seed0.json").read_text())
    box = side["config"]["receptive_box"]
    assert (out / "astronaut.tiny-pool1.invert.window1.seed0.box.png").is_file()
    rep = load_model(tiny).representation("pool1")
    shape = rep(torch.zeros(1, 3, 29, 29)).shape[1:]
    assert tuple(box) == mask_support(rep, (29, 29), window_mask(shape, 1))
    assert 0 < box[2] - box[0] < 28  # a window's field, not the whole image
    r = run("invert", img, "--model", tiny, "--layer", "conv1", "--channels", "0-3", "--size", "29", *FAST,
            "--out", out)
    assert r.exit_code == 0, r.output
    assert (out / "astronaut.tiny-conv1.invert.ch0-3.seed0.png").is_file()
    bad = run("invert", img, "--model", tiny, "--layer", "conv1", "--channels", "0-99", "--size", "29", *FAST,
              "--out", out)
    assert bad.exit_code == 2 and "out of range" in bad.output


# ------------------------------------------------------------------------------------- bf16


def test_squared_distance_matches_reference_and_gradcheck() -> None:
    g = torch.Generator().manual_seed(0)
    target = torch.randn(3, 4, 5, 6, generator=g, dtype=torch.float64)
    loss = L2Loss(target)
    code = torch.randn(3, 4, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    ref = (code - target).pow(2).flatten(1).sum(1) / target.pow(2).flatten(1).sum(1)
    torch.testing.assert_close(loss(code).double(), ref)
    torch.autograd.gradcheck(lambda c: L2Loss(target)(c), (code,))
    # channels-last codes (a bf16 network's output layout) give the same values and gradients
    cl = code.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    torch.testing.assert_close(loss(cl).double(), ref)
    loss(cl).sum().backward()
    ref.sum().backward()
    assert code.grad is not None and cl.grad is not None
    torch.testing.assert_close(cl.grad, code.grad)
    # a bf16 code: value within bf16 rounding, gradient in the code's dtype
    b = code.detach().float().bfloat16().requires_grad_(True)
    L = L2Loss(target.float())
    torch.testing.assert_close(L(b).double(), ref.detach(), rtol=2e-2, atol=1e-3)
    L(b).sum().backward()
    assert b.grad is not None and b.grad.dtype == torch.bfloat16


def test_bf16_copy_gives_close_codes_and_fp32_gradients() -> None:
    model = tiny_cnn()
    fast = low_precision(model)
    assert next(model.parameters()).dtype == torch.float32  # the original is untouched
    a = ModuleCut(model, "4", mean=(0, 0, 0), std=(1, 1, 1))
    b = ModuleCut(fast, "4", mean=(0, 0, 0), std=(1, 1, 1), channels_last=True)
    x = (torch.rand(2, 3, 32, 32) * 255 - 128).requires_grad_(True)
    ya, yb = a(x), b(x)
    assert yb.dtype == torch.bfloat16
    assert float((ya - yb.float()).detach().norm() / ya.detach().norm()) < 2e-2
    (ga,) = torch.autograd.grad(ya.square().sum(), x)
    (gb,) = torch.autograd.grad(yb.float().square().sum(), x)
    assert gb.dtype == torch.float32
    assert float(torch.nn.functional.cosine_similarity(ga.flatten(), gb.flatten(), dim=0)) > 0.99


def test_image_to_bf16_channels_last_is_the_one_call_conversion() -> None:
    """The CPU's two-step conversion of the image (dtype, then layout) gives the bits, the layout
    and the gradient of ``x.to(bf16, memory_format=channels_last)``, on a cropped view too."""
    from preimage.representations.cnn import _ToCompute

    torch.manual_seed(0)
    canvas = (torch.randn(3, 3, 21, 23) * 60).requires_grad_(True)
    for x in (canvas, canvas[:, :, 1:20, 2:22]):
        grad = torch.randn(x.shape).bfloat16().contiguous(memory_format=torch.channels_last)
        fast = _ToCompute.apply(x, torch.bfloat16)
        plain = x.to(torch.bfloat16, memory_format=torch.channels_last)
        assert torch.equal(fast, plain) and fast.is_contiguous(memory_format=torch.channels_last)
        (g_fast,) = torch.autograd.grad(fast, canvas, grad)
        (g_plain,) = torch.autograd.grad(plain, canvas, grad)
        assert g_fast.dtype == torch.float32 and torch.equal(g_fast, g_plain)


def test_lrn_banded_convolution_in_bf16() -> None:
    lrn = CaffeLRN(5, 1e-4 * 5, 0.75, 1.0)
    x = torch.randn(2, 16, 7, 7) * 30
    y = lrn(x)
    yb = lrn(x.bfloat16())
    assert yb.dtype == torch.bfloat16
    assert float((y - yb.float()).norm() / y.norm()) < 1e-2
    torch.autograd.gradcheck(CaffeLRN(3, 0.5, 0.75, 2.0), (torch.randn(1, 6, 3, 3, dtype=torch.float64,
                                                                      requires_grad=True),))


def test_bf16_inversion_costs_no_quality_on_squeezenet() -> None:
    sq = SHARED / "models" / "squeezenet-v1.0"
    if not sq.is_dir():
        pytest.skip(f"SqueezeNet not found at {sq}")
    loaded = load_model(sq / "deploy.prototxt", sq / "squeezenet_v1.0.caffemodel")
    x = photo("astronaut", 67)[None]
    s = Settings(C=100, iterations=60, fine_iterations=10)
    judge = loaded.representation("fire2/concat")
    errors = {}
    for precision in ("fp32", "bf16"):
        r = invert(loaded.representation("fire2/concat", precision), x, settings=s)
        errors[precision] = float(judge(r.x).float().sub(judge(judge.preprocess(x))).norm()
                                  / judge(judge.preprocess(x)).norm())
    assert errors["fp32"] < 0.6
    assert errors["bf16"] < errors["fp32"] + 0.02, errors


def test_auto_precision_follows_the_hardware() -> None:
    from preimage.representations.base import RepresentationError
    from preimage.representations.cnn import fast_bf16, resolve_precision

    assert resolve_precision("auto") == ("bf16" if fast_bf16() else "fp32")
    assert resolve_precision("fp32") == "fp32" and resolve_precision("bf16") == "bf16"
    with pytest.raises(RepresentationError, match="unknown precision"):
        resolve_precision("fp8")
    rep = ModuleCut(low_precision(tiny_cnn()), "1", mean=(0, 0, 0), std=(1, 1, 1), channels_last=True)
    assert rep.config()["precision"] == "bfloat16"
