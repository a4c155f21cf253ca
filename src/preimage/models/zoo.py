"""One resolver for every network the command line and the API accept: :func:`load_model`.

``load_model(model, weights)`` takes

* a built-in network name -- ``alexnet``, ``caffenet``, ``vgg-m``, ``vgg-vd-16`` (aliases such as
  ``vgg16`` work) -- with ``weights`` in any supported format, told apart by extension and content:
  a MatConvNet ``.mat`` (v5/v7 or v7.3), a Caffe ``.caffemodel`` (matched against the network's
  Caffe layer names and order) or a torch state dict ``.pth``/``.pt`` (torchvision's AlexNet or
  VGG-16, or a state dict of our own networks); without weights the network keeps its random
  initialization (``LoadedModel.pretrained`` is False);
* a Caffe ``deploy.prototxt`` path, with ``weights`` the matching ``.caffemodel`` (any network the
  Caffe importer supports, e.g. SqueezeNet; Caffe's input convention: BGR, mean (104, 117, 123));
* a MatConvNet ``.mat`` path alone (the file holds architecture and weights).

The result, a :class:`LoadedModel`, carries the ``nn.Module``, its :class:`InputConvention`, its
layer names, and makes representations: ``loaded.representation("conv5")`` is a
:class:`preimage.ModuleCut` with the model's mean/std/BGR convention and the analytic geometry of
:mod:`preimage.geometry` (no probing); ``loaded.layer_table()`` lists every layer's output shape,
receptive field and stride (Tables 1-3 for the paper's networks) for ``preimage layers``.

Nothing is downloaded.  With internet access, the official files are:

* MatConvNet (the paper's own models), http://www.vlfeat.org/matconvnet/pretrained/ :
  ``imagenet-caffe-alex.mat`` (AlexNet), ``imagenet-caffe-ref.mat`` (CaffeNet),
  ``imagenet-vgg-m.mat`` (VGG-M), ``imagenet-vgg-verydeep-16.mat`` (VGG-VD-16), e.g.
  http://www.vlfeat.org/matconvnet/models/imagenet-vgg-m.mat ;
* Caffe's BVLC model zoo (https://github.com/BVLC/caffe/tree/master/models):
  ``bvlc_alexnet.caffemodel`` (http://dl.caffe.berkeleyvision.org/bvlc_alexnet.caffemodel) and
  ``bvlc_reference_caffenet.caffemodel``
  (http://dl.caffe.berkeleyvision.org/bvlc_reference_caffenet.caffemodel), with their
  ``deploy.prototxt`` in ``models/bvlc_alexnet`` / ``models/bvlc_reference_caffenet`` of the Caffe
  repository (not needed with ``--model alexnet`` / ``caffenet``);
* torchvision: https://download.pytorch.org/models/alexnet-owt-7be5be79.pth (torchvision's AlexNet,
  which differs from Caffe's: see :mod:`preimage.models.torchvision_format`) and
  https://download.pytorch.org/models/vgg16-397923af.pth (VGG-16).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..representations.base import Geometry, RepresentationError
from ..representations.cnn import ModuleCut, low_precision, resolve_precision
from .caffe import CaffeInnerProduct, CaffeLRN, CaffeNet, CaffePooling, ModelError, load_caffe, read_caffemodel
from .matconvnet import _is_hdf5, load_matconvnet
from .networks import (
    ARCHITECTURES,
    InputConvention,
    PaddedConv2d,
    SequentialNet,
    build,
    canonical_arch,
    meta_build,
)
from .torchvision_format import load_torchvision

if TYPE_CHECKING:  # preimage.geometry imports this package: import it where it is used
    from ..geometry import LayerInfo

__all__ = ["CAFFE_CONVENTION", "LoadedModel", "caffe_prototxt", "load_caffemodel", "load_model", "weights_format"]

CAFFE_CONVENTION = InputConvention(mean=(104.0, 117.0, 123.0), std=(1.0, 1.0, 1.0), bgr=True, input_size=227,
                                   source="caffe")
"""The usual Caffe convention (BGR, 0..255 minus (104, 117, 123)) for networks read from a prototxt."""

BUILTIN: tuple[str, ...] = ("alexnet", "caffenet", "vgg-m", "vgg-vd-16")
"""The paper's networks, by the names :func:`load_model` accepts."""


# --------------------------------------------------------------------------------- the result


@dataclass
class LoadedModel:
    """A network ready to be cut into representations.

    Attributes:
        name: short name used in representation names (``"vgg-m"``, ``"squeezenet_v1.0"``).
        module: the ``nn.Module`` (evaluation mode).
        convention: its input convention (mean per channel in 0..255 units, std, BGR, input size).
        layers: the layer names :meth:`representation` accepts, in execution order (Caffe names for
            Caffe networks, e.g. ``"fire9/concat"``).
        source: the weights file, or ``"random initialization"``.
        arch: the paper's architecture (``"alexnet"``, ...) or None for other networks.
        classes: class descriptions when the weights file has them.
    """

    name: str
    module: nn.Module
    convention: InputConvention
    layers: list[str]
    source: str = "random initialization"
    arch: str | None = None
    classes: list[str] | None = field(default=None, repr=False)
    _bf16: nn.Module | None = field(default=None, repr=False, compare=False)

    @property
    def pretrained(self) -> bool:
        """Whether weights were loaded from a file."""
        return self.source != "random initialization"

    def module_name(self, layer: str) -> str:
        """The dotted module name of ``layer`` (Caffe layer names are sanitized: ``fire9_concat``)."""
        if isinstance(self.module, CaffeNet):
            if layer in self.module.module_names:
                return self.module.module_names[layer]
            if layer in self.module.layer_for_module:
                return layer
        elif layer in self.layers:
            return layer
        shown = ", ".join(self.layers[:12]) + (", ..." if len(self.layers) > 12 else "")
        raise RepresentationError(f"{self.name} has no layer {layer!r}; its layers are: {shown}")

    def geometry(self, layer: str, input_size: int | None = None) -> Geometry:
        """Stride and receptive field of ``layer`` (Tables 1-3 for the paper's networks)."""
        from ..geometry import layer_geometry

        self.module_name(layer)
        return layer_geometry(self.module, layer, input_size or self.convention.input_size)

    def compute_module(self, precision: str = "fp32") -> nn.Module:
        """The network in ``precision``: ``fp32`` is :attr:`module` itself (on the CPU with its
        convolution weights made channels-last in place, see :meth:`channels_last`); ``bf16`` a
        cached bf16 channels-last copy (:func:`preimage.representations.cnn.low_precision`)."""
        precision = resolve_precision(precision, self.device)
        if precision == "fp32":
            if self.channels_last("fp32"):
                self.module.to(memory_format=torch.channels_last)  # the same values, another memory order
            return self.module
        if self._bf16 is None:
            self._bf16 = low_precision(self.module, torch.bfloat16)
        return self._bf16

    @property
    def device(self) -> torch.device:
        """Where the network's parameters are."""
        return next((p.device for p in self.module.parameters()), torch.device("cpu"))

    def channels_last(self, precision: str) -> bool:
        """Whether the network runs channels-last: always in bf16; in fp32 on the CPU, where
        oneDNN's convolutions are faster so (bare forward + backward, 2 cores, per image at
        batch 16: SqueezeNet fire5 20 -> 13 ms, VGG-M conv3 34 -> 25, AlexNet conv3 11.4 -> 9.6;
        batch 1 alike), and not on CUDA, where fp32 was never measured faster so."""
        return resolve_precision(precision, self.device) != "fp32" or self.device.type == "cpu"

    def representation(self, layer: str, precision: str = "fp32") -> ModuleCut:
        """Φ = the output of ``layer``, in this model's input convention, with analytic geometry.

        The representation's name is ``"<model>:<layer>"`` (``/`` in Caffe layer names becomes ``_``).
        ``precision="bf16"`` computes the network in bf16 (image, code and optimizer stay fp32);
        ``"auto"`` means bf16 where the hardware runs it natively (:func:`~preimage.representations.cnn.fast_bf16`).
        """
        from ..geometry import GeometryError

        module_name = self.module_name(layer)
        precision = resolve_precision(precision, self.device)
        try:
            geometry: Geometry | None = self.geometry(layer)
        except GeometryError:
            geometry = None  # an exotic layer: let ModuleCut measure it
        safe = layer.replace("/", "_").replace("\\", "_")  # names end up in file names
        return ModuleCut(self.compute_module(precision), module_name, **self.convention.module_cut_kwargs(),
                         geometry=geometry, name=f"{self.name}:{safe}", probe_size=self.convention.input_size,
                         channels_last=self.channels_last(precision))

    def layer_table(self, input_size: int | None = None) -> list[LayerInfo]:
        """``(name, output shape, receptive field, stride)`` of every layer for a square input."""
        from ..geometry import receptive_fields

        return receptive_fields(self.module, input_size or self.convention.input_size)


def _wrap(net: nn.Module, name: str, convention: InputConvention, source: str, arch: str | None,
          classes: list[str] | None = None) -> LoadedModel:
    if isinstance(net, CaffeNet):
        layers = net.layer_names()
    elif isinstance(net, SequentialNet):
        layers = net.layer_names()
    else:  # pragma: no cover - all importers return one of the two
        layers = [n for n, _ in net.named_modules() if n]
    net.eval()
    return LoadedModel(name=name, module=net, convention=convention, layers=layers, source=source, arch=arch,
                       classes=classes)


# ----------------------------------------------------------------------------- file formats


_TORCH_SUFFIXES = (".pth", ".pt", ".pkl", ".bin", ".tar", ".ckpt")


def weights_format(path: str | PathLike[str]) -> str:
    """``"matconvnet"``, ``"caffemodel"`` or ``"torch"``: by extension, else by the file's first bytes."""
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"{p}: no such weights file" if not p.exists() else f"{p}: not a file")
    suffix = p.suffix.lower()
    if suffix == ".mat":
        return "matconvnet"
    if suffix == ".caffemodel":
        return "caffemodel"
    if suffix in _TORCH_SUFFIXES:
        return "torch"
    if suffix in (".prototxt", ".pbtxt"):
        raise ModelError(f"{p}: a text prototxt is a network definition, not weights "
                         f"(give it as the model and the .caffemodel as the weights)")
    with p.open("rb") as fh:
        head = fh.read(128)
    if head.startswith(b"MATLAB") or _is_hdf5(p):
        return "matconvnet"
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return "torch"
    if head[:1] in (b"\x0a", b"\x12", b"\x1a", b"\x22", b"\xa2"):  # a protobuf NetParameter's first field
        return "caffemodel"
    raise ModelError(f"{p}: cannot tell the weights format (expected a MatConvNet .mat, a Caffe .caffemodel "
                     f"or a torch .pth/.pt)")


# ---------------------------------------------------------------------- caffemodel -> our nets


def _fmt(value: float) -> str:
    return repr(float(value))


def caffe_prototxt(net: SequentialNet, input_size: int | None = None) -> str:
    """A Caffe ``deploy.prototxt`` for one of our networks (fc layers as InnerProduct, as in Caffe).

    Only layers with a Caffe equivalent are allowed (convolutions with symmetric padding, Caffe
    pooling, LRN, ReLU, softmax).
    """
    size = int(input_size or net.convention.input_size)
    lines = [f'name: "{net.arch}"', 'input: "data"', "input_dim: 1", "input_dim: 3",
             f"input_dim: {size}", f"input_dim: {size}"]
    bottom = "data"
    for name, m in net.named_children():
        head = f'layer {{\n  name: "{name}"\n  bottom: "{bottom}"\n  top: "{name}"\n'
        if isinstance(m, nn.Conv2d) and name.startswith("fc"):
            body = f'  type: "InnerProduct"\n  inner_product_param {{ num_output: {m.out_channels} }}\n'
        elif isinstance(m, nn.Conv2d):
            if isinstance(m, PaddedConv2d) or isinstance(m.padding, str):
                raise ModelError(f"layer {name!r}: asymmetric padding has no Caffe equivalent")
            (kh, kw), (sh, sw), (ph, pw), (dh, dw) = m.kernel_size, m.stride, m.padding, m.dilation
            body = (f'  type: "Convolution"\n  convolution_param {{ num_output: {m.out_channels} '
                    f"kernel_h: {kh} kernel_w: {kw} stride_h: {sh} stride_w: {sw} pad_h: {ph} pad_w: {pw} "
                    f"group: {m.groups} bias_term: {'true' if m.bias is not None else 'false'}"
                    + (f" dilation: {dh}" if dh != 1 or dw != 1 else "") + " }\n")
            if dh != dw:
                raise ModelError(f"layer {name!r}: anisotropic dilation has no Caffe equivalent")
        elif isinstance(m, CaffePooling):
            if not m.ceil or m.global_pooling:
                raise ModelError(f"layer {name!r}: only Caffe (ceil) pooling can be written as a prototxt")
            (kh, kw), (sh, sw), (ph, pw) = m.kernel, m.stride, m.pad
            body = (f'  type: "Pooling"\n  pooling_param {{ pool: {m.method} kernel_h: {kh} kernel_w: {kw} '
                    f"stride_h: {sh} stride_w: {sw} pad_h: {ph} pad_w: {pw} }}\n")
        elif isinstance(m, CaffeLRN):
            region = "ACROSS_CHANNELS" if m.across_channels else "WITHIN_CHANNEL"
            body = (f'  type: "LRN"\n  lrn_param {{ local_size: {m.local_size} alpha: {_fmt(m.alpha)} '
                    f"beta: {_fmt(m.beta)} k: {_fmt(m.k)} norm_region: {region} }}\n")
        elif isinstance(m, nn.LeakyReLU):
            body = f'  type: "ReLU"\n  relu_param {{ negative_slope: {_fmt(m.negative_slope)} }}\n'
        elif isinstance(m, nn.ReLU):
            body = '  type: "ReLU"\n'
        elif isinstance(m, nn.Softmax):
            body = '  type: "Softmax"\n'
        else:
            raise ModelError(f"layer {name!r} ({type(m).__name__}) has no Caffe equivalent")
        lines.append(head + body + "}")
        bottom = name
    return "\n".join(lines) + "\n"


def _caffemodel_order(path: Path) -> list[str]:
    model = read_caffemodel(path)
    return [str(layer.name) for layer in list(model.layers) + list(model.layer)]


def load_caffemodel(path: str | PathLike[str], arch: str) -> SequentialNet:
    """Read a Caffe ``.caffemodel`` of one of the paper's networks (e.g. ``bvlc_alexnet.caffemodel``).

    The network's deploy prototxt is generated (:func:`caffe_prototxt`), the weights are read with
    :func:`~preimage.models.caffe.load_caffe` (matched by layer name and shape-checked) and copied
    into the :class:`SequentialNet` (InnerProduct matrices reshaped to fc convolutions).  The order
    of the caffemodel's layers must be the network's: CaffeNet's weights have AlexNet's shapes but
    pool before normalizing, so ``bvlc_reference_caffenet`` is refused as ``alexnet``.  The result
    has Caffe's pooling and input convention (BGR).
    """
    p = Path(path)
    want = canonical_arch(arch)
    if want is None or want == "torchvision-alexnet":
        raise ModelError(f"{p}: no Caffe release of network {arch!r} is known (alexnet, caffenet, vgg-m, vgg-vd-16)")
    net = meta_build(want)  # parameters on the meta device until the caffemodel's replace them
    order = _caffemodel_order(p)
    position = {n: i for i, n in reversed(list(enumerate(order)))}
    names = [n for n in net.layer_names() if n in position]
    for a, b in zip(names, names[1:]):
        if position[a] > position[b]:
            hint = " (CaffeNet's order; use caffenet)" if want == "alexnet" and {a, b} & {"pool1", "norm1"} else ""
            hint = hint or (" (AlexNet's order; use alexnet)" if want == "caffenet" else "")
            raise ModelError(f"{p}: layer {b!r} comes before {a!r}, which is not {want}'s layer order{hint}")
    with tempfile.TemporaryDirectory(prefix="preimage-") as tmp:
        proto = Path(tmp) / f"{want}-deploy.prototxt"
        proto.write_text(caffe_prototxt(net))
        cnet = load_caffe(proto, p)
    for name, m in net.named_children():
        if not isinstance(m, nn.Conv2d):
            continue
        source = cnet.layer(name)
        assert isinstance(source, (nn.Conv2d, CaffeInnerProduct)) and source.bias is not None
        m.weight = nn.Parameter(source.weight.detach().reshape(m.weight.shape))  # InnerProduct -> fc conv
        m.bias = nn.Parameter(source.bias.detach())
    if any(param.is_meta for param in net.parameters()):  # pragma: no cover - load_caffe checks every layer
        raise ModelError(f"{p}: missing weights for {want}")
    net.convention = net.convention.as_caffe()
    return net.eval()


# --------------------------------------------------------------------------------- resolver


def _builtin(arch: str, weights: Path | None) -> tuple[SequentialNet, str]:
    if weights is None:
        return build(arch), "random initialization"
    fmt = weights_format(weights)
    if fmt == "matconvnet":
        net = load_matconvnet(weights, arch)
    elif fmt == "caffemodel":
        net = load_caffemodel(weights, arch)
    else:
        net = load_torchvision(weights, arch)
    return net, str(weights)


def _caffe_name(prototxt: Path, weights: Path | None) -> str:
    if weights is not None:
        return weights.stem
    if prototxt.stem in ("deploy", "train_val", "net") and prototxt.parent.name:
        return prototxt.parent.name
    return prototxt.stem


def load_model(model: str | PathLike[str], weights: str | PathLike[str] | None = None, *,
               convention: InputConvention | None = None) -> LoadedModel:
    """Resolve ``model`` (+ ``weights``) into a :class:`LoadedModel` (see the module docstring).

    Args:
        model: ``alexnet``, ``caffenet``, ``vgg-m``, ``vgg-vd-16`` (or an alias), a Caffe
            ``deploy.prototxt`` path, or a MatConvNet ``.mat`` path.
        weights: the weights file for a built-in network (``.mat``, ``.caffemodel``, ``.pth``/``.pt``)
            or for a prototxt (``.caffemodel``); None for a ``.mat`` model, or for random weights.
        convention: overrides the input convention (e.g. another mean for a Caffe network).

    Raises:
        ModelError: unknown model, missing or unreadable files, mismatched weights (one line).
    """
    wpath = Path(weights) if weights is not None else None
    text = str(model)
    arch = canonical_arch(text) if not Path(text).suffix or not Path(text).exists() else None
    if arch is not None:
        net, source = _builtin(arch, wpath)
        return _wrap(net, net.arch, convention or net.convention, source, net.arch, net.classes)
    path = Path(text)
    suffix = path.suffix.lower()
    if suffix in (".prototxt", ".pbtxt"):
        if wpath is not None and weights_format(wpath) != "caffemodel":
            raise ModelError(f"{wpath}: a Caffe prototxt takes .caffemodel weights")
        cnet = load_caffe(path, wpath)
        size = CAFFE_CONVENTION.input_size
        if cnet.input_names and len(cnet.input_shapes[cnet.input_names[0]]) == 4:
            size = int(cnet.input_shapes[cnet.input_names[0]][2])
        conv = convention or CAFFE_CONVENTION.with_(input_size=size)
        return _wrap(cnet, _caffe_name(path, wpath), conv, str(wpath) if wpath else "random initialization", None)
    if suffix == ".mat" or (path.is_file() and suffix not in (".caffemodel",) + _TORCH_SUFFIXES
                            and weights_format(path) == "matconvnet"):
        if wpath is not None:
            raise ModelError(f"{path}: a MatConvNet .mat file holds its weights; give no separate weights file")
        net = load_matconvnet(path)
        name = net.arch if net.arch in ARCHITECTURES else path.stem
        return _wrap(net, name, convention or net.convention, str(path), net.arch if net.arch != "custom" else None,
                     net.classes)
    if suffix == ".caffemodel":
        raise ModelError(f"{path}: a .caffemodel needs its network: give the deploy.prototxt as the model and "
                         f"this file as the weights (or a built-in name: {', '.join(BUILTIN)})")
    if suffix in _TORCH_SUFFIXES:
        raise ModelError(f"{path}: a state dict has no architecture: give a built-in name ({', '.join(BUILTIN)}) "
                         f"as the model and this file as the weights")
    raise ModelError(f"unknown model {text!r}: expected a built-in network ({', '.join(BUILTIN)}), "
                     f"a Caffe deploy.prototxt or a MatConvNet .mat file")
