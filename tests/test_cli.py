"""The command line: outputs, sidecars, the features layout, evaluate's JSON, and bad input."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from preimage.cli import main

from .conftest import photo

FAST = ["--iterations", "15", "--fine-iterations", "5"]


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def files(folder: Path) -> set[str]:
    return {p.name for p in folder.rglob("*") if p.is_file()}


def test_invert_writes_png_and_sidecar_per_seed(images, tmp_path):
    out = tmp_path / "out"
    r = run("invert", images / "coffee.png", "--rep", "hog", "--seeds", "0,1", "--size", "48", "--out", out, *FAST)
    assert r.exit_code == 0, r.output
    assert "reconstruction error" in r.output
    for s in (0, 1):
        png = out / f"coffee.hog.invert.seed{s}.png"
        assert Image.open(png).size == (48, 48)
        side = json.loads(png.with_suffix(".json").read_text())
        assert side["seed"] == s and 0 < side["error"] < 1.5
        assert side["config"]["settings"]["C"] == 100 and side["config"]["representation"] == "hog"
        assert set(side["final_energies"]) == {"loss", "bounded_range", "tv", "total"}
        assert side["config"]["versions"]["torch"] == torch.__version__
    assert (out / "coffee.hog.invert.grid.png").exists()
    # nothing is overwritten without --overwrite, and the refusal leaves the files as they were
    before = {p: p.stat().st_mtime_ns for p in out.iterdir()}
    r = run("invert", images / "coffee.png", "--rep", "hog", "--size", "48", "--out", out, *FAST)
    assert r.exit_code == 2 and "exists" in r.output and "use --overwrite" in r.output
    assert {p: p.stat().st_mtime_ns for p in out.iterdir()} == before
    r = run("invert", images / "coffee.png", "--rep", "hog", "--size", "48", "--out", out, "--overwrite", *FAST)
    assert r.exit_code == 0


def test_default_run_inverts_the_bundled_sample(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = run("invert", *FAST, "--size", "64")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "preimage-out" / "astronaut.png").exists()
    assert (tmp_path / "preimage-out" / "astronaut.hog.invert.seed0.png").exists()
    assert "reconstruction error" in r.output


@pytest.mark.parametrize("rep,dims", [("hog", 31), ("hogb", 31)])
def test_features_vlfeat_layout(images, tmp_path, rep, dims):
    from preimage.representations import make_representation

    out = tmp_path / "f.npy"
    r = run("features", images / "chelsea.png", "--rep", rep, "--gray", "--out", out)
    assert r.exit_code == 0, r.output
    arr = np.load(out)
    assert arr.dtype == np.float32 and arr.shape == (6, 6, dims)
    gray = np.asarray(Image.open(images / "chelsea.png").convert("L"), dtype=np.float32)
    want = make_representation(rep)(torch.from_numpy(gray)[None, None])[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(arr, want, atol=1e-4)


def test_evaluate_json_contract(images, tmp_path):
    out = tmp_path / "res" / "hog.json"
    r = run("evaluate", "--rep", "hog", "--images", images, "--limit", "2", "--size", "48", "--out", out, *FAST)
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    for key in ("rep", "n_images", "mean_error", "std_error", "sem95", "seconds_per_image", "per_image"):
        assert key in res
    assert res["rep"] == "hog" and res["n_images"] == 2
    assert [row["image"] for row in res["per_image"]] == ["astronaut.png", "chelsea.png"]
    assert all(0 < row["error"] < 1.5 for row in res["per_image"])
    assert (tmp_path / "res" / "hog" / "astronaut.png").exists()
    assert (tmp_path / "res" / "hog" / "astronaut.json").exists()
    # rerun with --resume reuses the reconstructions
    r = run("evaluate", "--rep", "hog", "--images", images, "--limit", "2", "--size", "48", "--out", out,
            "--resume", "--iterations", "0", "--fine-iterations", "0")
    assert r.exit_code == 0, r.output
    assert json.loads(out.read_text())["per_image"] == res["per_image"]


def one_line_error(r) -> str:
    assert r.exit_code == 2, r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in r.output, r.output
    return lines[0]


def test_bad_input_is_one_line_exit_2_and_leaves_nothing(images, tmp_path):
    out = tmp_path / "o"
    assert "image not found" in one_line_error(run("invert", tmp_path / "missing.jpg", "--rep", "hog", "--out", out))
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"not a jpeg at all")
    assert "cannot read image" in one_line_error(run("invert", corrupt, "--rep", "hog", "--out", out))
    assert "Invalid value" in one_line_error(run("invert", images / "coffee.png", "--rep", "sift", "--out", out))
    blank = tmp_path / "blank.png"
    Image.new("L", (48, 48), 128).save(blank)
    assert "zero norm" in one_line_error(run("invert", blank, "--rep", "hog", "--out", out, *FAST))
    assert not out.exists() or files(out) == set()
    assert "unknown layer" in one_line_error(
        run("invert", images / "coffee.png", "--module", "torch.nn:Identity", "--layer", "conv9", "--out", out))


def test_unwritable_output_is_a_clear_error(images, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    line = one_line_error(run("invert", images / "coffee.png", "--rep", "hog", "--out", blocker / "sub", *FAST))
    assert "preimage: error:" in line


def test_sweep_writes_a_row_and_errors(images, tmp_path):
    out = tmp_path / "fig2_C.png"
    r = run("sweep", images / "chelsea.png", "--rep", "hog", "--param", "C", "--values", "1,100", "--size", "48",
            "--out", out, *FAST)
    assert r.exit_code == 0, r.output
    assert Image.open(out).size[0] > 3 * 48  # original + two reconstructions
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["values"] == [1.0, 100.0] and len(meta["errors"]) == 2
    assert meta["errors"][1] < meta["errors"][0]  # a stronger data term fits the code better
    assert "cannot sweep" in one_line_error(run("sweep", images / "chelsea.png", "--rep", "hog", "--param", "gamma",
                                                "--out", tmp_path / "x.png"))


def test_show_hog(images, tmp_path):
    out = tmp_path / "g.png"
    r = run("show-hog", images / "coffee.png", "--out", out)
    assert r.exit_code == 0, r.output
    assert Image.open(out).size[1] == 6 * 15 + 4


def test_layers_lists_geometry_of_table1():
    r = run("layers", "--model", "alexnet", "--json")
    assert r.exit_code == 0, r.output
    rows = {row["layer"]: row for row in json.loads(r.output)}
    assert rows["conv5"]["receptive_field"] == 163 and rows["conv5"]["stride"] == 16  # Table 1
    assert rows["pool5"]["shape"] == [256, 6, 6]
    assert "has no layer" in one_line_error(run("invert", "--model", "alexnet", "--layer", "conv9", *FAST))


def test_classify_squeezenet_on_real_photos(imagenet_dir):
    from .conftest import SHARED

    sq = SHARED / "models" / "squeezenet-v1.0"
    if not sq.is_dir():
        pytest.skip(f"SqueezeNet not found at {sq}")
    imgs = [imagenet_dir / "n01440764_tench.JPEG"]
    r = run("classify", *imgs, "--model", sq / "deploy.prototxt", "--weights", sq / "squeezenet_v1.0.caffemodel",
            "--labels", SHARED / "labels" / "synset_words.txt", "--json")
    assert r.exit_code == 0, r.output
    top = json.loads(r.output)[0]["top"]
    assert top[0]["label"].startswith("n01440764") and top[0]["probability"] > 0.5


def test_train_hoggle_and_evaluate_with_it(images, tmp_path):
    model = tmp_path / "hg.npz"
    r = run("train-hoggle", "--images", images, "--atoms", "16", "--patches", "400", "--out", model)
    assert r.exit_code == 0, r.output
    out = tmp_path / "hg.json"
    r = run("evaluate", "--rep", "hog", "--method", "hoggle", "--hoggle-model", model, "--images", images,
            "--size", "48", "--out", out)
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert res["method"] == "hoggle" and res["n_images"] == 3
    assert all(0 < row["error"] < 1.2 for row in res["per_image"])
    assert "needs --hoggle-model" in one_line_error(
        run("evaluate", "--rep", "hog", "--method", "hoggle", "--images", images, "--out", tmp_path / "z.json"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when CUDA is absent")
def test_cuda_without_gpu_is_a_clear_error(images, tmp_path):
    line = one_line_error(run("invert", images / "coffee.png", "--rep", "hog", "--device", "cuda", "--out", tmp_path))
    assert "CUDA is not available" in line


def test_features_dsift_is_vl_dsift_layout(images, tmp_path):
    cyvlfeat_sift = pytest.importorskip("cyvlfeat.sift", reason="cyvlfeat (VLFeat reference) not installed")
    out = tmp_path / "d.npy"
    r = run("features", images / "coffee.png", "--rep", "dsift", "--bin-size", "8", "--step", "4", "--out", out)
    assert r.exit_code == 0, r.output
    arr = np.load(out)
    gray = np.asarray(Image.open(images / "coffee.png").convert("L"), dtype=np.float32)
    _, want = cyvlfeat_sift.dsift(gray, step=4, size=8, float_descriptors=True)
    assert arr.dtype == np.float32 and arr.shape == want.shape
    np.testing.assert_allclose(arr, want, atol=2e-4)


def test_table4_runs_every_method_and_resumes(images, tmp_path):
    from preimage.hoggle import train_hoggle

    train_dir = tmp_path / "train"
    train_dir.mkdir()
    for name in ("rocket", "camera"):
        Image.fromarray((photo(name, 96).permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(train_dir / f"{name}.png")
    model = tmp_path / "hg.npz"
    train_hoggle(sorted(train_dir.iterdir()), n_atoms=16, n_patches=300, image_size=96).save(model)
    out = tmp_path / "t4"
    args = ["table4", "--images", images, "--limit", "2", "--size", "48", "--hoggle-model", model,
            "--out", out, "--iterations", "10", "--fine-iterations", "2"]
    r = run(*args)
    assert r.exit_code == 0, r.output
    table = (out / "table4.md").read_text()
    for m in ("hoggle", "hog", "hogb", "dsift"):
        assert f"| {m} |" in table
        assert json.loads((out / f"{m}.json").read_text())["n_images"] == 2
    assert Image.open(out / "figure4.png").size[0] > 5 * 48
    # a rerun reuses every reconstruction: nothing is rewritten
    stamps = {p: p.stat().st_mtime_ns for p in (out / "hog").iterdir()}
    r = run(*args)
    assert r.exit_code == 0, r.output
    assert {p: p.stat().st_mtime_ns for p in (out / "hog").iterdir()} == stamps


def test_stats_then_maximize_with_M(images, tmp_path):
    from .conftest import SHARED

    sq = SHARED / "models" / "squeezenet-v1.0"
    if not sq.is_dir():
        pytest.skip(f"SqueezeNet not found at {sq}")
    model = ["--model", sq / "deploy.prototxt", "--weights", sq / "squeezenet_v1.0.caffemodel"]
    out = tmp_path / "stats.json"
    r = run("stats", *model, "--layer", "conv1,fire2/concat", "--images", images, "--out", out)
    assert r.exit_code == 0, r.output
    st = json.loads(out.read_text())
    M = st["layers"]["conv1"]["max"]
    assert st["n_images"] == 3 and len(M) == 96 and max(M) > 0
    assert st["layers"]["conv1"]["receptive_field"] == 7
    # activation maximization with that M raises the unit above the dataset maximum
    r = run("maximize", *model, "--layer", "conv1", "--units", "5", "--stats", out, "--size", "31",
            "--iterations", "60", "--out", tmp_path / "am")
    assert r.exit_code == 0, r.output
    side = json.loads((tmp_path / "am" / "maximize.squeezenet_v1.0-conv1.unit5.seed0.json").read_text())
    assert side["activation"] > M[5]
    assert "no statistics for layer" in one_line_error(
        run("maximize", *model, "--layer", "pool1", "--stats", out, "--out", tmp_path / "am2"))


def test_maximize_warns_about_units_that_never_fire(tmp_path):
    """A rectified unit inactive on the random start has no gradient: maximize says so (and marks
    it in its JSON) instead of leaving a blank image unexplained; a live unit gets no warning."""
    factory = tmp_path / "net.py"
    factory.write_text(
        "import torch\n"
        "def make():\n"
        "    conv = torch.nn.Conv2d(3, 2, 3)\n"
        "    with torch.no_grad():\n"
        "        conv.bias[0] = -1e9  # unit 0 never fires\n"
        "    return torch.nn.Sequential(conv, torch.nn.ReLU())\n")
    out = tmp_path / "am"
    r = run("maximize", "--module", f"{factory}:make", "--layer", "1", "--units", "0,1", "--size", "16",
            "--iterations", "20", "--out", out)
    assert r.exit_code == 0, r.output
    warning = [line for line in r.output.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "unit(s) 0 (seed 0) stayed at activation 0" in warning[0]
    sides = [json.loads(p.read_text()) for p in sorted(out.glob("maximize.*.unit*.seed0.json"))]
    assert [(s["unit"], s["inactive"]) for s in sides] == [(0, True), (1, False)]
    assert sides[1]["activation"] > 0


def test_outputs_get_the_usual_file_mode(tmp_path):
    import os

    from preimage.io import save_json

    save_json({"a": 1}, tmp_path / "x.json")
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == 0o666 & ~mask


def test_cuda_graphs_flag_sets_the_process_default_and_is_ignored_on_the_cpu(images, tmp_path, monkeypatch):
    """--cuda-graphs / --no-cuda-graphs set graphs.set_default for the run (no flag: back to
    PREIMAGE_CUDA_GRAPHS and the batch size); on the CPU the inversions are the same."""
    from preimage import graphs

    monkeypatch.setattr(graphs, "_default", None)
    errors = []
    for flag, expected in (("--no-cuda-graphs", False), ("--cuda-graphs", True), (None, None)):
        out = tmp_path / str(flag)
        r = run("invert", images / "coffee.png", "--rep", "hog", "--size", "40", "--out", out, *FAST,
                *([flag] if flag else []))
        assert r.exit_code == 0, r.output
        assert graphs._default is expected
        errors.append(json.loads((out / "coffee.hog.invert.seed0.json").read_text())["error"])
    assert errors[0] == errors[1] == errors[2]
    for command in ("table4", "table5", "figures", "maximize", "caricature"):
        assert "--cuda-graphs / --no-cuda-graphs" in run(command, "--help").output
