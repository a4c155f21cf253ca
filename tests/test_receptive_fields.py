"""Receptive fields and strides (preimage.geometry) against the paper's Tables 1-3.

The tables are transcribed below (layer, kernel size, r.f. size, r.f. stride, dim.); a separate
test parses /work/shared/paper.txt and checks the transcription.  Networks are built on the
``meta`` device: the geometry needs the structure only.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from preimage.geometry import GeometryError, LayerInfo, layer_geometry, minimum_input_size, receptive_fields
from preimage.models.caffe import CaffeLRN, CaffePooling
from preimage.models.networks import meta_build
from preimage.representations.base import Geometry

SHARED = Path(__file__).resolve().parents[2] / "shared"
PAPER = SHARED / "paper.txt"
SQUEEZENET = SHARED / "models" / "squeezenet-v1.0"

Row = tuple[str, int, int, int, int]  # name, kernel size, r.f. size, r.f. stride, dim.

# Table 1: AlexNet structure
TABLE_1: list[Row] = [
    ("conv1", 11, 11, 4, 96),
    ("relu1", 1, 11, 4, 96),
    ("norm1", 1, 11, 4, 96),
    ("pool1", 3, 19, 8, 96),
    ("conv2", 5, 51, 8, 256),
    ("relu2", 1, 51, 8, 256),
    ("norm2", 1, 51, 8, 256),
    ("pool2", 3, 67, 16, 256),
    ("conv3", 3, 99, 16, 384),
    ("relu3", 1, 99, 16, 384),
    ("conv4", 3, 131, 16, 384),
    ("relu4", 1, 131, 16, 384),
    ("conv5", 3, 163, 16, 256),
    ("relu5", 1, 163, 16, 256),
    ("pool5", 3, 195, 32, 256),
    ("fc6", 6, 355, 32, 4096),
    ("relu6", 1, 355, 32, 4096),
    ("fc7", 1, 355, 32, 4096),
    ("relu7", 1, 355, 32, 4096),
    ("fc8", 1, 355, 32, 1000),
    ("prob", 1, 355, 32, 1000),
]

# Table 2: VGG-M structure
TABLE_2: list[Row] = [
    ("conv1", 7, 7, 2, 96),
    ("relu1", 1, 7, 2, 96),
    ("norm1", 1, 7, 2, 96),
    ("pool1", 3, 11, 4, 96),
    ("conv2", 5, 27, 8, 256),
    ("relu2", 1, 27, 8, 256),
    ("norm2", 1, 27, 8, 256),
    ("pool2", 3, 43, 16, 256),
    ("conv3", 3, 75, 16, 512),
    ("relu3", 1, 75, 16, 512),
    ("conv4", 3, 107, 16, 512),
    ("relu4", 1, 107, 16, 512),
    ("conv5", 3, 139, 16, 512),
    ("relu5", 1, 139, 16, 512),
    ("pool5", 3, 171, 32, 512),
    ("fc6", 6, 331, 32, 4096),
    ("relu6", 1, 331, 32, 4096),
    ("fc7", 1, 331, 32, 4096),
    ("relu7", 1, 331, 32, 4096),
    ("fc8", 1, 331, 32, 1000),
    ("prob", 1, 331, 32, 1000),
]

# Table 3: VGG-VD structure (the paper prints conv1'1 for conv1_1)
TABLE_3: list[Row] = [
    ("conv1_1", 3, 3, 1, 64),
    ("relu1_1", 1, 3, 1, 64),
    ("conv1_2", 3, 5, 1, 64),
    ("relu1_2", 1, 5, 1, 64),
    ("pool1", 2, 6, 2, 64),
    ("conv2_1", 3, 10, 2, 128),
    ("relu2_1", 1, 10, 2, 128),
    ("conv2_2", 3, 14, 2, 128),
    ("relu2_2", 1, 14, 2, 128),
    ("pool2", 2, 16, 4, 128),
    ("conv3_1", 3, 24, 4, 256),
    ("relu3_1", 1, 24, 4, 256),
    ("conv3_2", 3, 32, 4, 256),
    ("relu3_2", 1, 32, 4, 256),
    ("conv3_3", 3, 40, 4, 256),
    ("relu3_3", 1, 40, 4, 256),
    ("pool3", 2, 44, 8, 256),
    ("conv4_1", 3, 60, 8, 512),
    ("relu4_1", 1, 60, 8, 512),
    ("conv4_2", 3, 76, 8, 512),
    ("relu4_2", 1, 76, 8, 512),
    ("conv4_3", 3, 92, 8, 512),
    ("relu4_3", 1, 92, 8, 512),
    ("pool4", 2, 100, 16, 512),
    ("conv5_1", 3, 132, 16, 512),
    ("relu5_1", 1, 132, 16, 512),
    ("conv5_2", 3, 164, 16, 512),
    ("relu5_2", 1, 164, 16, 512),
    ("conv5_3", 3, 196, 16, 512),
    ("relu5_3", 1, 196, 16, 512),
    ("pool5", 2, 212, 32, 512),
    ("fc6", 7, 404, 32, 4096),
    ("relu6", 1, 404, 32, 4096),
    ("fc7", 1, 404, 32, 4096),
    ("relu7", 1, 404, 32, 4096),
    ("fc8", 1, 404, 32, 1000),
    ("prob", 1, 404, 32, 1000),
]

TABLES = {"alexnet": TABLE_1, "vgg-m": TABLE_2, "vgg-vd-16": TABLE_3}


def _kernel(module: nn.Module) -> int:
    if isinstance(module, nn.Conv2d):
        assert module.kernel_size[0] == module.kernel_size[1]
        return int(module.kernel_size[0])
    if isinstance(module, CaffePooling):
        return int(module.kernel[0])
    return 1


@pytest.mark.parametrize("arch", ["alexnet", "vgg-m", "vgg-vd-16"])
def test_every_layer_matches_the_papers_table(arch: str) -> None:
    net = meta_build(arch)
    rows = receptive_fields(net)
    table = TABLES[arch]
    assert [r.name for r in rows] == [t[0] for t in table] == net.layer_names()
    for row, (name, kernel, rf, stride, dim) in zip(rows, table):
        assert (row.receptive_field, row.stride) == (rf, stride), f"{arch} {name}"
        assert row.shape[0] == dim, f"{arch} {name}"
        assert _kernel(net.layer(name)) == kernel, f"{arch} {name}"
    # the nominal input gives 1x1 class scores
    assert rows[-1].shape == (1000, 1, 1)


def test_receptive_fields_returns_named_tuples_with_output_shapes() -> None:
    rows = receptive_fields(meta_build("alexnet"), 227)
    assert isinstance(rows[0], LayerInfo)
    name, shape, rf, stride = rows[0]
    assert (name, shape, rf, stride) == ("conv1", (96, 55, 55), 11, 4)
    shapes = {r.name: r.shape for r in rows}
    assert shapes["pool1"] == (96, 27, 27) and shapes["pool2"] == (256, 13, 13) and shapes["pool5"] == (256, 6, 6)
    vgg = {r.name: r.shape for r in receptive_fields(meta_build("vgg-m"), 224)}
    assert vgg["conv1"] == (96, 109, 109) and vgg["pool1"] == (96, 54, 54) and vgg["conv2"] == (256, 26, 26)
    assert vgg["pool2"] == (256, 13, 13) and vgg["pool5"] == (512, 6, 6)
    deep = {r.name: r.shape for r in receptive_fields(meta_build("vgg-vd-16"), 224)}
    assert deep["pool5"] == (512, 7, 7) and deep["conv3_3"] == (256, 56, 56)


def test_caffenet_pools_before_normalizing() -> None:
    """CaffeNet: Table 1 per layer name, except that norm1/norm2 follow (and equal) pool1/pool2."""
    net = meta_build("caffenet")
    names = net.layer_names()
    assert names.index("pool1") == names.index("norm1") - 1 and names.index("pool2") == names.index("norm2") - 1
    rows = {r.name: r for r in receptive_fields(net)}
    expected = {t[0]: t for t in TABLE_1}
    for name, _kernel_size, rf, stride, dim in expected.values():
        if name in ("norm1", "norm2"):
            pool = expected[name.replace("norm", "pool")]
            rf, stride = pool[2], pool[3]
        assert (rows[name].receptive_field, rows[name].stride, rows[name].shape[0]) == (rf, stride, dim), name


def test_torchvision_alexnet_has_table_1_geometry_for_its_layers() -> None:
    rows = receptive_fields(meta_build("torchvision-alexnet"), 224)
    table = {t[0]: t for t in TABLE_1}
    assert "norm1" not in [r.name for r in rows]
    for r in rows:
        assert (r.receptive_field, r.stride) == (table[r.name][2], table[r.name][3]), r.name
    assert rows[-1].shape == (1000, 1, 1)


def test_geometry_is_independent_of_input_size_and_rounding() -> None:
    for arch, table in TABLES.items():
        for ceil_mode in (True, False):
            net = meta_build(arch, ceil_mode=ceil_mode)
            for size in (256, 300):
                got = [(r.name, r.receptive_field, r.stride) for r in receptive_fields(net, size)]
                assert got == [(t[0], t[2], t[3]) for t in table]


def test_larger_inputs_give_score_maps_and_small_inputs_fail_clearly() -> None:
    rows = receptive_fields(meta_build("alexnet"), 291)  # 64 more pixels = 2 more fc6 locations
    assert rows[-1].shape == (1000, 3, 3)
    with pytest.raises(GeometryError, match="fc6.*too small"):
        receptive_fields(meta_build("vgg-vd-16"), 180)
    assert minimum_input_size(meta_build("alexnet")) == 199  # Caffe's ceil pooling
    assert minimum_input_size(meta_build("alexnet", ceil_mode=False)) == 227  # MatConvNet's floor
    assert minimum_input_size(meta_build("vgg-vd-16", ceil_mode=False)) == 224


def test_layer_geometry_and_generic_sequential_models() -> None:
    assert layer_geometry(meta_build("vgg-m"), "conv5") == Geometry(stride=16, receptive_field=139)
    # a torchvision-style module (children in order, nested Sequentials, flatten + Linear)
    tv = nn.Module()
    tv.features = nn.Sequential(nn.Conv2d(3, 8, 11, 4, 2), nn.ReLU(), nn.MaxPool2d(3, 2), nn.Conv2d(8, 8, 5, padding=2))
    tv.avgpool = nn.AdaptiveAvgPool2d((6, 6))
    tv.classifier = nn.Sequential(nn.Flatten(), nn.Linear(8 * 36, 10))
    rows = {r.name: r for r in receptive_fields(tv, 224)}
    assert (rows["features.2"].receptive_field, rows["features.2"].stride) == (19, 8)
    assert (rows["features.3"].receptive_field, rows["features.3"].stride) == (51, 8)
    assert rows["avgpool"].shape == (8, 6, 6)
    assert rows["classifier.1"].shape == (10,)
    # a non-sequential container is refused rather than mis-measured
    block = nn.Module()
    block.body = nn.Module()
    block.body.conv = nn.Conv2d(3, 3, 3)
    with pytest.raises(GeometryError, match="not sequential"):
        receptive_fields(block, 32)
    with pytest.raises(GeometryError, match="cannot compute"):
        receptive_fields(nn.Sequential(nn.Conv2d(3, 3, 3), nn.Upsample(scale_factor=2)), 32)


def test_analytic_geometry_agrees_with_probing_a_real_network() -> None:
    """The gradient-support probe of ModuleCut measures the same numbers on random AlexNet weights."""
    from preimage.representations.cnn import ModuleCut, probe_geometry

    torch.manual_seed(0)
    net = meta_build("alexnet").to_empty(device="cpu")
    for name in ("conv1", "conv2", "conv3"):  # the layers the cut runs
        conv = net.layer(name)
        assert isinstance(conv, nn.Conv2d)
        nn.init.normal_(conv.weight, std=0.01)
        nn.init.constant_(conv.bias, 0.1)  # positive biases keep the ReLUs open
    rep = ModuleCut(net, "conv3", geometry=Geometry(1, 1))
    assert probe_geometry(rep, 160) == layer_geometry(net, "conv3") == Geometry(stride=16, receptive_field=99)


def test_squeezenet_dag_geometry() -> None:
    if not (SQUEEZENET / "deploy.prototxt").is_file():
        pytest.skip(f"SqueezeNet prototxt not found at {SQUEEZENET}")
    from preimage.models import load_caffe

    net = load_caffe(SQUEEZENET / "deploy.prototxt")
    rows = {r.name: r for r in receptive_fields(net)}
    # conv1 7/2 -> pool1 3/2 -> fire2-4 (3x3 expand) -> pool4 -> fire5-8 -> pool8 -> fire9
    assert (rows["conv1"].receptive_field, rows["conv1"].stride) == (7, 2)
    assert (rows["fire2/concat"].receptive_field, rows["fire2/concat"].stride) == (19, 4)
    assert (rows["fire9/concat"].receptive_field, rows["fire9/concat"].stride) == (155, 16)
    assert rows["fire9/concat"].shape == (512, 13, 13)
    assert rows["pool_final"].shape == (1000, 1, 1)
    assert layer_geometry(net, "fire9_concat") == Geometry(16, 155)  # the module name works too


# ---------------------------------------------------------------------- the transcription


def _parse_tables(text: str) -> list[dict[str, tuple[int, int, int, int]]]:
    """Tables 1-3 of paper.txt: per table, layer name -> (kernel, r.f. size, stride, dim)."""
    tables: list[dict[str, tuple[int, int, int, int]]] = []
    lines = text.splitlines()
    i = 0
    current: dict[str, tuple[int, int, int, int]] | None = None
    while i < len(lines):
        cells = [c for c in lines[i].split("\t") if c.strip()]
        if cells and cells[0] == "layer name":
            indices = [int(c) for c in cells[1:]]
            if indices[0] == 0:
                current = {}
                tables.append(current)
            names = [c for c in lines[i + 1].split("\t") if c.strip()]
            names = names[-len(indices) :]
            rows = {}
            for line in lines[i + 2 : i + 6]:
                parts = [c for c in line.split("\t") if c.strip()]
                rows[parts[0]] = parts[-len(indices) :]
            assert current is not None
            for j, (index, name) in enumerate(zip(indices, names)):
                if index == 0:
                    continue
                r = {"".join(k.split()): v[j] for k, v in rows.items()}
                current[name.replace("'", "_")] = (
                    int(r["ker.size"]),
                    int(r.get("r.f.size", r.get("r.f.field"))),
                    int(r["r.f.stride"]),
                    int(r["dim."]),
                )
            i += 6
        else:
            i += 1
    return tables


def test_transcribed_tables_match_paper_txt() -> None:
    if not PAPER.is_file():
        pytest.skip(f"paper text not found at {PAPER}")
    parsed = _parse_tables(PAPER.read_text(encoding="utf-8"))
    assert len(parsed) == 3
    for got, table in zip(parsed, (TABLE_1, TABLE_2, TABLE_3)):
        assert list(got) == [t[0] for t in table]
        assert list(got.values()) == [t[1:] for t in table]


def test_lrn_within_channel_widens_the_field() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), CaffeLRN(5, 1e-4, 0.75, 1.0, across_channels=False))
    rows = receptive_fields(net, 16)
    assert [r.name for r in rows] == ["0", "1"]
    assert rows[1].receptive_field == 3 + 4 and rows[1].shape == (4, 14, 14)
