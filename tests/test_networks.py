"""The paper's networks (preimage.models.networks), Caffe and torchvision importers, and the resolver.

Caffe: the BVLC deploy prototxts are written out below and run by the Caffe importer
(preimage.models.caffe) on a ``.caffemodel`` written here from our networks' random weights, so
our AlexNet/CaffeNet are checked against Caffe's semantics; ``load_model("alexnet", x.caffemodel)``
must give the weights back exactly.  torchvision: state dicts with torchvision's names and shapes
are written with ``torch.save`` and checked against a functional re-implementation of
torchvision's AlexNet and VGG-16 forward passes.  VGG-VD-16 (138M parameters) is built once.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from preimage.geometry import receptive_fields
from preimage.models import ModelError, caffe_pb2, load_caffe
from preimage.models.caffe import CaffeLRN, CaffePooling
from preimage.models.networks import (
    ILSVRC_MEAN_RGB,
    InputConvention,
    Pool2d,
    SequentialNet,
    alexnet,
    build,
    caffenet,
    canonical_arch,
    meta_build,
    torchvision_alexnet,
    vgg_m,
    vgg_vd_16,
)
from preimage.models.torchvision_format import load_torchvision, to_torchvision_state_dict
from preimage.models.zoo import LoadedModel, caffe_prototxt, load_model, weights_format
from preimage.representations.base import Geometry, RepresentationError
from preimage.representations.cnn import ModuleCut

SHARED = Path(__file__).resolve().parents[2] / "shared"
SQUEEZENET = SHARED / "models" / "squeezenet-v1.0"

ALEXNET_LAYERS = (
    "conv1 relu1 norm1 pool1 conv2 relu2 norm2 pool2 conv3 relu3 conv4 relu4 conv5 relu5 pool5 "
    "fc6 relu6 fc7 relu7 fc8 prob"
).split()
CAFFENET_LAYERS = (
    "conv1 relu1 pool1 norm1 conv2 relu2 pool2 norm2 conv3 relu3 conv4 relu4 conv5 relu5 pool5 "
    "fc6 relu6 fc7 relu7 fc8 prob"
).split()
VGG16_LAYERS = [
    f"{kind}{b}_{i}"
    for b, n in enumerate((2, 2, 3, 3, 3), start=1)
    for i in range(1, n + 1)
    for kind in ("conv", "relu")
]
for _b, _pos in zip(range(1, 6), (4, 9, 16, 23, 30)):
    VGG16_LAYERS.insert(_pos, f"pool{_b}")
VGG16_LAYERS += "fc6 relu6 fc7 relu7 fc8 prob".split()


def _uniform_(net: nn.Module, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                bound = math.sqrt(6.0 / m.weight[0].numel())
                m.weight.uniform_(-bound, bound)
                m.bias.uniform_(-0.1, 0.1)
    return net


def _random(arch: str, seed: int, **kwargs: object) -> SequentialNet:
    net = meta_build(arch, **kwargs).to_empty(device="cpu")
    _uniform_(net, seed)
    return net


def _close(a: Tensor, b: Tensor, what: str = "") -> None:
    scale = max(b.abs().max().item(), 1e-6)
    assert a.shape == b.shape, what
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * scale), f"{what}: max diff {(a - b).abs().max().item()}"


def _assert_same_parameters(a: nn.Module, b: nn.Module) -> None:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert list(pa) == list(pb)
    for name in pa:
        assert torch.equal(pa[name], pb[name]), name


# -------------------------------------------------------------------------------- structure


def test_layer_names_are_tables_1_to_3() -> None:
    assert meta_build("alexnet").layer_names() == ALEXNET_LAYERS
    assert meta_build("caffenet").layer_names() == CAFFENET_LAYERS
    assert meta_build("vgg-m").layer_names() == ALEXNET_LAYERS
    assert meta_build("vgg-vd-16").layer_names() == VGG16_LAYERS
    assert meta_build("torchvision-alexnet").layer_names() == [n for n in ALEXNET_LAYERS if not n.startswith("norm")]
    for arch in ("alexnet", "vgg-m", "vgg-vd-16"):  # direct children, as ModuleCut needs
        net = meta_build(arch)
        assert [n for n, _ in net.named_children()] == net.layer_names()


def test_parameter_counts_and_layer_hyperparameters() -> None:
    def count(arch: str) -> int:
        return sum(p.numel() for p in meta_build(arch).parameters())

    assert count("alexnet") == count("caffenet") == 60_965_224  # Caffe's bvlc_alexnet
    assert count("vgg-vd-16") == 138_357_544
    assert count("torchvision-alexnet") == 61_100_840
    assert count("vgg-m") == 102_908_520
    net = meta_build("alexnet")
    assert [net.layer(n).groups for n in ("conv1", "conv2", "conv3", "conv4", "conv5")] == [1, 2, 1, 2, 2]
    assert net.layer("conv1").stride == (4, 4) and net.layer("conv2").padding == (2, 2)
    assert tuple(net.layer("fc6").weight.shape) == (4096, 256, 6, 6)
    lrn = net.layer("norm1")
    assert isinstance(lrn, CaffeLRN) and (lrn.local_size, lrn.alpha, lrn.beta, lrn.k) == (5, 1e-4, 0.75, 1.0)
    pool = net.layer("pool1")
    assert isinstance(pool, Pool2d) and pool.ceil and pool.kernel == (3, 3) and pool.stride == (2, 2)
    vgg = meta_build("vgg-m")
    assert vgg.layer("conv1").kernel_size == (7, 7) and vgg.layer("conv1").stride == (2, 2)
    assert vgg.layer("conv2").stride == (2, 2) and vgg.layer("conv2").padding == (1, 1)
    assert vgg.layer("norm1").k == 2.0 and vgg.layer("norm1").alpha == 5e-4
    assert all(getattr(m, "groups", 1) == 1 for m in vgg.modules())
    deep = meta_build("vgg-vd-16")
    assert tuple(deep.layer("fc6").weight.shape) == (4096, 512, 7, 7)
    assert isinstance(deep.layer("prob"), nn.Softmax)
    assert meta_build("alexnet", num_classes=10).layer("fc8").out_channels == 10


def test_constructors_know_their_input_convention() -> None:
    a = meta_build("alexnet").convention
    assert (a.bgr, a.input_size, a.std, a.source) == (False, 227, (1.0, 1.0, 1.0), "matconvnet")
    assert a.mean == ILSVRC_MEAN_RGB
    c = a.as_caffe()
    assert c.bgr and c.mean == tuple(reversed(ILSVRC_MEAN_RGB)) and c.as_caffe() == c
    assert meta_build("vgg-m").convention.input_size == 224
    assert meta_build("vgg-vd-16").convention.mean == (123.68, 116.779, 103.939)
    tv = meta_build("torchvision-alexnet").convention
    assert tv.std[0] == pytest.approx(0.229 * 255) and tv.source == "torchvision"
    assert c.module_cut_kwargs() == {"mean": c.mean, "std": c.std, "scale": 255.0, "bgr": True}
    assert canonical_arch("VGG_VD_16") == canonical_arch("vgg16") == "vgg-vd-16" and canonical_arch("resnet") is None
    with pytest.raises(ModelError, match="unknown network 'resnet'"):
        build("resnet")
    # every constructor gives an evaluation-mode SequentialNet with random weights
    small = alexnet(num_classes=3)
    assert isinstance(small, SequentialNet) and not small.training and small.arch == "alexnet"
    assert caffenet(num_classes=3).arch == "caffenet"
    for f in (vgg_m, vgg_vd_16, torchvision_alexnet):
        assert callable(f)


@pytest.mark.parametrize("size", range(13, 41))
def test_matconvnet_padding_emulates_caffe_ceil_pooling(size: int) -> None:
    """floor((H + s - 1 - k)/s) = ceil((H - k)/s): MatConvNet's [0 1 0 1] pads give Caffe's 3x3/2 pooling."""
    x = torch.randn(2, 3, size, size + 3)
    caffe = Pool2d(3, 2)
    matconvnet = Pool2d(3, 2, (0, 1, 0, 1), ceil_mode=False)
    assert torch.equal(caffe(x), matconvnet(x))
    assert torch.equal(caffe(x), CaffePooling("MAX", (3, 3), (2, 2), (0, 0))(x))
    assert matconvnet.output_size(size, size + 3) == tuple(caffe(x).shape[-2:])


def test_pool2d_rejects_asymmetric_caffe_padding_and_the_net_runs_partially() -> None:
    with pytest.raises(ValueError, match="symmetric"):
        Pool2d(3, 2, (0, 1, 0, 1))
    net = SequentialNet([("a", nn.Conv2d(3, 4, 3)), ("b", nn.ReLU()), ("c", Pool2d(2, 2))], arch="custom")
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(net(x, until="b"), F.relu(net.a(x)))
        assert torch.equal(net(net(x, until="a"), start="b"), net(x))
        assert isinstance(net[:2], SequentialNet) and len(net[:2]) == 2
    with pytest.raises(ModelError, match="no layer named 'z'"):
        net(x, until="z")


# ------------------------------------------------------------------------------------ Caffe

_CONV = (
    'layer {{ name: "{n}" type: "Convolution" bottom: "{b}" top: "{n}" param {{ lr_mult: 1 decay_mult: 1 }} '
    "param {{ lr_mult: 2 decay_mult: 0 }} convolution_param {{ num_output: {o} {extra} "
    'weight_filler {{ type: "gaussian" std: 0.01 }} }} }}'
)
_RELU = 'layer {{ name: "{n}" type: "ReLU" bottom: "{b}" top: "{b}" }}'
_LRN = (
    'layer {{ name: "{n}" type: "LRN" bottom: "{b}" top: "{n}" '
    "lrn_param {{ local_size: 5 alpha: 0.0001 beta: 0.75 }} }}"
)
_POOL = (
    'layer {{ name: "{n}" type: "Pooling" bottom: "{b}" top: "{n}" '
    "pooling_param {{ pool: MAX kernel_size: 3 stride: 2 }} }}"
)
_FC = 'layer {{ name: "{n}" type: "InnerProduct" bottom: "{b}" top: "{n}" inner_product_param {{ num_output: {o} }} }}'
_DROP = 'layer {{ name: "{n}" type: "Dropout" bottom: "{b}" top: "{b}" dropout_param {{ dropout_ratio: 0.5 }} }}'


def bvlc_deploy(caffenet_order: bool) -> str:
    """models/bvlc_alexnet/deploy.prototxt (or bvlc_reference_caffenet's, which pools first)."""
    lines = [
        'name: "AlexNet"',
        'layer { name: "data" type: "Input" top: "data" input_param { shape: { dim: 10 dim: 3 dim: 227 dim: 227 } } }',
    ]
    bottom = "data"
    for i, (out, extra) in enumerate([(96, "kernel_size: 11 stride: 4"), (256, "pad: 2 kernel_size: 5 group: 2")], 1):
        lines += [_CONV.format(n=f"conv{i}", b=bottom, o=out, extra=extra), _RELU.format(n=f"relu{i}", b=f"conv{i}")]
        if caffenet_order:
            lines += [_POOL.format(n=f"pool{i}", b=f"conv{i}"), _LRN.format(n=f"norm{i}", b=f"pool{i}")]
            bottom = f"norm{i}"
        else:
            lines += [_LRN.format(n=f"norm{i}", b=f"conv{i}"), _POOL.format(n=f"pool{i}", b=f"norm{i}")]
            bottom = f"pool{i}"
    for i, (out, extra) in zip(
        (3, 4, 5),
        [
            (384, "pad: 1 kernel_size: 3"),
            (384, "pad: 1 kernel_size: 3 group: 2"),
            (256, "pad: 1 kernel_size: 3 group: 2"),
        ],
    ):
        lines += [_CONV.format(n=f"conv{i}", b=bottom, o=out, extra=extra), _RELU.format(n=f"relu{i}", b=f"conv{i}")]
        bottom = f"conv{i}"
    lines.append(_POOL.format(n="pool5", b="conv5"))
    lines += [
        _FC.format(n="fc6", b="pool5", o=4096),
        _RELU.format(n="relu6", b="fc6"),
        _DROP.format(n="drop6", b="fc6"),
        _FC.format(n="fc7", b="fc6", o=4096),
        _RELU.format(n="relu7", b="fc7"),
        _DROP.format(n="drop7", b="fc7"),
        _FC.format(n="fc8", b="fc7", o=1000),
        'layer { name: "prob" type: "Softmax" bottom: "fc8" top: "prob" }',
    ]
    return "\n".join(lines) + "\n"


def _packed(values: np.ndarray) -> bytes:
    """BlobProto field 5 (``repeated float data [packed = true]``) on the wire."""
    raw = np.ascontiguousarray(values, dtype="<f4").tobytes()
    n, varint = len(raw), b""
    while True:
        byte, n = n & 0x7F, n >> 7
        varint += bytes([byte | (0x80 if n else 0)])
        if not n:
            break
    return b"\x2a" + varint + raw


def write_caffemodel(path: Path, net: SequentialNet, order: list[str] | None = None, with_blobs: bool = True) -> Path:
    """A trained-net caffemodel: every layer by name (in ``order``), Caffe blob shapes, data layers."""
    msg = caffe_pb2.NetParameter()
    msg.name = "AlexNet"
    data = msg.layer.add()
    data.name, data.type = "data", "Data"
    for name in order or net.layer_names():
        layer = msg.layer.add()
        layer.name = name
        module = net.layer(name) if name in net.layer_names() else None
        layer.type = {
            nn.Conv2d: "InnerProduct" if name.startswith("fc") else "Convolution",
            nn.ReLU: "ReLU",
            CaffeLRN: "LRN",
            Pool2d: "Pooling",
            nn.Softmax: "Softmax",
        }.get(type(module), "Dropout")
        if with_blobs and isinstance(module, nn.Conv2d):
            w = module.weight.detach()
            shape = (w.shape[0], w[0].numel()) if name.startswith("fc") else tuple(w.shape)
            blob = layer.blobs.add()
            blob.shape.dim.extend(shape)
            blob.MergeFromString(_packed(w.numpy()))
            bias = layer.blobs.add()
            bias.shape.dim.append(w.shape[0])
            bias.MergeFromString(_packed(module.bias.detach().numpy()))
    loss = msg.layer.add()
    loss.name, loss.type = "loss", "SoftmaxWithLoss"
    path.write_bytes(msg.SerializeToString())
    return path


def test_caffe_alexnet_round_trip_and_caffe_semantics(tmp_path: Path) -> None:
    net = _random("alexnet", 1)
    model_file = write_caffemodel(
        tmp_path / "bvlc_alexnet.caffemodel",
        net,
        order=ALEXNET_LAYERS[:15] + ["fc6", "relu6", "drop6", "fc7", "relu7", "drop7", "fc8", "prob"],
    )
    model = load_model("alexnet", model_file)
    assert isinstance(model, LoadedModel) and model.arch == "alexnet" and model.pretrained
    _assert_same_parameters(model.module, net)
    conv = model.convention
    assert conv.bgr and conv.mean == tuple(reversed(ILSVRC_MEAN_RGB)) and conv.input_size == 227
    # Caffe's semantics (the BVLC prototxt run by the Caffe importer) with the same weights
    prototxt = tmp_path / "deploy.prototxt"
    prototxt.write_text(bvlc_deploy(caffenet_order=False))
    reference = load_caffe(prototxt)
    with torch.no_grad():
        for name in ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"):
            target = reference.layer(name)
            target.weight.copy_(net.layer(name).weight.reshape(target.weight.shape))
            target.bias.copy_(net.layer(name).bias)
    x = torch.randn(1, 3, 227, 227) * 60
    with torch.no_grad():
        ours = model.module(x, until="pool5")
        theirs = reference.features(x, layers=["pool5", "fc8"])
        _close(ours, theirs["pool5"], "pool5")
        scores = model.module(ours, start="fc6", until="fc8")
        _close(scores.flatten(1), theirs["fc8"], "fc8")
    rep = model.representation("pool5")
    assert isinstance(rep, ModuleCut) and rep.geometry == Geometry(stride=32, receptive_field=195)
    assert rep.name == "alexnet:pool5" and rep.bgr and rep.mean.tolist() == pytest.approx(list(conv.mean))
    photo = torch.rand(1, 3, 227, 227)
    with torch.no_grad():
        _close(
            rep(rep.preprocess(photo)),
            model.module(photo.flip(1) * 255 - torch.tensor(conv.mean).view(1, 3, 1, 1), until="pool5"),
            "ModuleCut",
        )


def test_caffenet_matches_caffe_and_the_layer_order_is_checked(tmp_path: Path) -> None:
    net = _random("caffenet", 2)
    prototxt = tmp_path / "deploy.prototxt"
    prototxt.write_text(bvlc_deploy(caffenet_order=True))
    reference = load_caffe(prototxt)
    with torch.no_grad():  # our weights into Caffe's network
        for name in ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6"):
            target = reference.layer(name)
            target.weight.copy_(net.layer(name).weight.reshape(target.weight.shape))
            target.bias.copy_(net.layer(name).bias)
        x = torch.randn(2, 3, 227, 227) * 60
        _close(net(x, until="fc6").flatten(1), reference(x, until="fc6"), "fc6")
    # CaffeNet's weights have AlexNet's shapes: only the layer order tells them apart
    names_only = write_caffemodel(tmp_path / "bvlc_reference_caffenet.caffemodel", net, with_blobs=False)
    with pytest.raises(ModelError, match="not alexnet's layer order.*use caffenet"):
        load_model("alexnet", names_only)
    with pytest.raises(ModelError, match="no weights for layer 'conv1'"):
        load_model("caffenet", names_only)


def test_generated_prototxt_is_valid_caffe() -> None:
    text = caffe_prototxt(meta_build("caffenet"))
    assert 'name: "pool1"' in text and text.index('name: "pool1"') < text.index('name: "norm1"')
    assert "group: 2" in text and 'type: "InnerProduct"' in text and "alpha: 0.0001" in text
    with pytest.raises(ModelError, match="only Caffe"):
        caffe_prototxt(meta_build("vgg-vd-16", ceil_mode=False))


# ------------------------------------------------------------------------------ torchvision

TV_ALEXNET = {
    "features.0": (64, 3, 11, 11),
    "features.3": (192, 64, 5, 5),
    "features.6": (384, 192, 3, 3),
    "features.8": (256, 384, 3, 3),
    "features.10": (256, 256, 3, 3),
    "classifier.1": (4096, 9216),
    "classifier.4": (4096, 4096),
    "classifier.6": (1000, 4096),
}
VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def _tv_vgg16_shapes() -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    cin, index = 3, 0
    for v in VGG16_CFG:
        if v == "M":
            index += 1
        else:
            shapes[f"features.{index}"] = (int(v), cin, 3, 3)
            cin, index = int(v), index + 2
    shapes.update({"classifier.0": (4096, 25088), "classifier.3": (4096, 4096), "classifier.6": (1000, 4096)})
    return shapes


def _random_state_dict(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, Tensor] = {}
    for name, shape in shapes.items():
        bound = math.sqrt(6.0 / math.prod(shape[1:]))
        sd[f"{name}.weight"] = torch.empty(shape).uniform_(-bound, bound, generator=g)
        sd[f"{name}.bias"] = torch.empty(shape[0]).uniform_(-0.1, 0.1, generator=g)
    return sd


def tv_alexnet_forward(sd: dict[str, Tensor], x: Tensor) -> Tensor:
    """torchvision.models.AlexNet.forward, written out."""

    def conv(x: Tensor, i: int, **kw: int) -> Tensor:
        return F.relu(F.conv2d(x, sd[f"features.{i}.weight"], sd[f"features.{i}.bias"], **kw))

    x = F.max_pool2d(conv(x, 0, stride=4, padding=2), 3, 2)
    x = F.max_pool2d(conv(x, 3, padding=2), 3, 2)
    x = F.max_pool2d(conv(conv(conv(x, 6, padding=1), 8, padding=1), 10, padding=1), 3, 2)
    x = torch.flatten(F.adaptive_avg_pool2d(x, (6, 6)), 1)
    x = F.relu(F.linear(x, sd["classifier.1.weight"], sd["classifier.1.bias"]))
    x = F.relu(F.linear(x, sd["classifier.4.weight"], sd["classifier.4.bias"]))
    return F.linear(x, sd["classifier.6.weight"], sd["classifier.6.bias"])


def tv_vgg16_features(sd: dict[str, Tensor], x: Tensor) -> Tensor:
    index = 0
    for v in VGG16_CFG:
        if v == "M":
            x, index = F.max_pool2d(x, 2, 2), index + 1
        else:
            x = F.relu(F.conv2d(x, sd[f"features.{index}.weight"], sd[f"features.{index}.bias"], padding=1))
            index += 2
    return x


def tv_vgg16_classifier(sd: dict[str, Tensor], pool5: Tensor) -> Tensor:
    x = torch.flatten(F.adaptive_avg_pool2d(pool5, (7, 7)), 1)
    x = F.relu(F.linear(x, sd["classifier.0.weight"], sd["classifier.0.bias"]))
    x = F.relu(F.linear(x, sd["classifier.3.weight"], sd["classifier.3.bias"]))
    return F.linear(x, sd["classifier.6.weight"], sd["classifier.6.bias"])


def test_torchvision_alexnet(tmp_path: Path) -> None:
    sd = _random_state_dict(TV_ALEXNET, 3)
    path = tmp_path / "alexnet-owt-7be5be79.pth"
    torch.save(sd, path)
    model = load_model("alexnet", path)  # torchvision's AlexNet is a different network
    net = model.module
    assert model.arch == "torchvision-alexnet" and model.name == "torchvision-alexnet"
    assert isinstance(net, SequentialNet) and "norm1" not in model.layers
    assert torch.equal(net.layer("conv2").weight, sd["features.3.weight"])
    assert torch.equal(net.layer("fc6").weight.flatten(1), sd["classifier.1.weight"])
    assert torch.equal(net.layer("fc8").bias, sd["classifier.6.bias"])
    conv = model.convention
    assert not conv.bgr and conv.source == "torchvision" and conv.mean[0] == pytest.approx(123.675)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        _close(net(x, until="fc8").flatten(1), tv_alexnet_forward(sd, x), "logits")
    rep = model.representation("conv5")
    assert rep.geometry == Geometry(stride=16, receptive_field=163)
    assert rep.std.tolist() == pytest.approx([0.229 * 255, 0.224 * 255, 0.225 * 255])
    # the inverse mapping gives the file back
    back = to_torchvision_state_dict(net)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    # our own state dicts load too (DataParallel prefixes and wrappers removed)
    native = tmp_path / "mine.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, native)
    again = load_torchvision(native)
    assert again.arch == "torchvision-alexnet"
    _assert_same_parameters(again, net)
    with pytest.raises(ModelError, match="holds torchvision's torchvision-alexnet, not caffenet"):
        load_model("caffenet", path)
    with pytest.raises(ModelError, match="vgg-m needs"):
        load_torchvision(native, "vgg-m")


@pytest.fixture(scope="module")
def vgg16_state_dict(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Tensor], Path]:
    """torchvision's vgg16 layout with random weights (138M parameters), written once."""
    sd = _random_state_dict(_tv_vgg16_shapes(), 4)
    path = tmp_path_factory.mktemp("tv") / "vgg16-397923af.pth"
    torch.save(sd, path, _use_new_zipfile_serialization=False)  # the 2017 file's legacy format
    return sd, path


def test_torchvision_vgg16(vgg16_state_dict: tuple[dict[str, Tensor], Path]) -> None:
    sd, path = vgg16_state_dict
    model = load_model("vgg-vd-16", path)
    net = model.module
    assert model.arch == "vgg-vd-16" and isinstance(net, SequentialNet) and model.layers == VGG16_LAYERS
    assert torch.equal(net.layer("conv1_1").weight, sd["features.0.weight"])
    assert torch.equal(net.layer("conv5_3").weight, sd["features.28.weight"])
    assert torch.equal(net.layer("fc6").weight.flatten(1), sd["classifier.0.weight"])
    assert torch.equal(net.layer("fc7").bias, sd["classifier.3.bias"])
    assert not net.layer("pool1").ceil  # torch's floor pooling, as torchvision
    x = torch.randn(1, 3, 32, 32)
    z = torch.randn(1, 512, 7, 7)
    with torch.no_grad():
        _close(net(x, until="pool5"), tv_vgg16_features(sd, x), "pool5")
        _close(net(z, start="fc6", until="fc8").flatten(1), tv_vgg16_classifier(sd, z), "logits")
    rep = model.representation("conv4_3")
    assert rep.geometry == Geometry(stride=8, receptive_field=92)
    table = model.layer_table()
    assert table[-1] == ("prob", (1000, 1, 1), 404, 32)
    with pytest.raises(RepresentationError, match="no layer 'conv6_1'"):
        model.representation("conv6_1")


# ----------------------------------------------------------------------- resolver and errors


def test_builtin_names_without_weights_are_random_networks() -> None:
    model = load_model("CaffeNet")
    assert model.arch == "caffenet" and not model.pretrained and model.source == "random initialization"
    assert model.layers == CAFFENET_LAYERS
    assert model.geometry("norm1") == Geometry(stride=8, receptive_field=19)
    assert model.layer_table() == receptive_fields(meta_build("caffenet"), 227)
    rows = model.layer_table(259)
    assert rows[-1].shape == (1000, 2, 2)
    other = load_model("caffenet", convention=InputConvention(mean=(1.0, 2.0, 3.0), input_size=227))
    assert other.representation("conv1").mean.tolist() == [1.0, 2.0, 3.0]


def test_resolver_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="unknown model 'resnet50'"):
        load_model("resnet50")
    with pytest.raises(ModelError, match="no such weights file"):
        load_model("alexnet", tmp_path / "missing.caffemodel")
    (tmp_path / "w.caffemodel").write_bytes(b"\x0a\x03abc")
    with pytest.raises(ModelError, match="needs its network"):
        load_model(tmp_path / "w.caffemodel")
    (tmp_path / "w.pth").write_bytes(b"garbage")
    with pytest.raises(ModelError, match="has no architecture"):
        load_model(tmp_path / "w.pth")
    with pytest.raises(ModelError, match="not a torch state dict"):
        load_model("vgg-vd-16", tmp_path / "w.pth")
    (tmp_path / "noext").write_bytes(b"\x01\x02\x03 random bytes")
    with pytest.raises(ModelError, match="cannot tell the weights format"):
        load_model("alexnet", tmp_path / "noext")
    (tmp_path / "d.prototxt").write_text('name: "x"')
    with pytest.raises(ModelError, match="network definition, not weights"):
        load_model("alexnet", tmp_path / "d.prototxt")
    for err in (ModelError("x"),):
        assert isinstance(err, ValueError) and "\n" not in str(err)


def test_weights_format_sniffs_content(tmp_path: Path) -> None:
    torch.save({"a": torch.zeros(1)}, tmp_path / "state")
    assert weights_format(tmp_path / "state") == "torch"
    (tmp_path / "model").write_bytes(b"MATLAB 5.0 MAT-file" + b" " * 200)
    assert weights_format(tmp_path / "model") == "matconvnet"
    msg = caffe_pb2.NetParameter()
    msg.name = "x"
    msg.layer.add().name = "conv1"
    (tmp_path / "weights").write_bytes(msg.SerializeToString())
    assert weights_format(tmp_path / "weights") == "caffemodel"
    (tmp_path / "w.mat").write_bytes(b"")
    assert weights_format(tmp_path / "w.mat") == "matconvnet"  # the extension decides


def test_caffe_prototxt_through_the_resolver() -> None:
    prototxt, weights = SQUEEZENET / "deploy.prototxt", SQUEEZENET / "squeezenet_v1.0.caffemodel"
    if not prototxt.is_file() or not weights.is_file():
        pytest.skip(f"SqueezeNet v1.0 not found at {SQUEEZENET}")
    model = load_model(prototxt, weights)
    assert model.name == "squeezenet_v1.0" and model.arch is None and model.pretrained
    conv = model.convention
    assert conv.bgr and conv.mean == (104.0, 117.0, 123.0) and conv.input_size == 227
    assert "fire9/concat" in model.layers and model.module_name("fire9/concat") == "fire9_concat"
    rep = model.representation("fire9/concat")
    # conv1 7/2, pool1 3/2, three fire modules (3x3 expand), pool4, four, pool8, fire9
    assert rep.geometry == Geometry(stride=16, receptive_field=155)
    assert rep.name == "squeezenet_v1.0:fire9_concat"
    row = next(r for r in model.layer_table() if r.name == "fire9/concat")
    assert row == ("fire9/concat", (512, 13, 13), 155, 16)
    photo = torch.rand(1, 3, 227, 227)
    with torch.no_grad():
        x = photo.flip(1) * 255 - torch.tensor([104.0, 117.0, 123.0]).view(1, 3, 1, 1)
        expected = model.module.features(x, layers=["fire9/concat"])["fire9/concat"]
        _close(rep(rep.preprocess(photo)), expected, "fire9/concat")
    assert load_model(prototxt).pretrained is False  # the architecture alone


@pytest.mark.parametrize("std", [(1.0, 1.0, 1.0), (58.4, 57.1, 57.4)])
def test_module_cut_never_hands_the_model_the_callers_tensor(std: tuple[float, float, float]) -> None:
    """A model whose first layer works in place (an ``nn.ReLU(inplace=True)``) leaves the
    caller's input alone, and the engine's canvas too (its crop is a view of a leaf that needs
    gradients: an in-place op on it would be an autograd error) -- with or without ``std``."""
    from preimage.defaults import Settings
    from preimage.engine import Stage, optimize
    from preimage.objectives import L2Loss

    rep = ModuleCut(nn.Sequential(nn.ReLU(inplace=True), nn.Conv2d(3, 4, 3)), "1", mean=(0, 0, 0), std=std)
    x = torch.randn(2, 3, 32, 32) * 50
    kept = x.clone()
    with torch.no_grad():
        code = rep(x)
    assert torch.equal(x, kept)
    trace = optimize(rep, L2Loss(code), (32, 32), [0, 1], Settings(iterations=3, fine_iterations=0, jitter=3),
                     [Stage(3)])
    assert torch.isfinite(trace.x).all()


@pytest.mark.parametrize("layout", ["nchw", "channels_last_bf16"])
def test_dense_conv2d_is_the_convolution(layout: str) -> None:
    """fc6 as a matrix product at the nominal size (same output and input gradient as the
    convolution, in both weight layouts), and the convolution itself on larger inputs."""
    from preimage.models.networks import DenseConv2d
    from preimage.representations.cnn import low_precision

    torch.manual_seed(0)
    dense = DenseConv2d(16, 32, 5)
    for p in dense.parameters():
        p.requires_grad_(False)
    plain = nn.Conv2d(16, 32, 5)
    plain.load_state_dict(dense.state_dict())
    dtype = torch.float32
    if layout == "channels_last_bf16":
        dense, plain, dtype = low_precision(dense), low_precision(plain), torch.bfloat16
        assert not dense.weight.is_contiguous()  # the (h, w, c) order is taken
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for size in (5, 9):  # 1 x 1 output: matrix product; 5 x 5 output: convolution
        x = (torch.randn(3, 16, size, size) * 2).to(dtype)
        if layout == "channels_last_bf16":
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        y = dense(x)
        want = plain(x)
        assert y.shape == want.shape == (3, 32, size - 4, size - 4)
        torch.testing.assert_close(y.float(), want.float(), **tol)
        g = torch.randn(y.shape).to(dtype)
        (gx,) = torch.autograd.grad(y, x, g)
        (gw,) = torch.autograd.grad(want, x, g)
        torch.testing.assert_close(gx.float(), gw.float(), **tol)
    assert isinstance(build("alexnet").layer("fc6"), DenseConv2d)
    assert type(build("vgg-vd-16").layer("conv1_1")) is nn.Conv2d


def test_frozen_bf16_fc_layers_keep_a_transposed_copy() -> None:
    """bf16 fc layers on the CPU: the input gradient from a transposed copy of the weights (the
    same as autograd's ``g @ w`` to bf16 rounding), made once, remade when the weights change,
    and not in the state_dict; fp32, and weights that want gradients, take torch's own path."""
    from preimage.models.networks import DenseConv2d

    torch.manual_seed(0)
    dense = DenseConv2d(16, 32, 5).requires_grad_(False)
    reference = dense.weight.reshape(32, -1).clone()
    dense = dense.to(torch.bfloat16)
    x = torch.randn(3, 16, 5, 5, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(3, 32, 1, 1, dtype=torch.bfloat16)

    def gradient() -> torch.Tensor:
        y = dense(x)
        assert "_FrozenLinear" in type(y.grad_fn.next_functions[0][0]).__name__
        (gx,) = torch.autograd.grad(y, x, g)
        return gx.float()

    first = gradient()
    copy = dense.__dict__["_transposed_weight"][1]
    want = (g.reshape(3, 32).float() @ reference).reshape(3, 16, 5, 5)
    assert ((first - want).norm() / want.norm()).item() < 1e-2
    plain = torch.autograd.grad(F.linear(x.reshape(3, -1), dense.weight.reshape(32, -1), dense.bias), x, g.reshape(3, 32))[0]
    torch.testing.assert_close(first, plain.float(), rtol=2e-2, atol=2e-2)
    assert torch.equal(gradient(), first) and dense.__dict__["_transposed_weight"][1] is copy
    with torch.no_grad():
        dense.weight.mul_(2)
    torch.testing.assert_close(gradient(), 2 * first, rtol=2e-2, atol=2e-2)
    assert dense.__dict__["_transposed_weight"][1] is not copy
    assert set(dense.state_dict()) == {"weight", "bias"}
    for other in (DenseConv2d(16, 32, 5).requires_grad_(False), DenseConv2d(16, 32, 5).bfloat16()):
        y = other(x.detach().to(other.weight.dtype).requires_grad_())
        assert "_FrozenLinear" not in type(y.grad_fn.next_functions[0][0]).__name__
