"""The MatConvNet importer (preimage.models.matconvnet): MAT v5 and v7.3 files written here.

Files are written the way MATLAB writes them -- v5 with ``scipy.io.savemat``, v7.3 with an HDF5
writer below that mimics MATLAB's layout (512-byte "MATLAB 7.3 MAT-file" user block, structs as
groups with ``MATLAB_class``/``MATLAB_fields``, cells as datasets of object references into
``#refs#``, chars as uint16, axes reversed) -- from networks with known random weights, converted
to MatConvNet's SimpleNN layout by an independent converter (``_simplenn``) that follows
MatConvNet's ``import-caffe.py``.  Small hand-made models check the semantics (filter orientation,
grouped and padded convolutions, MatConvNet's pooling and normalization) against NumPy loops.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

h5py = pytest.importorskip("h5py")
scipy_io = pytest.importorskip("scipy.io")

from preimage.geometry import receptive_fields  # noqa: E402
from preimage.models.caffe import CaffeLRN, CaffePooling, ModelError  # noqa: E402
from preimage.models.matconvnet import load_matconvnet, read_mat  # noqa: E402
from preimage.models.networks import DenseConv2d, PaddedConv2d, Pool2d, SequentialNet, meta_build  # noqa: E402
from preimage.models.zoo import load_model  # noqa: E402
from preimage.representations.base import Geometry  # noqa: E402

# ------------------------------------------------------------------ MATLAB values and writers


class Cell(list):  # type: ignore[type-arg]
    """A 1xN MATLAB cell array."""


def _to_scipy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_scipy(v) for k, v in value.items()}
    if isinstance(value, Cell):
        out = np.empty((1, len(value)), dtype=object)
        for i, v in enumerate(value):
            out[0, i] = _to_scipy(v)
        return out
    return value


def write_v5(path: Path, variables: dict[str, Any]) -> Path:
    scipy_io.savemat(path, {k: _to_scipy(v) for k, v in variables.items()}, format="5", oned_as="row")
    return path


_MATLAB_CLASS = {
    np.dtype(np.float32): "single",
    np.dtype(np.float64): "double",
    np.dtype(np.uint8): "uint8",
    np.dtype(np.int32): "int32",
    np.dtype(np.uint16): "uint16",
    np.dtype(np.bool_): "logical",
}


class _V73Writer:
    """Writes MATLAB values into an HDF5 file the way MATLAB's ``save -v7.3`` does."""

    def __init__(self, f: Any) -> None:
        self.f = f
        self.refs = f.create_group("#refs#")
        self.count = 0
        # MATLAB keeps a canonical empty array at #refs#/a
        empty = self.refs.create_dataset("a", data=np.array([0, 0], dtype=np.uint64))
        empty.attrs["MATLAB_class"] = np.bytes_("canonical empty")
        empty.attrs["MATLAB_empty"] = np.uint8(1)

    def _ref_name(self) -> str:
        self.count += 1
        n, name = self.count, ""
        while True:  # b, c, ..., z, ba, bb, ... (MATLAB's naming; "a" is the canonical empty)
            n, r = divmod(n, 26)
            name = "abcdefghijklmnopqrstuvwxyz"[r] + name
            if n == 0:
                return name

    @staticmethod
    def _class(obj: Any, cls: str) -> None:
        obj.attrs["MATLAB_class"] = np.bytes_(cls)

    def write(self, parent: Any, name: str, value: Any) -> Any:
        if isinstance(value, dict):
            g = parent.create_group(name)
            self._class(g, "struct")
            fields = np.empty(len(value), dtype=object)
            for i, key in enumerate(value):
                fields[i] = np.array(list(key), dtype="S1")
            g.attrs.create("MATLAB_fields", fields, dtype=h5py.vlen_dtype(np.dtype("S1")))
            for key, v in value.items():
                self.write(g, key, v)
            return g
        if isinstance(value, Cell) and not value:  # MATLAB writes an empty cell as its dimensions
            ds = parent.create_dataset(name, data=np.array([1, 0], dtype=np.uint64))
            ds.attrs["MATLAB_empty"] = np.uint8(1)
            self._class(ds, "cell")
            return ds
        if isinstance(value, Cell):
            refs = [self.write(self.refs, self._ref_name(), v).ref for v in value]
            data = np.empty((len(refs), 1), dtype=h5py.ref_dtype)  # MATLAB 1xN -> HDF5 (N, 1)
            for i, r in enumerate(refs):
                data[i, 0] = r
            ds = parent.create_dataset(name, data=data, dtype=h5py.ref_dtype)
            self._class(ds, "cell")
            return ds
        if isinstance(value, str):
            if not value:
                ds = parent.create_dataset(name, data=np.array([0, 0], dtype=np.uint64))
                ds.attrs["MATLAB_empty"] = np.uint8(1)
            else:
                ds = parent.create_dataset(name, data=np.array([[ord(c)] for c in value], dtype=np.uint16))
                ds.attrs["MATLAB_int_decode"] = np.int32(2)
            self._class(ds, "char")
            return ds
        if isinstance(value, bool):
            value = np.array([[value]], dtype=np.bool_)
        if isinstance(value, (int, float)):
            value = np.array([[value]], dtype=np.float64)
        a = np.asarray(value)
        if a.ndim < 2:
            a = a.reshape(1, -1)
        cls = _MATLAB_CLASS[a.dtype]
        if a.size == 0:
            ds = parent.create_dataset(name, data=np.array(a.shape, dtype=np.uint64))
            ds.attrs["MATLAB_empty"] = np.uint8(1)
        else:
            data = np.ascontiguousarray(a.T).astype(np.uint8) if cls == "logical" else np.ascontiguousarray(a.T)
            ds = parent.create_dataset(name, data=data)
            if cls == "logical":
                ds.attrs["MATLAB_int_decode"] = np.int32(1)
        self._class(ds, cls)
        return ds


def write_v73(path: Path, variables: dict[str, Any]) -> Path:
    with h5py.File(path, "w", userblock_size=512, libver="earliest") as f:
        writer = _V73Writer(f)
        for name, value in variables.items():
            writer.write(f, name, value)
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  5 12:00:00 2015 HDF5 schema 1.00 ."
    header = header.ljust(116, b" ") + b" " * 8 + b"\x00\x02" + b"IM"
    with path.open("r+b") as fh:
        fh.write(header)
    return path


WRITERS = {"v5": write_v5, "v7.3": write_v73}

# ------------------------------------------------------- networks -> SimpleNN (independently)


def _row(*values: float) -> np.ndarray:
    return np.array([values], dtype=np.float64)


def _simplenn(
    net: SequentialNet, input_size: int, *, old_format: bool = False, dropout: bool = False, names: bool = True
) -> dict[str, Any]:
    """A SimpleNN struct for ``net`` as MatConvNet's import-caffe.py writes it.

    Pooling pads get the extra bottom/right padding that emulates Caffe's ceil rounding at the
    nominal input size; fc layers are convolutions; LRN params are [N kappa alpha/N beta].
    """
    sizes = {r.name: r.shape for r in receptive_fields(net, input_size)}
    layers = Cell()
    previous = (3, input_size, input_size)
    for name, m in net.named_children():
        layer: dict[str, Any] = {"name": name} if names else {}
        if isinstance(m, nn.Conv2d):
            filters = m.weight.detach().numpy().transpose(2, 3, 1, 0)  # H x W x Cin x Cout (a view)
            biases = m.bias.detach().numpy().reshape(1, -1)
            pad = m.padding4 if isinstance(m, PaddedConv2d) else (m.padding[0],) * 2 + (m.padding[1],) * 2
            layer["type"] = "conv"
            if old_format:
                layer.update(filters=filters, biases=biases)
            else:
                layer["weights"] = Cell([filters, biases])
                layer["size"] = _row(*filters.shape)
            layer.update(pad=_row(*pad), stride=_row(*m.stride), dilate=_row(1, 1))
            if not old_format:
                layer.update(precious=False, opts=Cell())
        elif isinstance(m, CaffeLRN):
            n = m.local_size
            layer.update(type="normalize", param=_row(n, m.k, m.alpha / n, m.beta))
        elif isinstance(m, CaffePooling):
            (kh, kw), (sh, sw) = m.kernel, m.stride
            _, h, w = previous
            extra_h = math.ceil((h - kh) / sh) * sh + kh - h
            extra_w = math.ceil((w - kw) / sw) * sw + kw - w
            layer.update(
                type="pool",
                method="max" if m.method == "MAX" else "avg",
                pool=_row(kh, kw),
                stride=_row(sh, sw),
                pad=_row(0, extra_h, 0, extra_w),
            )
        elif isinstance(m, nn.ReLU):
            layer.update(type="relu", leak=0.0)
        elif isinstance(m, nn.Softmax):
            layer.update(type="softmax")
        else:  # pragma: no cover
            raise AssertionError(type(m))
        layers.append(layer)
        if dropout and name in ("relu6", "relu7"):
            layers.append(
                {"name": name.replace("relu", "drop"), "type": "dropout", "rate": 0.5}
                if names
                else {"type": "dropout", "rate": 0.5}
            )
        previous = sizes[name]
    return {"layers": layers}


def _meta(mean_rgb: tuple[float, float, float], size: int, full_image: bool = True) -> dict[str, Any]:
    rng = np.random.default_rng(5)
    if full_image:  # a mean *image* whose per-channel averages are mean_rgb
        noise = rng.normal(size=(size, size, 3)).astype(np.float32)
        noise -= noise.reshape(-1, 3).mean(0)
        avg = (noise + np.asarray(mean_rgb, dtype=np.float32)).astype(np.float32)
    else:
        avg = np.asarray(mean_rgb, dtype=np.float32).reshape(1, 1, 3)
    return {
        "normalization": {
            "averageImage": avg,
            "keepAspect": True,
            "border": _row(32, 32),
            "imageSize": _row(size, size, 3),
            "interpolation": "bilinear",
        },
        "classes": {"name": Cell(["n01440764", "n01443537"]), "description": Cell(["tench", "goldfish"])},
    }


def _random_net(arch: str, seed: int) -> SequentialNet:
    torch.manual_seed(seed)
    net = meta_build(arch).to_empty(device="cpu")
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                bound = math.sqrt(6.0 / m.weight[0].numel())  # He-uniform: activations stay O(1)
                m.weight.uniform_(-bound, bound)
                m.bias.uniform_(-0.1, 0.1)
    return net


def _assert_same_parameters(a: nn.Module, b: nn.Module) -> None:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert list(pa) == list(pb)
    for name in pa:
        assert pa[name].shape == pb[name].shape, name
        assert torch.equal(pa[name], pb[name]), name


# ------------------------------------------------------------------------------ round trips


@pytest.fixture(scope="module")
def vgg16() -> SequentialNet:
    """VGG-VD-16 with random weights (138M parameters): built once for the module."""
    return _random_net("vgg-vd-16", 3)


def test_alexnet_round_trip_v73(tmp_path: Path) -> None:
    net = _random_net("alexnet", 1)
    mean = (122.5, 116.25, 104.0)
    path = write_v73(tmp_path / "imagenet-caffe-alex.mat", {**_simplenn(net, 227), "meta": _meta(mean, 227)})
    model = load_model(path)  # a .mat path alone, through the resolver
    loaded = model.module
    assert isinstance(loaded, SequentialNet)
    assert model.name == "alexnet" and model.arch == "alexnet" and model.pretrained and model.source == str(path)
    rep = model.representation("conv5")
    assert rep.geometry == Geometry(stride=16, receptive_field=163)
    assert rep.bgr is False and rep.mean.tolist() == pytest.approx(list(mean), abs=1e-4)
    assert loaded.arch == "alexnet" and loaded.layer_names() == net.layer_names()
    _assert_same_parameters(loaded, net)
    assert loaded.convention.mean == pytest.approx(mean, abs=1e-4)
    assert (loaded.convention.bgr, loaded.convention.input_size) == (False, 227)
    assert loaded.classes == ["tench", "goldfish"]
    lrn = loaded.layer("norm1")
    assert isinstance(lrn, CaffeLRN) and lrn.alpha == pytest.approx(1e-4) and lrn.k == 1.0
    pool = loaded.layer("pool1")
    assert isinstance(pool, Pool2d) and not pool.ceil and pool.padding4 == (0, 0, 0, 0)
    assert all(isinstance(loaded.layer(fc), DenseConv2d) for fc in ("fc6", "fc7", "fc8"))  # matrix products
    x = torch.randn(1, 3, 227, 227) * 50
    with torch.no_grad():
        a, b = loaded(x, until="pool5"), net(x, until="pool5")
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
        for layer in ("fc8", "prob"):
            a2, b2 = loaded(a, start="fc6", until=layer), net(b, start="fc6", until=layer)
            assert torch.allclose(a2, b2, rtol=1e-5, atol=1e-5 * b2.abs().max().item()), layer


def test_caffenet_round_trip_v5_old_format(tmp_path: Path) -> None:
    """Early MatConvNet files: filters/biases fields, no layer names, dropout layers, and
    normalization at the top level; the layers get the paper's names."""
    net = _random_net("caffenet", 4)
    simplenn = _simplenn(net, 227, old_format=True, names=False, dropout=True)
    meta = _meta((120.0, 115.0, 100.0), 227)
    path = write_v5(tmp_path / "imagenet-caffe-ref.mat", {**simplenn, "normalization": meta["normalization"]})
    loaded = load_matconvnet(path)
    assert loaded.arch == "caffenet" and loaded.layer_names() == net.layer_names()
    _assert_same_parameters(loaded, net)
    assert loaded.convention.mean == pytest.approx((120.0, 115.0, 100.0), abs=1e-4)
    assert loaded.classes is None
    x = torch.randn(1, 3, 227, 227) * 50
    with torch.no_grad():
        a, b = loaded(x, until="conv3"), net(x, until="conv3")
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
    # a CaffeNet file is not AlexNet: same shapes, but pooling comes before normalization
    with pytest.raises(ModelError, match="not alexnet: layer 3 is 'layer3' .pool"):
        load_matconvnet(path, "alexnet")


def test_vgg_m_pool_pads_from_the_file(tmp_path: Path) -> None:
    """imagenet-vgg-m.mat pads pool2 by [0 1 0 1] (Caffe's ceil rounding on the 26x26 conv2 map):
    the file's pads are used with MatConvNet's floor rounding, which equals Caffe's at 224.

    Only VGG-M's convolutional part is written (its fc layers are 92M of the 103M parameters)."""
    torch.manual_seed(2)
    net = SequentialNet(list(meta_build("vgg-m").named_children())[:15]).to_empty(device="cpu")
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        for m in convs:
            m.weight.uniform_(-0.05, 0.05)
            m.bias.uniform_(-0.1, 0.1)
    path = write_v5(tmp_path / "vgg-m-conv.mat", {**_simplenn(net, 224), "meta": _meta((123.0, 117.0, 104.0), 224)})
    loaded = load_matconvnet(path)
    assert loaded.arch == "custom" and loaded.layer_names()[-1] == "pool5"
    _assert_same_parameters(loaded, net)
    assert loaded.layer("pool2").padding4 == (0, 1, 0, 1)
    assert loaded.layer("pool1").padding4 == (0, 0, 0, 0) and loaded.layer("pool5").padding4 == (0, 0, 0, 0)
    assert loaded.layer("norm1").k == 2.0 and loaded.layer("norm1").alpha == pytest.approx(5e-4)
    x = torch.randn(1, 3, 224, 224) * 50
    with torch.no_grad():
        a, b = loaded(x, until="pool2"), net(x, until="pool2")
        assert a.shape == (1, 256, 13, 13)
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
    with pytest.raises(ModelError, match="not vgg-m: 15 layers"):
        load_matconvnet(path, "vgg-m")


def test_vgg_vd_16_round_trip_v5(tmp_path: Path, vgg16: SequentialNet) -> None:
    simplenn = _simplenn(vgg16, 224)
    simplenn["layers"][-2]["name"] = "fc8_imagenet"  # a file naming a layer its own way
    path = write_v5(
        tmp_path / "imagenet-vgg-verydeep-16.mat",
        {**simplenn, "meta": _meta((123.68, 116.779, 103.939), 224, full_image=False)},
    )
    with pytest.warns(UserWarning, match="'fc8_imagenet' -> 'fc8'"):
        loaded = load_matconvnet(path, "vgg16")
    assert loaded.arch == "vgg-vd-16" and loaded.layer_names() == vgg16.layer_names()
    _assert_same_parameters(loaded, vgg16)
    assert loaded.convention.mean == pytest.approx((123.68, 116.779, 103.939), abs=1e-4)
    with torch.no_grad():
        x = torch.randn(1, 3, 32, 32) * 50  # the convolutional part on a small image
        a, b = loaded(x, until="pool5"), vgg16(x, until="pool5")
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
        z = torch.randn(1, 512, 7, 7)  # the fully connected part on a pool5-sized map
        assert torch.allclose(loaded(z, start="fc6"), vgg16(z, start="fc6"), atol=1e-5)


# ------------------------------------------------------------- semantics on small models


def _conv_layer(
    name: str,
    filters: np.ndarray,
    biases: np.ndarray,
    pad: tuple[int, ...] = (0, 0, 0, 0),
    stride: tuple[int, int] = (1, 1),
) -> dict[str, Any]:
    return {
        "name": name,
        "type": "conv",
        "weights": Cell([filters.astype(np.float32), biases.astype(np.float32)]),
        "pad": _row(*pad),
        "stride": _row(*stride),
    }


def _correlate(
    x: np.ndarray,
    f: np.ndarray,
    b: np.ndarray,
    pad: tuple[int, int, int, int],
    stride: tuple[int, int],
    groups: int = 1,
) -> np.ndarray:
    """vl_nnconv on one image: x H x W x C, f FH x FW x C/groups x K (MATLAB layout), no flipping."""
    t, bt, lf, rt = pad
    xp = np.pad(x, ((t, bt), (lf, rt), (0, 0)))
    fh, fw, depth, k = f.shape
    oh = (xp.shape[0] - fh) // stride[0] + 1
    ow = (xp.shape[1] - fw) // stride[1] + 1
    y = np.zeros((oh, ow, k))
    per_group = k // groups
    for o in range(k):
        g = o // per_group
        for i in range(oh):
            for j in range(ow):
                patch = xp[
                    i * stride[0] : i * stride[0] + fh, j * stride[1] : j * stride[1] + fw, g * depth : (g + 1) * depth
                ]
                y[i, j, o] = (patch * f[:, :, :, o]).sum() + b.reshape(-1)[o]
    return y


@pytest.mark.parametrize("fmt", ["v5", "v7.3"])
def test_filter_orientation_groups_and_asymmetric_padding(tmp_path: Path, fmt: str) -> None:
    rng = np.random.default_rng(0)
    f1 = rng.normal(size=(3, 5, 3, 4))  # non-square: rows (H) 3, columns (W) 5
    b1 = rng.normal(size=(1, 4))
    f2 = rng.normal(size=(2, 3, 2, 6))  # depth 2 on 4 channels: 2 groups
    b2 = rng.normal(size=(1, 6))
    f3 = rng.normal(size=(1, 1, 6))  # 1x1x6x1: MATLAB drops the trailing singleton
    b3 = rng.normal(size=(1, 1))
    layers = Cell(
        [
            _conv_layer("a", f1, b1, pad=(1, 0, 2, 1), stride=(2, 1)),
            {"name": "r", "type": "relu", "leak": 0.1},
            _conv_layer("b", f2, b2, pad=(0, 1, 1, 0)),
            _conv_layer("c", f3, b3),
        ]
    )
    path = WRITERS[fmt](
        tmp_path / "tiny.mat", {"layers": layers, "meta": {"normalization": {"imageSize": _row(9, 11, 3)}}}
    )
    net = load_matconvnet(path)
    assert net.arch == "custom" and net.layer_names() == ["a", "r", "b", "c"]
    assert isinstance(net.layer("a"), PaddedConv2d) and net.layer("b").groups == 2
    assert net.convention.input_size == 9
    x = rng.normal(size=(9, 11, 3))
    y = _correlate(x, f1, b1, (1, 0, 2, 1), (2, 1))
    y = np.where(y > 0, y, 0.1 * y)
    y = _correlate(y, f2, b2, (0, 1, 1, 0), (1, 1), groups=2)
    y = _correlate(y, f3.reshape(1, 1, 6, 1), b3, (0, 0, 0, 0), (1, 1))
    with torch.no_grad():
        out = net(torch.from_numpy(x.transpose(2, 0, 1)[None].astype(np.float32)))
    assert out.shape == (1, 1) + y.shape[:2]
    np.testing.assert_allclose(out[0].numpy().transpose(1, 2, 0), y, rtol=1e-4, atol=1e-4)


def _vl_nnpool(
    x: np.ndarray, k: tuple[int, int], s: tuple[int, int], pad: tuple[int, int, int, int], method: str
) -> np.ndarray:
    """MatConvNet's pooling_cpu loop: floor output size, windows clipped to the image."""
    h, w = x.shape[-2:]
    top, bottom, left, right = pad
    oh, ow = (h + top + bottom - k[0]) // s[0] + 1, (w + left + right - k[1]) // s[1] + 1
    y = np.zeros(x.shape[:-2] + (oh, ow))
    for i in range(oh):
        for j in range(ow):
            y1, x1 = i * s[0] - top, j * s[1] - left
            y2, x2 = min(y1 + k[0], h), min(x1 + k[1], w)
            win = x[..., max(y1, 0) : y2, max(x1, 0) : x2]
            y[..., i, j] = win.max(axis=(-2, -1)) if method == "max" else win.mean(axis=(-2, -1))
    return y


def _vl_nnnormalize(x: np.ndarray, n: int, kappa: float, alpha: float, beta: float) -> np.ndarray:
    """MatConvNet's normalize: y_k = x_k (kappa + alpha sum_{q in G(k)} x_q^2)^-beta."""
    depth = x.shape[0]
    y = np.empty_like(x)
    for c in range(depth):
        lo, hi = max(0, c - (n - 1) // 2), min(depth - 1, c + math.ceil((n - 1) / 2))
        y[c] = x[c] * (kappa + alpha * (x[lo : hi + 1] ** 2).sum(0)) ** (-beta)
    return y


@pytest.mark.parametrize("fmt", ["v5", "v7.3"])
def test_pooling_and_normalization_semantics(tmp_path: Path, fmt: str) -> None:
    layers = Cell(
        [
            {"name": "norm", "type": "normalize", "param": _row(5, 2.0, 1e-2, 0.75)},
            {
                "name": "maxp",
                "type": "pool",
                "method": "max",
                "pool": _row(3, 3),
                "stride": _row(2, 2),
                "pad": _row(0, 1, 1, 0),
            },
            {
                "name": "avgp",
                "type": "pool",
                "method": "avg",
                "pool": _row(2, 3),
                "stride": _row(1, 2),
                "pad": _row(1, 1, 0, 2),
            },
            {"name": "prob", "type": "softmax"},
        ]
    )
    path = WRITERS[fmt](tmp_path / "pool.mat", {"layers": layers})
    net = load_matconvnet(path)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(7, 12, 13)) * 3
    y = _vl_nnnormalize(x, 5, 2.0, 1e-2, 0.75)
    y = _vl_nnpool(y, (3, 3), (2, 2), (0, 1, 1, 0), "max")
    y = _vl_nnpool(y, (2, 3), (1, 2), (1, 1, 0, 2), "avg")
    y = np.exp(y - y.max(0)) / np.exp(y - y.max(0)).sum(0)
    with torch.no_grad():
        out = net(torch.from_numpy(x[None].astype(np.float32)))[0].numpy()
    assert out.shape == y.shape
    np.testing.assert_allclose(out, y, rtol=1e-5, atol=1e-6)


def test_read_mat_gives_matlab_shapes_for_both_formats(tmp_path: Path) -> None:
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    value = {"s": {"x": a, "name": "abc", "empty": "", "flag": True, "c": Cell([1.0, "z", Cell([])])}}
    for fmt, writer in WRITERS.items():
        got = read_mat(writer(tmp_path / f"v-{fmt}.mat", value))
        s = got["s"]
        np.testing.assert_array_equal(s["x"], a)
        assert s["name"] == "abc" and s["empty"] == "" and bool(np.asarray(s["flag"]).reshape(-1)[0]) is True
        assert s["c"][1] == "z" and float(np.asarray(s["c"][0]).reshape(-1)[0]) == 1.0 and len(s["c"][2]) == 0
    with h5py.File(tmp_path / "v-v7.3.mat", "r") as f:  # really stored the MATLAB way
        assert f["s"]["x"].shape == (4, 3, 2) and f["s"].attrs["MATLAB_class"] == b"struct"
        assert f["s"]["c"].dtype == h5py.ref_dtype and f["s"]["c"].shape == (3, 1)
    assert (tmp_path / "v-v7.3.mat").read_bytes()[:10] == b"MATLAB 7.3"


# ----------------------------------------------------------------------------------- errors


def test_errors_are_one_line_model_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no such MatConvNet"):
        load_matconvnet(tmp_path / "missing.mat")
    junk = tmp_path / "junk.mat"
    junk.write_bytes(b"this is not a mat file at all" * 10)
    with pytest.raises(ModelError, match="not a MATLAB"):
        load_matconvnet(junk)
    write_v5(tmp_path / "novars.mat", {"x": np.zeros((1, 1))})
    with pytest.raises(ModelError, match="no 'layers'"):
        load_matconvnet(tmp_path / "novars.mat")
    write_v5(tmp_path / "dag.mat", {"layers": {"name": "a"}, "vars": {"name": "x"}, "params": {"name": "p"}})
    with pytest.raises(ModelError, match="DagNN"):
        load_matconvnet(tmp_path / "dag.mat")
    write_v73(tmp_path / "bnorm.mat", {"layers": Cell([{"name": "bn", "type": "bnorm"}])})
    with pytest.raises(ModelError, match="unsupported layer type 'bnorm'"):
        load_matconvnet(tmp_path / "bnorm.mat")
    bad = Cell([_conv_layer("a", np.ones((3, 3, 2, 4)), np.ones((1, 4)))])  # depth 2 on an RGB input
    write_v5(tmp_path / "bad.mat", {"layers": bad})
    with pytest.raises(ModelError, match="depth 2 do not divide the 3 input channels"):
        load_matconvnet(tmp_path / "bad.mat")
    wrong_bias = Cell([_conv_layer("a", np.ones((3, 3, 3, 4)), np.ones((1, 5)))])
    write_v5(tmp_path / "bias.mat", {"layers": wrong_bias})
    with pytest.raises(ModelError, match="5 biases for 4 filters"):
        load_matconvnet(tmp_path / "bias.mat")
    tiny = write_v5(
        tmp_path / "tiny.mat", {"layers": Cell([_conv_layer("conv1", np.ones((3, 3, 3, 4)), np.ones((1, 4)))])}
    )
    with pytest.raises(ModelError, match="not vgg-m"):
        load_matconvnet(tiny, "vgg-m")
    with pytest.raises(ModelError, match="not vgg-m"):
        load_model("vgg-m", tiny)
    with pytest.raises(ModelError, match="holds its weights"):
        load_model(tiny, tiny)
    for err in (ModelError("x"),):
        assert isinstance(err, ValueError)
