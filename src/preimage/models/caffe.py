"""Caffe model importer: a ``deploy.prototxt`` (+ ``.caffemodel``) as a ``torch.nn.Module``.

No Caffe installation is needed: the text prototxt is parsed with protobuf's ``text_format`` and the
binary ``.caffemodel`` with protobuf, against the schema in ``caffe.proto`` (see
:mod:`preimage.models.caffe_pb2`).  Both the current ``layer { ... }`` syntax and the old
``layers { ... }`` (V1) syntax are read, in prototxts and in caffemodels.

Usage::

    from preimage.models import load_caffe
    net = load_caffe("deploy.prototxt", "weights.caffemodel")   # a CaffeNet (nn.Module), eval mode
    scores = net(x)                        # x: (N, 3, H, W), BGR, 0..255 minus the mean
    net.layer_names(), net.blob_names()    # Caffe's names, in prototxt order
    conv5 = net(x, until="conv5")          # stop after a layer (its first top)
    feats = net.features(x, ["conv1", "fire9/concat"])   # several layers in one pass
    head = net.truncate("pool5")           # a CaffeNet of the layers up to pool5 (shared weights)
    net.layer("fire2/conv1x1_1")           # the sub-module of a layer, by its Caffe name

Semantics (Caffe's, in the TEST phase):

* Layers run in prototxt order over a dictionary of blobs, so fan-out (one blob read by several
  layers), fan-in (Concat, Eltwise) and in-place layers (``top == bottom``, e.g. ReLU) behave as in
  Caffe; layers whose ``include``/``exclude`` rules reject the TEST phase are dropped.
* Convolution: ``pad``/``kernel_size``/``stride``/``dilation`` (single or per-axis values, or the
  ``*_h``/``*_w`` forms), ``group``, ``bias_term`` -- exactly ``torch.nn.Conv2d``.
* Pooling (MAX, AVE): Caffe's output size ``ceil((H + 2p - k) / s) + 1`` (``round_mode: FLOOR`` uses
  floor), minus one when padding is used and the last window would start in the padding; windows
  are clipped to the image; MAX ignores the padding; AVE divides by the window's size clipped to
  the padded image (so padding counts, the ceil overhang does not).  ``global_pooling``.
* LRN: ACROSS_CHANNELS ``x / (k + alpha/n * sum_{n channels centred on c} x^2)^beta`` and
  WITHIN_CHANNEL ``x / (1 + alpha/n^2 * sum_{n x n window} x^2)^beta`` (zero padding; odd n, as
  Caffe requires).  ``torch.nn.LocalResponseNorm`` uses the same ``alpha/n`` convention for odd n
  (``tests/test_caffe.py`` checks both against a literal port of Caffe's loops).
* InnerProduct flattens from ``axis`` (default 1) in Caffe's C, H, W order (``transpose`` honoured).
* ReLU (``negative_slope``), Dropout (identity, as at test time), Softmax (``axis``), Concat
  (``axis``/``concat_dim``), Split, Eltwise (SUM with ``coeff``, PROD, MAX), Flatten, Sigmoid,
  TanH, Power, BatchNorm (stored statistics / scale factor, ``eps``) and Scale (learned, one bottom).
* Inputs: ``input:`` with ``input_shape`` or ``input_dim`` (four per input), or ``Input`` layers.
  The batch size and (for fully convolutional parts) the spatial size may differ at run time.

Layer names and modules.  Every layer except ``Input`` is a sub-module of the :class:`CaffeNet`
whose attribute name is the Caffe layer name *sanitized*: each character other than an ASCII
letter, digit or underscore becomes ``_`` (``fire2/conv1x1_1`` -> ``fire2_conv1x1_1``,
``conv1.1`` -> ``conv1_1``); if that name is already taken (by an earlier layer or by an
attribute of the module) ``_2``, ``_3``, ... is appended.  ``CaffeNet.module_names`` maps Caffe
names to these names (``CaffeNet.layer_for_module`` the other way), so ``state_dict`` keys are e.g.
``fire2_conv1x1_1.weight`` and ``dict(net.named_modules())`` finds every layer, which is what
:class:`preimage.ModuleCut` needs; methods of :class:`CaffeNet` accept the original Caffe names.

Weights are matched to layers by name (layers of the caffemodel that the prototxt does not have,
e.g. data and loss layers of a training net, are ignored).  Shapes are checked with Caffe's rule
(a legacy 4D ``num/channels/height/width`` blob matches when the expected shape, left-padded with
ones to 4 axes, is equal).  Every problem -- missing file, unparsable prototxt or caffemodel,
unsupported layer type, missing or mis-shaped weights -- raises :class:`ModelError` (a
``ValueError``) with a one-line message.
"""

from __future__ import annotations

import copy
import math
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import native
from . import caffe_pb2
from .pooling import max_pool2d

__all__ = [
    "CaffeLayer",
    "CaffeNet",
    "ModelError",
    "SUPPORTED_LAYERS",
    "caffe_pool_output_size",
    "load_blobproto",
    "load_caffe",
    "read_caffemodel",
    "read_prototxt",
    "sanitize_name",
]

Shape = tuple[int, ...]
_FLT_MAX = float(np.finfo(np.float32).max)


class ModelError(ValueError):
    """A model file that cannot be imported (the message says which file and why, on one line)."""


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


# ----------------------------------------------------------------------------- file reading


def _check_file(path: str | PathLike[str], what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"{p}: no such {what} file" if not p.exists() else f"{p}: not a file ({what})")
    return p


def read_prototxt(path: str | PathLike[str]) -> Any:
    """Parse a text prototxt into a ``caffe.NetParameter`` message.

    Fields that preimage's reduced schema does not know (training-only parameters such as
    ``data_param``) are skipped with a warning instead of failing the parse.
    """
    from google.protobuf import text_format

    p = _check_file(path, "Caffe prototxt")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ModelError(f"{p}: not a text prototxt (binary data; is it a .caffemodel?)") from None
    net = caffe_pb2.NetParameter()
    try:
        text_format.Parse(text, net)
    except text_format.ParseError as err:
        if "no field named" not in str(err):
            raise ModelError(f"{p}: cannot parse the prototxt: {_one_line(err)}") from None
        net = caffe_pb2.NetParameter()
        try:
            text_format.Parse(text, net, allow_unknown_field=True)
        except text_format.ParseError as err2:
            raise ModelError(f"{p}: cannot parse the prototxt: {_one_line(err2)}") from None
        warnings.warn(f"{p}: ignored fields unknown to preimage's Caffe schema ({_one_line(err)})", stacklevel=3)
    return net


def read_caffemodel(path: str | PathLike[str]) -> Any:
    """Parse a binary ``.caffemodel`` into a ``caffe.NetParameter`` message."""
    from google.protobuf.message import DecodeError

    p = _check_file(path, "caffemodel")
    net = caffe_pb2.NetParameter()
    try:
        net.ParseFromString(p.read_bytes())
    except (DecodeError, RuntimeError, ValueError) as err:
        raise ModelError(f"{p}: cannot parse the caffemodel (not a binary Caffe NetParameter?): {_one_line(err)}") from None
    if len(net.layer) == 0 and len(net.layers) == 0:
        raise ModelError(f"{p}: the caffemodel contains no layers (not a Caffe model?)")
    return net


# -------------------------------------------------------------------------- blob decoding


def _read_varint(buf: bytes | memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def _blob_values(blob: Any) -> np.ndarray:
    """The values of a ``BlobProto`` as float32 (``double_data`` wins when present, as in Caffe).

    The packed ``data``/``double_data`` payloads are read straight from the blob's wire format
    with ``numpy.frombuffer`` (iterating a large repeated field in Python would be slow);
    ``data`` sent unpacked is handled too.
    """
    raw = memoryview(blob.SerializeToString())
    floats: list[np.ndarray] = []
    doubles: list[np.ndarray] = []
    pos = 0
    while pos < len(raw):
        key, pos = _read_varint(raw, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _read_varint(raw, pos)
        elif wire == 1:
            if number == 8:
                doubles.append(np.frombuffer(raw[pos:pos + 8], dtype="<f8"))
            pos += 8
        elif wire == 5:
            if number == 5:
                floats.append(np.frombuffer(raw[pos:pos + 4], dtype="<f4"))
            pos += 4
        elif wire == 2:
            length, pos = _read_varint(raw, pos)
            if number == 5:
                floats.append(np.frombuffer(raw[pos:pos + length], dtype="<f4"))
            elif number == 8:
                doubles.append(np.frombuffer(raw[pos:pos + length], dtype="<f8"))
            pos += length
        else:  # groups: never produced by Caffe
            return np.asarray(blob.double_data if len(blob.double_data) else blob.data, dtype=np.float32)
    if doubles:
        return np.concatenate(doubles).astype(np.float32)
    if floats:
        return np.concatenate(floats).astype(np.float32, copy=True)
    return np.zeros(0, dtype=np.float32)


def _blob_is_legacy(blob: Any) -> bool:
    return any(blob.HasField(f) for f in ("num", "channels", "height", "width"))


def _blob_shape(blob: Any) -> Shape:
    """The shape a ``BlobProto`` declares (legacy 4D num/channels/height/width, or ``shape``)."""
    if _blob_is_legacy(blob):
        return (int(blob.num), int(blob.channels), int(blob.height), int(blob.width))
    return tuple(int(d) for d in blob.shape.dim)


def _blob_matches(blob: Any, expected: Shape) -> bool:
    """Caffe's ``Blob::ShapeEquals``: legacy 4D blobs compare with ``expected`` left-padded by ones."""
    if _blob_is_legacy(blob):
        return len(expected) <= 4 and (1,) * (4 - len(expected)) + tuple(expected) == _blob_shape(blob)
    return _blob_shape(blob) == tuple(expected)


def load_blobproto(path: str | PathLike[str]) -> np.ndarray:
    """Read a binary ``BlobProto`` file (e.g. Caffe's ``imagenet_mean.binaryproto``) as float32."""
    from google.protobuf.message import DecodeError

    p = _check_file(path, "binaryproto")
    blob = caffe_pb2.BlobProto()
    try:
        blob.ParseFromString(p.read_bytes())
    except (DecodeError, RuntimeError, ValueError) as err:
        raise ModelError(f"{p}: cannot parse the BlobProto: {_one_line(err)}") from None
    shape = _blob_shape(blob)
    values = _blob_values(blob)
    if values.size != math.prod(shape):
        raise ModelError(f"{p}: the blob declares shape {shape} but holds {values.size} values")
    return values.reshape(shape)


# ------------------------------------------------------------------------------- layer modules


def caffe_pool_output_size(size: int, kernel: int, stride: int, pad: int, ceil: bool = True) -> int:
    """Caffe's pooled size along one axis (``PoolingLayer::Reshape``).

    ``ceil((size + 2 pad - kernel) / stride) + 1`` (floor with ``round_mode: FLOOR``), minus one if
    padding is used and the last window would start at or beyond ``size + pad`` -- that is, Caffe
    clips the last window so that it starts inside the image.
    """
    span = size + 2 * pad - kernel
    out = (-(-span // stride) if ceil else span // stride) + 1
    if pad > 0 and (out - 1) * stride >= size + pad:
        out -= 1
    return out


class _GlobalAverage(torch.autograd.Function):
    """The mean over each map, whose gradient is the output's, divided and broadcast (stride 0).

    ``x.mean``'s own backward divides after broadcasting, which writes a full-size gradient in
    NCHW order; the channels-last ReLU before SqueezeNet's pool_final then read the two layouts
    together: 4.8 ms per batch of 16 in bf16, against 0.7 ms for a broadcast gradient.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:  # type: ignore[override]
        ctx.shape = x.shape
        return x.mean(dim=(-2, -1), keepdim=True)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # type: ignore[override]
        height, width = ctx.shape[-2:]
        return (grad / (height * width)).expand(ctx.shape)  # (grad has the output's, i.e. x's, dtype)


def global_average(x: Tensor) -> Tensor:
    """``x.mean((-2, -1), keepdim=True)`` with a broadcast gradient (:class:`_GlobalAverage`)."""
    if torch.is_grad_enabled() and x.requires_grad and x.dim() == 4:
        return _GlobalAverage.apply(x)
    return x.mean(dim=(-2, -1), keepdim=True)


class CaffePooling(nn.Module):
    """Caffe's Pooling layer (MAX or AVE), with Caffe's output size and window clipping."""

    def __init__(self, method: str, kernel: tuple[int, int], stride: tuple[int, int], pad: tuple[int, int],
                 *, global_pooling: bool = False, ceil: bool = True) -> None:
        super().__init__()
        if method not in ("MAX", "AVE"):
            raise ValueError(f"unsupported pooling method {method!r}")
        self.method, self.kernel, self.stride, self.pad = method, kernel, stride, pad
        self.global_pooling, self.ceil = global_pooling, ceil
        self.relu_first = False  # pool F.relu(x) (see fused_with_relu)

    def fused_with_relu(self) -> CaffePooling:
        """This max pooling applied to ``F.relu(x)``, the ReLU fused into the pooling kernel
        (:func:`~preimage.models.pooling.max_pool2d`): a copy, for a ReLU whose output only this
        pooling reads (see :func:`~preimage.models.fusion.fuse_relu_pool`)."""
        if self.method != "MAX" or self.global_pooling:
            raise ValueError("only max pooling takes a ReLU in")
        fused = copy.copy(self)
        fused.relu_first = True
        return fused

    def extra_repr(self) -> str:
        if self.global_pooling:
            return f"{self.method}, global"
        return (f"{self.method}, kernel={self.kernel}, stride={self.stride}, pad={self.pad}, "
                f"round={'ceil' if self.ceil else 'floor'}")

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """The pooled (height, width) for an input of the given size."""
        if self.global_pooling:
            return 1, 1
        return (caffe_pool_output_size(height, self.kernel[0], self.stride[0], self.pad[0], self.ceil),
                caffe_pool_output_size(width, self.kernel[1], self.stride[1], self.pad[1], self.ceil))

    def forward(self, x: Tensor) -> Tensor:
        if self.global_pooling:
            return x.amax(dim=(-2, -1), keepdim=True) if self.method == "MAX" else global_average(x)
        (kh, kw), (sh, sw), (ph, pw) = self.kernel, self.stride, self.pad
        height, width = x.shape[-2:]
        oh, ow = self.output_size(height, width)
        if ph <= kh // 2 and pw <= kw // 2:
            # torch's pooling clips windows exactly like Caffe; its output size differs from Caffe's
            # only without padding, by one trailing window that lies wholly outside the image.
            if self.method == "MAX":
                y = max_pool2d(x, self.kernel, self.stride, self.pad, self.ceil, relu=self.relu_first)
            else:
                y = F.avg_pool2d(x, self.kernel, self.stride, self.pad, ceil_mode=self.ceil, count_include_pad=True)
            extra_h, extra_w = oh - y.shape[-2], ow - y.shape[-1]
            if extra_h or extra_w:
                y = F.pad(y, (0, extra_w, 0, extra_h), value=-_FLT_MAX if self.method == "MAX" else 0.0)
            return y
        return self._general(F.relu(x) if self.relu_first else x, oh, ow)

    def _general(self, x: Tensor, oh: int, ow: int) -> Tensor:
        """Any geometry (padding over half the kernel): explicit padding + unpadded pooling."""
        (kh, kw), (sh, sw), (ph, pw) = self.kernel, self.stride, self.pad
        height, width = x.shape[-2:]
        # pad (or crop) so that exactly oh x ow windows fit, window i starting at i*s - p
        bottom, right = (oh - 1) * sh + kh - height - ph, (ow - 1) * sw + kw - width - pw
        if self.method == "MAX":
            xp = F.pad(x, (pw, right, ph, bottom), value=-math.inf)
            return max_pool2d(xp, self.kernel, self.stride, (0, 0), False).clamp_min(-_FLT_MAX)  # empty window: -FLT_MAX
        sums = F.avg_pool2d(F.pad(x, (pw, right, ph, bottom)), self.kernel, self.stride, divisor_override=1)

        def sizes(n_out: int, size: int, k: int, s: int, p: int) -> Tensor:
            start = torch.arange(n_out, device=x.device) * s - p
            return ((start + k).clamp(max=size + p) - start).clamp(min=1)

        div = sizes(oh, height, kh, sh, ph)[:, None] * sizes(ow, width, kw, sw, pw)[None, :]
        return sums / div.to(sums.dtype)


class _CrossChannelLRN(torch.autograd.Function):
    """ACROSS_CHANNELS LRN, ``y = x * s^-beta`` with ``s = k + alpha/n * band(x^2)``, and its
    gradient in closed form (issue 5).

    With ``B`` the symmetric band matrix, ``dL/dx = g * s^-beta - (2 alpha beta / n) * x *
    B(g * y / s)``: the backward pass reuses ``s^-beta`` and ``y`` from the forward pass instead
    of differentiating ``pow`` (a second ``pow``, the slowest op of the layer) and half a dozen
    element-wise products.  The factors ``alpha/n`` and ``k`` ride in the forward band
    convolution's weights and bias, ``-2 alpha beta / n`` in the backward one's.  Measured on
    AlexNet's norm1 (16 x 96 x 55 x 55): forward + backward 34 -> 15 ms in bf16, 65 -> 33 ms in fp32.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, forward_band: Tensor, k: Tensor, backward_band: Tensor, beta: float) -> Tensor:
        scale = F.conv2d(x * x, forward_band, k)
        u = scale.pow(-beta)
        y = x * u
        ctx.save_for_backward(x, scale, u, y, backward_band)
        return y

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        x, scale, u, y, backward_band = ctx.saved_tensors
        spread = F.conv2d(torch.mul(g, y).div_(scale), backward_band)
        return torch.addcmul(g * u, x, spread), None, None, None, None


class _NativeLRN(torch.autograd.Function):
    """ACROSS_CHANNELS LRN through :func:`preimage.native.lrn` (CPU, fp32 / bf16, NCHW or
    channels-last): one pass each way, fp32 arithmetic, the backward pass recomputing the scale
    from ``x`` (reads ``x`` and the output gradient, writes the input gradient).  Measured on 2
    cores, AlexNet's norm1 + norm2 forward + backward, channels-last, per image at batch 16:
    fp32 2.84 -> 0.77 ms, bf16 1.83 -> 0.45 ms (against :class:`_CrossChannelLRN`, which CUDA
    keeps)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, size: int, alpha: float, beta: float, k: float) -> Tensor:
        ctx.save_for_backward(x)
        ctx.params = (size, alpha, beta, k)
        y = native.lrn(x, size, alpha, beta, k)
        assert y is not None
        return y

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        (x,) = ctx.saved_tensors
        return native.lrn(x, *ctx.params, grad=g), None, None, None, None


class CaffeLRN(nn.Module):
    """Caffe's LRN layer.

    ACROSS_CHANNELS: ``y = x / (k + alpha/n * sum_{c'=c-(n-1)/2}^{c+(n-1)/2} x_{c'}^2)^beta``
    (channels outside the blob count as zero).  WITHIN_CHANNEL: ``y = x / (1 + alpha/n^2 *
    sum_{n x n window} x^2)^beta`` with zero padding (Caffe ignores ``k`` there).
    """

    def __init__(self, local_size: int, alpha: float, beta: float, k: float, across_channels: bool = True) -> None:
        super().__init__()
        if local_size % 2 != 1:
            raise ValueError("LRN only supports odd values for local_size")
        self.local_size, self.alpha, self.beta, self.k = local_size, alpha, beta, k
        self.across_channels = across_channels
        self._bands: dict[tuple[Any, ...], tuple[Tensor, Tensor, Tensor]] = {}

    def extra_repr(self) -> str:
        region = "ACROSS_CHANNELS" if self.across_channels else "WITHIN_CHANNEL"
        return f"{region}, local_size={self.local_size}, alpha={self.alpha}, beta={self.beta}, k={self.k}"

    def band(self, channels: int, like: Tensor) -> Tensor:
        """The ``(C, C, 1, 1)`` 0/1 matrix summing each channel's ``n`` neighbours (a 1x1 conv)."""
        half = (self.local_size - 1) // 2
        idx = torch.arange(channels, device=like.device)
        band = ((idx[:, None] - idx[None, :]).abs() <= half).to(like.dtype)
        return band[:, :, None, None]

    def _cross_channel_weights(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The forward band ``alpha/n * B``, the bias ``k`` and the backward band
        ``-2 alpha beta / n * B`` for ``x``'s channels, dtype, device and layout (cached)."""
        layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        key = (x.shape[1], x.dtype, x.device, layout)
        if key not in self._bands:
            band = self.band(x.shape[1], x).double()
            n = self.local_size
            self._bands[key] = (
                (band * (self.alpha / n)).to(x.dtype).contiguous(memory_format=layout),
                torch.full((x.shape[1],), float(self.k), dtype=x.dtype, device=x.device),
                (band * (-2.0 * self.alpha * self.beta / n)).to(x.dtype).contiguous(memory_format=layout),
            )
        return self._bands[key]

    def forward(self, x: Tensor) -> Tensor:
        if self.across_channels:
            if native.lrn_layout(x) is not None:  # the C kernels: one pass each way
                if torch.is_grad_enabled() and x.requires_grad:
                    return _NativeLRN.apply(x, self.local_size, self.alpha, self.beta, self.k)
                return native.lrn(x, self.local_size, self.alpha, self.beta, self.k)
            # Elsewhere the window sum over channels as a banded 1x1 convolution: a matrix
            # product, fast in fp32 and bf16 alike (a 3-d average pool has no fast bf16 CPU
            # kernel), and the same zero padding of missing channels; the gradient in closed form.
            forward_band, k, backward_band = self._cross_channel_weights(x)
            return _CrossChannelLRN.apply(x, forward_band, k, backward_band, self.beta)
        n, half = self.local_size, (self.local_size - 1) // 2
        mean = F.avg_pool2d(x * x, n, stride=1, padding=half, count_include_pad=True)
        return x * (mean * self.alpha + 1.0).pow(-self.beta)


class CaffeInnerProduct(nn.Linear):
    """Caffe's InnerProduct: flatten from ``axis`` (C, H, W order for NCHW) and apply ``W x + b``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, axis: int = 1) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.axis = axis

    def extra_repr(self) -> str:
        return super().extra_repr() + f", axis={self.axis}"

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x.flatten(self.axis), self.weight, self.bias)


class CaffeDropout(nn.Module):
    """Caffe's Dropout at test time: the identity (Caffe scales at training time)."""

    def __init__(self, ratio: float = 0.5) -> None:
        super().__init__()
        self.ratio = ratio

    def extra_repr(self) -> str:
        return f"ratio={self.ratio} (identity: test phase)"

    def forward(self, x: Tensor) -> Tensor:
        return x


class CaffeConcat(nn.Module):
    """Caffe's Concat along ``axis``."""

    def __init__(self, axis: int = 1) -> None:
        super().__init__()
        self.axis = axis

    def extra_repr(self) -> str:
        return f"axis={self.axis}"

    def forward(self, *xs: Tensor) -> Tensor:
        return torch.cat(xs, dim=self.axis)


class CaffeSplit(nn.Module):
    """Caffe's Split: the same blob under several names."""

    def __init__(self, n_tops: int) -> None:
        super().__init__()
        self.n_tops = n_tops

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        return (x,) * self.n_tops


class CaffeEltwise(nn.Module):
    """Caffe's Eltwise: SUM (with optional per-input ``coeff``), PROD or MAX."""

    def __init__(self, operation: str = "SUM", coeff: Sequence[float] = ()) -> None:
        super().__init__()
        self.operation, self.coeff = operation, tuple(float(c) for c in coeff)

    def extra_repr(self) -> str:
        return f"{self.operation}" + (f", coeff={self.coeff}" if self.coeff else "")

    def forward(self, *xs: Tensor) -> Tensor:
        if self.operation == "PROD":
            out = xs[0]
            for x in xs[1:]:
                out = out * x
            return out
        if self.operation == "MAX":
            out = xs[0]
            for x in xs[1:]:
                out = torch.maximum(out, x)
            return out
        coeff = self.coeff or (1.0,) * len(xs)
        out = xs[0] * coeff[0] if coeff[0] != 1.0 else xs[0]
        for c, x in zip(coeff[1:], xs[1:]):
            out = out + (x * c if c != 1.0 else x)
        return out


class CaffePower(nn.Module):
    """Caffe's Power: ``(shift + scale * x) ** power``."""

    def __init__(self, power: float = 1.0, scale: float = 1.0, shift: float = 0.0) -> None:
        super().__init__()
        self.power, self.scale, self.shift = power, scale, shift

    def extra_repr(self) -> str:
        return f"power={self.power}, scale={self.scale}, shift={self.shift}"

    def forward(self, x: Tensor) -> Tensor:
        y = x * self.scale + self.shift if (self.scale != 1.0 or self.shift != 0.0) else x
        return y if self.power == 1.0 else y.pow(self.power)


class CaffeBatchNorm(nn.Module):
    """Caffe's BatchNorm (no affine part: Caffe puts that in a following Scale layer).

    With global statistics (the TEST-phase default) ``y = (x - mean) / sqrt(var + eps)`` where
    ``mean`` and ``var`` are Caffe's stored sums divided by the stored scale factor.
    """

    def __init__(self, channels: int, eps: float = 1e-5, use_global_stats: bool = True) -> None:
        super().__init__()
        self.eps, self.use_global_stats = eps, use_global_stats
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("var", torch.ones(channels))

    def extra_repr(self) -> str:
        return f"{self.mean.numel()}, eps={self.eps}, use_global_stats={self.use_global_stats}"

    def forward(self, x: Tensor) -> Tensor:
        view = (1, -1) + (1,) * (x.dim() - 2)
        if self.use_global_stats:
            mean, var = self.mean.view(view), self.var.view(view)
        else:
            dims = [0] + list(range(2, x.dim()))
            mean, var = x.mean(dim=dims, keepdim=True), x.var(dim=dims, unbiased=False, keepdim=True)
        return (x - mean) / torch.sqrt(var + self.eps)


class CaffeScale(nn.Module):
    """Caffe's Scale with a learned factor (one bottom): ``y = x * gamma (+ beta)`` over ``axis``."""

    def __init__(self, shape: Shape, axis: int = 1, bias: bool = False) -> None:
        super().__init__()
        self.axis = axis
        self.weight = nn.Parameter(torch.ones(shape))
        self.bias = nn.Parameter(torch.zeros(shape)) if bias else None

    def extra_repr(self) -> str:
        return f"shape={tuple(self.weight.shape)}, axis={self.axis}, bias={self.bias is not None}"

    def forward(self, x: Tensor) -> Tensor:
        axis = self.axis % x.dim()
        view = tuple(self.weight.shape) + (1,) * (x.dim() - axis - self.weight.dim())
        y = x * self.weight.view(view)
        return y + self.bias.view(view) if self.bias is not None else y


# ------------------------------------------------------------------------ building the layers

_V1_TYPES: dict[str, str] = {
    "ABSVAL": "AbsVal", "ACCURACY": "Accuracy", "ARGMAX": "ArgMax", "BNLL": "BNLL", "CONCAT": "Concat",
    "CONTRASTIVE_LOSS": "ContrastiveLoss", "CONVOLUTION": "Convolution", "DATA": "Data",
    "DECONVOLUTION": "Deconvolution", "DROPOUT": "Dropout", "DUMMY_DATA": "DummyData",
    "EUCLIDEAN_LOSS": "EuclideanLoss", "ELTWISE": "Eltwise", "EXP": "Exp", "FLATTEN": "Flatten",
    "HDF5_DATA": "HDF5Data", "HDF5_OUTPUT": "HDF5Output", "HINGE_LOSS": "HingeLoss", "IM2COL": "Im2col",
    "IMAGE_DATA": "ImageData", "INFOGAIN_LOSS": "InfogainLoss", "INNER_PRODUCT": "InnerProduct",
    "LRN": "LRN", "MEMORY_DATA": "MemoryData", "MULTINOMIAL_LOGISTIC_LOSS": "MultinomialLogisticLoss",
    "MVN": "MVN", "POOLING": "Pooling", "POWER": "Power", "RELU": "ReLU", "SIGMOID": "Sigmoid",
    "SIGMOID_CROSS_ENTROPY_LOSS": "SigmoidCrossEntropyLoss", "SILENCE": "Silence", "SOFTMAX": "Softmax",
    "SOFTMAX_LOSS": "SoftmaxWithLoss", "SPLIT": "Split", "SLICE": "Slice", "TANH": "TanH",
    "WINDOW_DATA": "WindowData", "THRESHOLD": "Threshold",
}


def _layer_type(layer: Any) -> str:
    """The (new-style) type string of a LayerParameter or V1LayerParameter."""
    if isinstance(layer, caffe_pb2.V1LayerParameter):
        enum_name = caffe_pb2.V1LayerParameter.LayerType.Name(layer.type)
        return _V1_TYPES.get(enum_name, enum_name)
    return str(layer.type)


@dataclass
class _Built:
    """A layer's module, its top shapes, the shapes of its parameter blobs and how to set them."""

    module: nn.Module | None
    tops: list[Shape]
    blob_shapes: list[Shape] = field(default_factory=list)
    assign: Callable[[list[np.ndarray]], None] | None = None


class _Error(Exception):
    """Raised by layer builders; the loader turns it into a ModelError naming file and layer."""


def _one_top(layer: Any, bottoms: list[Shape], n_bottoms: int | None = 1) -> None:
    if n_bottoms is not None and len(bottoms) != n_bottoms:
        raise _Error(f"expects {n_bottoms} bottom blob(s), got {len(bottoms)}")
    if len(layer.top) != 1:
        raise _Error(f"expects 1 top blob, got {len(layer.top)}")


def _axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise _Error(f"axis {axis} out of range for a {ndim}-axis blob")
    return axis % ndim


def _spatial(values: Sequence[int], has_h: bool, h: int, has_w: bool, w: int, default: int, what: str) -> tuple[int, int]:
    """Caffe's 2D parameter rule: ``*_h``/``*_w`` if given, else 1 or 2 repeated values, else ``default``."""
    if has_h or has_w:
        if len(values):
            raise _Error(f"{what} given both as {what} and as {what}_h/{what}_w")
        return int(h), int(w)
    if len(values) == 0:
        return default, default
    if len(values) == 1:
        return int(values[0]), int(values[0])
    if len(values) == 2:
        return int(values[0]), int(values[1])
    raise _Error(f"{what} has {len(values)} values; only 2D convolution is supported")


def _tensor(a: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def _build_convolution(layer: Any, bottoms: list[Shape]) -> _Built:
    _one_top(layer, bottoms)
    p = layer.convolution_param
    (shape,) = bottoms
    if len(shape) != 4 or p.axis not in (1, -3):
        raise _Error("only 2D convolution of NCHW blobs (axis 1) is supported")
    kernel = _spatial(p.kernel_size, p.HasField("kernel_h"), p.kernel_h, p.HasField("kernel_w"), p.kernel_w, 0, "kernel_size")
    if min(kernel) <= 0:
        raise _Error("kernel_size must be given and positive")
    pad = _spatial(p.pad, p.HasField("pad_h"), p.pad_h, p.HasField("pad_w"), p.pad_w, 0, "pad")
    stride = _spatial(p.stride, p.HasField("stride_h"), p.stride_h, p.HasField("stride_w"), p.stride_w, 1, "stride")
    dilation = _spatial(p.dilation, False, 0, False, 0, 1, "dilation")
    channels, groups, n_out = shape[1], int(p.group), int(p.num_output)
    if n_out <= 0:
        raise _Error("num_output must be positive")
    if channels % groups or n_out % groups:
        raise _Error(f"group {groups} does not divide the {channels} input / {n_out} output channels")
    out_hw = tuple((size + 2 * pp - (d * (k - 1) + 1)) // s + 1
                   for size, pp, k, s, d in zip(shape[2:], pad, kernel, stride, dilation))
    if min(out_hw) <= 0:
        raise _Error(f"the kernel does not fit the {shape[2]}x{shape[3]} input")
    conv = nn.Conv2d(channels, n_out, kernel, stride=stride, padding=pad, dilation=dilation, groups=groups,
                     bias=bool(p.bias_term))
    blob_shapes: list[Shape] = [(n_out, channels // groups) + kernel]
    if p.bias_term:
        blob_shapes.append((n_out,))

    def assign(blobs: list[np.ndarray]) -> None:
        with torch.no_grad():
            conv.weight.copy_(_tensor(blobs[0]))
            if conv.bias is not None:
                conv.bias.copy_(_tensor(blobs[1]))

    return _Built(conv, [(shape[0], n_out) + out_hw], blob_shapes, assign)


def _build_pooling(layer: Any, bottoms: list[Shape]) -> _Built:
    _one_top(layer, bottoms)
    p = layer.pooling_param
    (shape,) = bottoms
    if len(shape) != 4:
        raise _Error("pooling needs a 4-axis (N, C, H, W) blob")
    method = caffe_pb2.PoolingParameter.PoolMethod.Name(p.pool)
    if method not in ("MAX", "AVE"):
        raise _Error(f"pooling method {method} is not supported (MAX, AVE)")
    ceil = p.round_mode == caffe_pb2.PoolingParameter.RoundMode.Value("CEIL")
    if p.global_pooling:
        if p.HasField("kernel_size") or p.HasField("kernel_h") or p.HasField("kernel_w"):
            raise _Error("with global_pooling, the kernel size cannot be specified")
        if p.pad or p.pad_h or p.pad_w or p.stride_h not in (0, 1) or p.stride_w not in (0, 1) or p.stride != 1:
            raise _Error("with global_pooling, pad must be 0 and stride 1")
        module = CaffePooling(method, (shape[2], shape[3]), (1, 1), (0, 0), global_pooling=True)
        return _Built(module, [(shape[0], shape[1], 1, 1)])
    if p.HasField("kernel_h") or p.HasField("kernel_w"):
        if p.HasField("kernel_size"):
            raise _Error("kernel given both as kernel_size and as kernel_h/kernel_w")
        kernel = (int(p.kernel_h), int(p.kernel_w))
    elif p.HasField("kernel_size"):
        kernel = (int(p.kernel_size), int(p.kernel_size))
    else:
        raise _Error("pooling needs kernel_size (or kernel_h and kernel_w) or global_pooling")
    pad = (int(p.pad_h), int(p.pad_w)) if (p.HasField("pad_h") or p.HasField("pad_w")) else (int(p.pad),) * 2
    if p.HasField("stride_h") or p.HasField("stride_w"):
        stride = (int(p.stride_h), int(p.stride_w))
    else:
        stride = (int(p.stride),) * 2
    if min(kernel) <= 0 or min(stride) <= 0:
        raise _Error("kernel and stride must be positive")
    if pad[0] >= kernel[0] or pad[1] >= kernel[1]:
        raise _Error("pad must be smaller than the kernel")
    module = CaffePooling(method, kernel, stride, pad, ceil=ceil)
    oh, ow = module.output_size(shape[2], shape[3])
    if oh <= 0 or ow <= 0:
        raise _Error(f"the kernel does not fit the {shape[2]}x{shape[3]} input")
    return _Built(module, [(shape[0], shape[1], oh, ow)])


def _build_lrn(layer: Any, bottoms: list[Shape]) -> _Built:
    _one_top(layer, bottoms)
    p = layer.lrn_param
    if p.local_size % 2 != 1:
        raise _Error("LRN only supports odd values for local_size")
    across = p.norm_region == caffe_pb2.LRNParameter.NormRegion.Value("ACROSS_CHANNELS")
    return _Built(CaffeLRN(int(p.local_size), float(p.alpha), float(p.beta), float(p.k), across), [bottoms[0]])


def _build_inner_product(layer: Any, bottoms: list[Shape]) -> _Built:
    _one_top(layer, bottoms)
    p = layer.inner_product_param
    (shape,) = bottoms
    axis = _axis(int(p.axis), len(shape))
    n_out, k = int(p.num_output), math.prod(shape[axis:])
    if n_out <= 0:
        raise _Error("num_output must be positive")
    ip = CaffeInnerProduct(k, n_out, bias=bool(p.bias_term), axis=axis)
    blob_shapes: list[Shape] = [(k, n_out) if p.transpose else (n_out, k)]
    if p.bias_term:
        blob_shapes.append((n_out,))

    def assign(blobs: list[np.ndarray]) -> None:
        w = blobs[0].reshape(blob_shapes[0])
        with torch.no_grad():
            ip.weight.copy_(_tensor(w.T if p.transpose else w))
            if ip.bias is not None:
                ip.bias.copy_(_tensor(blobs[1]))

    return _Built(ip, [shape[:axis] + (n_out,)], blob_shapes, assign)


def _build_relu(layer: Any, bottoms: list[Shape]) -> _Built:
    _one_top(layer, bottoms)
    slope = float(layer.relu_param.negative_slope)
    return _Built(nn.LeakyReLU(slope) if slope != 0.0 else nn.ReLU(), [bottoms[0]])


def _build_dropout(layer: Any, bottoms: list[Shape]) -> _Built:
    _one_top(layer, bottoms)
    return _Built(CaffeDropout(float(layer.dropout_param.dropout_ratio)), [bottoms[0]])


def _build_softmax(layer: Any, bottoms: list[Shape]) -> _Built:
    _one_top(layer, bottoms)
    return _Built(nn.Softmax(dim=_axis(int(layer.softmax_param.axis), len(bottoms[0]))), [bottoms[0]])


def _build_concat(layer: Any, bottoms: list[Shape]) -> _Built:
    _one_top(layer, bottoms, None)
    if not bottoms:
        raise _Error("Concat needs at least one bottom blob")
    p = layer.concat_param
    axis = int(p.concat_dim) if p.HasField("concat_dim") else int(p.axis)
    axis = _axis(axis, len(bottoms[0]))
    first = bottoms[0]
    for other in bottoms[1:]:
        if len(other) != len(first) or any(a != b for i, (a, b) in enumerate(zip(first, other)) if i != axis):
            raise _Error(f"cannot concatenate shapes {first} and {other} along axis {axis}")
    top = first[:axis] + (sum(s[axis] for s in bottoms),) + first[axis + 1:]
    return _Built(CaffeConcat(axis), [top])


def _build_split(layer: Any, bottoms: list[Shape]) -> _Built:
    if len(bottoms) != 1:
        raise _Error(f"expects 1 bottom blob, got {len(bottoms)}")
    return _Built(CaffeSplit(len(layer.top)), [bottoms[0]] * len(layer.top))


def _build_eltwise(layer: Any, bottoms: list[Shape]) -> _Built:
    _one_top(layer, bottoms, None)
    p = layer.eltwise_param
    op = caffe_pb2.EltwiseParameter.EltwiseOp.Name(p.operation)
    if len(bottoms) < 2:
        raise _Error("Eltwise needs at least two bottom blobs")
    if any(s != bottoms[0] for s in bottoms[1:]):
        raise _Error(f"Eltwise bottoms have different shapes {bottoms}")
    if len(p.coeff) and (op != "SUM" or len(p.coeff) != len(bottoms)):
        raise _Error("Eltwise coeff needs operation SUM and one coefficient per bottom")
    return _Built(CaffeEltwise(op, list(p.coeff)), [bottoms[0]])


def _build_flatten(layer: Any, bottoms: list[Shape]) -> _Built:
    _one_top(layer, bottoms)
    (shape,) = bottoms
    start = _axis(int(layer.flatten_param.axis), len(shape))
    end = _axis(int(layer.flatten_param.end_axis), len(shape))
    return _Built(nn.Flatten(start, end), [shape[:start] + (math.prod(shape[start:end + 1]),) + shape[end + 1:]])


def _build_elementwise(module: Callable[[], nn.Module]) -> Callable[[Any, list[Shape]], _Built]:
    def build(layer: Any, bottoms: list[Shape]) -> _Built:
        _one_top(layer, bottoms)
        return _Built(module(), [bottoms[0]])

    return build


def _build_power(layer: Any, bottoms: list[Shape]) -> _Built:
    _one_top(layer, bottoms)
    p = layer.power_param
    return _Built(CaffePower(float(p.power), float(p.scale), float(p.shift)), [bottoms[0]])


def _build_batch_norm(layer: Any, bottoms: list[Shape]) -> _Built:
    _one_top(layer, bottoms)
    p = layer.batch_norm_param
    (shape,) = bottoms
    if len(shape) < 2:
        raise _Error("BatchNorm needs a blob with a channel axis")
    use_global = bool(p.use_global_stats) if p.HasField("use_global_stats") else True  # TEST phase
    bn = CaffeBatchNorm(shape[1], float(p.eps), use_global)

    def assign(blobs: list[np.ndarray]) -> None:
        factor = float(blobs[2].reshape(-1)[0])
        factor = 0.0 if factor == 0 else 1.0 / factor
        with torch.no_grad():
            bn.mean.copy_(_tensor(blobs[0].reshape(-1) * factor))
            bn.var.copy_(_tensor(blobs[1].reshape(-1) * factor))

    return _Built(bn, [shape], [(shape[1],), (shape[1],), (1,)], assign)


def _build_scale(layer: Any, bottoms: list[Shape]) -> _Built:
    _one_top(layer, bottoms)
    p = layer.scale_param
    (shape,) = bottoms
    axis = _axis(int(p.axis), len(shape))
    end = len(shape) if p.num_axes == -1 else axis + int(p.num_axes)
    if not axis <= end <= len(shape):
        raise _Error(f"num_axes {p.num_axes} out of range")
    param_shape = shape[axis:end]
    scale = CaffeScale(param_shape, axis, bool(p.bias_term))
    blob_shapes = [param_shape] * (2 if p.bias_term else 1)

    def assign(blobs: list[np.ndarray]) -> None:
        with torch.no_grad():
            scale.weight.copy_(_tensor(blobs[0].reshape(param_shape)))
            if scale.bias is not None:
                scale.bias.copy_(_tensor(blobs[1].reshape(param_shape)))

    return _Built(scale, [shape], blob_shapes, assign)


_BUILDERS: dict[str, Callable[[Any, list[Shape]], _Built]] = {
    "Convolution": _build_convolution,
    "Pooling": _build_pooling,
    "LRN": _build_lrn,
    "InnerProduct": _build_inner_product,
    "ReLU": _build_relu,
    "Dropout": _build_dropout,
    "Softmax": _build_softmax,
    "Concat": _build_concat,
    "Split": _build_split,
    "Eltwise": _build_eltwise,
    "Flatten": _build_flatten,
    "Sigmoid": _build_elementwise(nn.Sigmoid),
    "TanH": _build_elementwise(nn.Tanh),
    "Power": _build_power,
    "BatchNorm": _build_batch_norm,
    "Scale": _build_scale,
}

SUPPORTED_LAYERS: tuple[str, ...] = ("Input",) + tuple(_BUILDERS)
"""Caffe layer types the importer understands (V1 enum types map onto these)."""


# ------------------------------------------------------------------------------------ the net


def sanitize_name(name: str) -> str:
    """A Caffe layer name as a torch module name: non ``[A-Za-z0-9_]`` characters become ``_``.

    (Uniqueness is handled by :class:`CaffeNet`, which appends ``_2``, ``_3``, ... on collisions.)
    """
    return re.sub(r"[^A-Za-z0-9_]", "_", name) or "_"


@dataclass(frozen=True)
class CaffeLayer:
    """One layer of a :class:`CaffeNet`: Caffe name and type, its module's name, bottoms and tops."""

    name: str
    type: str
    module_name: str
    bottoms: tuple[str, ...]
    tops: tuple[str, ...]


def _phase_test_includes(layer: Any) -> bool:
    """Caffe's ``Net::StateMeetsRule`` for the TEST phase, level 0 and no stages."""

    def meets(rule: Any) -> bool:
        if rule.HasField("phase") and rule.phase != caffe_pb2.NetState().phase:  # TEST
            return False
        if rule.HasField("min_level") and 0 < rule.min_level:
            return False
        if rule.HasField("max_level") and 0 > rule.max_level:
            return False
        return len(rule.stage) == 0

    if len(layer.include):
        return any(meets(r) for r in layer.include)
    return not any(meets(r) for r in layer.exclude)


class CaffeNet(nn.Module):
    """A Caffe network: layers run in prototxt order over a dictionary of blobs.

    Build one with :func:`load_caffe`.  ``forward(*inputs, until=None)`` takes one tensor per
    network input (in :attr:`input_names` order) and returns the first top of the last layer, or of
    layer ``until``.  Attributes: :attr:`layers` (list of :class:`CaffeLayer`), :attr:`input_names`,
    :attr:`input_shapes` (from the prototxt), :attr:`output_names` (blobs no later layer reads, as
    in Caffe), :attr:`module_names` (Caffe layer name -> module attribute name) and
    :attr:`layer_for_module` (the reverse).  The network is created in evaluation mode.
    """

    def __init__(self, layers: Sequence[CaffeLayer], modules: Mapping[str, nn.Module],
                 input_shapes: Mapping[str, Shape], name: str = "", blob_shapes: Mapping[str, Shape] | None = None) -> None:
        super().__init__()
        self.name = name
        self.layers: list[CaffeLayer] = list(layers)
        self.input_names: list[str] = list(input_shapes)
        self.input_shapes: dict[str, Shape] = dict(input_shapes)
        self.module_names: dict[str, str] = {layer.name: layer.module_name for layer in self.layers}
        self.layer_for_module: dict[str, str] = {layer.module_name: layer.name for layer in self.layers}
        self._blob_shapes: dict[str, Shape] = dict(blob_shapes or {})
        for layer in self.layers:
            self.add_module(layer.module_name, modules[layer.module_name])
        outputs: list[str] = list(self.input_names)  # Caffe: blobs left unconsumed at the end
        for layer in self.layers:
            outputs = [b for b in outputs if b not in layer.bottoms]
            outputs += [t for t in layer.tops if t not in outputs]
        self.output_names: list[str] = outputs
        self.eval()

    # --- introspection

    def layer_names(self) -> list[str]:
        """Caffe layer names, in execution order (``Input`` layers excluded)."""
        return [layer.name for layer in self.layers]

    def blob_names(self) -> list[str]:
        """Blob names in order of first production (network inputs first)."""
        names = list(self.input_names)
        for layer in self.layers:
            names += [t for t in layer.tops if t not in names]
        return names

    def blob_shapes(self) -> dict[str, Shape]:
        """Blob shapes inferred for the prototxt's input shapes (batch size included)."""
        return dict(self._blob_shapes)

    def layer(self, name: str) -> nn.Module:
        """The sub-module of the layer with Caffe name ``name``."""
        return self.get_submodule(self._module_name(name))

    def _module_name(self, name: str) -> str:
        if name in self.module_names:
            return self.module_names[name]
        if name in self.layer_for_module:  # accept the sanitized name too
            return name
        shown = ", ".join(self.layer_names()[:10]) + (", ..." if len(self.layers) > 10 else "")
        raise ModelError(f"no layer named {name!r} in the network (layers: {shown})")

    def _index(self, name: str) -> int:
        module_name = self._module_name(name)
        return next(i for i, layer in enumerate(self.layers) if layer.module_name == module_name)

    # --- running

    def _run(self, inputs: Sequence[Tensor], stop: int, capture: Mapping[int, str] | None = None,
             ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        if len(inputs) != len(self.input_names):
            raise ModelError(f"the network takes {len(self.input_names)} input(s) "
                             f"({', '.join(self.input_names)}), got {len(inputs)}")
        blobs: dict[str, Tensor] = dict(zip(self.input_names, inputs))
        captured: dict[str, Tensor] = {}
        for i, layer in enumerate(self.layers[:stop + 1]):
            module = getattr(self, layer.module_name)
            out = module(*[blobs[b] for b in layer.bottoms])
            tops = out if isinstance(out, tuple) else (out,)
            blobs.update(zip(layer.tops, tops))
            if capture is not None and i in capture:
                captured[capture[i]] = tops[0]
        return blobs, captured

    def forward(self, *inputs: Tensor, until: str | None = None) -> Tensor:
        """Run the network; return the first top of the last layer, or of layer ``until``."""
        if not self.layers:
            return inputs[0]
        stop = len(self.layers) - 1 if until is None else self._index(until)
        blobs, _ = self._run(inputs, stop)
        return blobs[self.layers[stop].tops[0]]

    def features(self, *inputs: Tensor, layers: Iterable[str]) -> dict[str, Tensor]:
        """The first top of each named layer, as produced (before later in-place layers), in one pass.

        Runs only as far as the last requested layer.  Keys are the names as given.
        """
        wanted = {self._index(name): name for name in layers}
        if not wanted:
            return {}
        _, captured = self._run(inputs, max(wanted), wanted)
        return captured

    def blobs(self, *inputs: Tensor, until: str | None = None) -> dict[str, Tensor]:
        """All blobs after running up to layer ``until`` (default: all layers), like Caffe's
        ``net.blobs``: an in-place layer's output replaces its blob."""
        stop = len(self.layers) - 1 if until is None else self._index(until)
        blobs, _ = self._run(inputs, stop)
        return blobs

    def truncate(self, layer: str) -> CaffeNet:
        """A network of the layers up to and including ``layer`` (the modules are shared)."""
        stop = self._index(layer)
        kept = self.layers[:stop + 1]
        modules = {spec.module_name: getattr(self, spec.module_name) for spec in kept}
        produced = set(self.input_names).union(*(spec.tops for spec in kept))
        shapes = {k: v for k, v in self._blob_shapes.items() if k in produced}
        net = CaffeNet(kept, modules, self.input_shapes, self.name, shapes)
        net.train(self.training)
        return net


# --------------------------------------------------------------------------------- the loader


def _net_inputs(net: Any, path: Path) -> dict[str, Shape]:
    names = list(net.input)
    shapes: dict[str, Shape] = {}
    if len(net.input_shape):
        if len(net.input_shape) != len(names):
            raise ModelError(f"{path}: {len(names)} input(s) but {len(net.input_shape)} input_shape(s)")
        for name, shape in zip(names, net.input_shape):
            shapes[name] = tuple(int(d) for d in shape.dim)
    elif len(net.input_dim):
        if len(net.input_dim) != 4 * len(names):
            raise ModelError(f"{path}: input_dim needs 4 values per input ({len(names)} input(s)), "
                             f"got {len(net.input_dim)}")
        for i, name in enumerate(names):
            shapes[name] = tuple(int(d) for d in net.input_dim[4 * i:4 * i + 4])
    elif names:
        raise ModelError(f"{path}: input {names[0]!r} has no shape (input_shape or input_dim)")
    return shapes


def _model_weights(model: Any | None) -> dict[str, Any]:
    """Caffemodel layers by name (new-style layers win over V1 ones of the same name)."""
    if model is None:
        return {}
    found: dict[str, Any] = {}
    for layer in list(model.layers) + list(model.layer):
        if len(layer.blobs):
            found[layer.name] = layer
    return found


def load_caffe(prototxt: str | PathLike[str], caffemodel: str | PathLike[str] | None = None) -> CaffeNet:
    """Build a :class:`CaffeNet` from a deploy prototxt and (optionally) load its weights.

    Args:
        prototxt: the text network definition (``deploy.prototxt``), new or V1 syntax.
        caffemodel: binary weights, matched by layer name; ``None`` keeps torch's default
            initialization (useful to inspect an architecture).

    Raises:
        ModelError: missing/unparsable files, unsupported layer types, weights missing from the
            caffemodel or whose shape does not match the prototxt.
    """
    path = Path(prototxt)
    net = read_prototxt(path)
    model_path = Path(caffemodel) if caffemodel is not None else None
    model = read_caffemodel(model_path) if model_path is not None else None
    if len(net.layer) and len(net.layers):
        raise ModelError(f"{path}: mixes 'layer' and the deprecated 'layers' (V1) syntax")
    raw_layers = list(net.layer) if len(net.layer) else list(net.layers)
    if not raw_layers:
        raise ModelError(f"{path}: the prototxt defines no layers")
    if any(isinstance(lp, caffe_pb2.V1LayerParameter) and lp.type == 0 and not lp.name for lp in raw_layers):
        raise ModelError(f"{path}: V0 (pre-2014) layer definitions are not supported")
    inputs = _net_inputs(net, path)
    shapes: dict[str, Shape] = dict(inputs)
    weights = _model_weights(model)
    specs: list[CaffeLayer] = []
    modules: dict[str, nn.Module] = {}
    taken: set[str] = set()
    seen_names: set[str] = set()
    probe = nn.Module()  # attribute names a sub-module may not take
    reserved = set(dir(CaffeNet)) | set(vars(probe)) | {
        "name", "layers", "input_names", "input_shapes", "module_names", "layer_for_module", "output_names",
        "_blob_shapes"}

    for index, lp in enumerate(raw_layers):
        if not _phase_test_includes(lp):
            continue
        type_name = _layer_type(lp)
        name = str(lp.name) or f"{type_name.lower()}{index}"
        where = f"{path}: layer {name!r} ({type_name})"
        if name in seen_names:
            raise ModelError(f"{path}: duplicate layer name {name!r}")
        seen_names.add(name)
        if type_name == "Input":
            p = lp.input_param
            if len(p.shape) not in (1, len(lp.top)):
                raise ModelError(f"{where}: needs one shape, or one per top")
            for i, top in enumerate(lp.top):
                shape = tuple(int(d) for d in p.shape[i if len(p.shape) > 1 else 0].dim)
                inputs[top] = shapes[top] = shape
            continue
        builder = _BUILDERS.get(type_name)
        if builder is None:
            raise ModelError(f"{path}: layer {name!r} has type {type_name!r}, which the Caffe importer does "
                             f"not support (supported: {', '.join(SUPPORTED_LAYERS)})")
        missing = [b for b in lp.bottom if b not in shapes]
        if missing:
            raise ModelError(f"{where}: bottom blob {missing[0]!r} is not produced by any earlier layer or input")
        try:
            built = builder(lp, [shapes[b] for b in lp.bottom])
        except _Error as err:
            raise ModelError(f"{where}: {err}") from None
        for top, shape in zip(lp.top, built.tops):
            shapes[top] = shape

        if built.blob_shapes:
            source = weights.get(name)
            if model is not None:
                if source is None:
                    raise ModelError(f"{model_path}: no weights for layer {name!r} ({type_name}) of {path.name}")
                if len(source.blobs) != len(built.blob_shapes):
                    raise ModelError(f"{model_path}: layer {name!r} has {len(source.blobs)} weight blob(s), "
                                     f"the prototxt implies {len(built.blob_shapes)}")
                arrays = []
                for i, (blob, expected) in enumerate(zip(source.blobs, built.blob_shapes)):
                    if not _blob_matches(blob, expected):
                        raise ModelError(f"{model_path}: layer {name!r} blob {i} has shape {_blob_shape(blob)}, "
                                         f"the prototxt implies {expected}")
                    values = _blob_values(blob)
                    if values.size != math.prod(expected):
                        raise ModelError(f"{model_path}: layer {name!r} blob {i} holds {values.size} values, "
                                         f"expected {math.prod(expected)}")
                    arrays.append(values.reshape(expected))
                assert built.assign is not None
                built.assign(arrays)
        elif model is not None and name in weights:
            raise ModelError(f"{model_path}: layer {name!r} ({type_name}) has weight blobs but takes none")

        module_name = base = sanitize_name(name)
        suffix = 2
        while module_name in taken or module_name in reserved:
            module_name = f"{base}_{suffix}"
            suffix += 1
        taken.add(module_name)
        assert built.module is not None
        modules[module_name] = built.module
        specs.append(CaffeLayer(name, type_name, module_name, tuple(lp.bottom), tuple(lp.top)))

    if not inputs:
        raise ModelError(f"{path}: the network has no input (input:, input_shape/input_dim or an Input layer)")
    for input_name, shape in inputs.items():
        if not shape:
            raise ModelError(f"{path}: input {input_name!r} has no shape")
    return CaffeNet(specs, modules, inputs, str(net.name), shapes)
