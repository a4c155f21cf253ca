"""MatConvNet importer: ``simplenn`` ``.mat`` files (the paper's own format) as ``nn.Module`` s.

The paper's models are MatConvNet's pretrained ``imagenet-caffe-alex.mat``, ``imagenet-vgg-m.mat``
and ``imagenet-vgg-verydeep-16.mat`` (http://www.vlfeat.org/matconvnet/pretrained/).  No MATLAB is
needed: MAT v5/v7 files are read with :func:`scipy.io.loadmat`, MAT v7.3 files (HDF5) with
``h5py``, and both are turned into the same plain Python values (:func:`read_mat`): structs become
``dict`` s, cell arrays ``list`` s (column-major order), char arrays ``str`` and numeric arrays
``numpy`` arrays *in MATLAB's axis order* (HDF5 stores MATLAB arrays with their axes reversed;
:func:`read_mat` reverses them back).

A ``simplenn`` model is a struct with a ``layers`` cell array of layer structs and a ``meta``
struct (older releases: ``normalization`` and ``classes`` at the top level); it may be saved as the
variables ``layers``/``meta`` (``save(file, '-struct', 'net')``) or as one variable ``net``.
Layer types and their torch equivalents:

* ``conv``: ``weights = {filters, biases}`` (older files: ``filters`` and ``biases`` fields);
  ``filters`` is ``H x W x Cin/groups x Cout`` (rows are image rows), so the torch kernel is
  ``filters.transpose(3, 2, 0, 1)``; ``stride`` ``[sy sx]`` or scalar; ``pad`` ``[top bottom left
  right]`` or scalar (asymmetric pads give a :class:`~preimage.models.networks.PaddedConv2d`);
  ``dilate``; the number of groups is the input channels over the filter depth.  MatConvNet's
  fully connected layers are such convolutions (fc6 = 6x6x256x4096), as in our networks.
* ``pool``: ``method`` max/avg, ``pool`` ``[h w]``, ``stride``, ``pad`` -- a
  :class:`~preimage.models.networks.Pool2d` with MatConvNet's floor rounding (``ceil_mode=False``):
  MatConvNet's Caffe importer puts the extra bottom/right padding that emulates Caffe's ceil rounding
  in ``pad``, so the file's pads are used as they are.
* ``normalize`` / ``lrn``: ``param = [N kappa alpha beta]``, ``y = x / (kappa + alpha sum_N x^2)^beta``,
  i.e. Caffe's LRN with ``alpha_caffe = N alpha`` (:class:`~preimage.models.caffe.CaffeLRN`).
* ``relu`` (``leak``), ``softmax`` (over channels), ``sigmoid``; ``dropout`` layers are skipped
  (the identity at test time).  Other types (``bnorm``, ``softmaxloss``, ``custom``, DagNN files)
  raise :class:`~preimage.models.caffe.ModelError`.

The input convention comes from ``meta.normalization``: RGB (MatConvNet converts Caffe's BGR
filters to RGB), the mean is ``averageImage`` averaged over pixels (a full mean image or a 3-vector)
and the input size is ``imageSize(1)``.  Class descriptions (``meta.classes.description``) are kept
in ``net.classes``.  When the file's layers match one of the paper's networks (kinds, order and
parameter shapes, e.g. pooling before or after normalization; see :func:`preimage.models.networks.signature`), the
result is that network (``net.arch``) with the paper's layer names (files without layer names, from
old releases, get them too).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .caffe import CaffeLRN, ModelError, sanitize_name
from .networks import (
    ARCHITECTURES,
    DenseConv2d,
    InputConvention,
    PaddedConv2d,
    Pool2d,
    SequentialNet,
    canonical_arch,
    meta_build,
    signature,
)

__all__ = ["MatConvNetError", "load_matconvnet", "read_mat", "simplenn_convention"]

MatConvNetError = ModelError
"""Errors of this module are :class:`~preimage.models.caffe.ModelError` s (one line, a ``ValueError``)."""

_MAT_V73 = b"MATLAB 7.3"
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


# ----------------------------------------------------------------------------- reading .mat


def _is_hdf5(path: Path) -> bool:
    with path.open("rb") as fh:
        head = fh.read(128)
        if head.startswith(_HDF5_SIGNATURE) or head.startswith(_MAT_V73):
            return True
        # HDF5 looks for its superblock at 0, 512, 1024, 2048, ... (MATLAB uses a 512-byte user block)
        for offset in (512, 1024, 2048):
            fh.seek(offset)
            if fh.read(8) == _HDF5_SIGNATURE:
                return True
    return False


def read_mat(path: str | PathLike[str]) -> dict[str, Any]:
    """The variables of a MAT file (v4/v5/v7 or v7.3) as plain Python values.

    Structs are ``dict`` s (struct arrays: lists of dicts, or for v7.3 dicts of lists), cell arrays
    lists in MATLAB's linear (column-major) order, char arrays ``str`` (several rows: a list), and
    numeric and logical arrays ``numpy`` arrays with MATLAB's shape and axis order.
    """
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"{p}: no such MatConvNet .mat file" if not p.exists() else f"{p}: not a file")
    if _is_hdf5(p):
        return _read_v73(p)
    import scipy.io

    try:
        raw = scipy.io.loadmat(p, squeeze_me=False, struct_as_record=True, chars_as_strings=True)
    except NotImplementedError as err:  # a v7.3 file that the sniffing missed
        raise ModelError(f"{p}: {_one_line(err)}") from None
    except Exception as err:
        raise ModelError(f"{p}: not a MATLAB .mat file ({_one_line(err)})") from None
    return {k: _scipy_value(v) for k, v in raw.items() if not k.startswith("__")}


def _scipy_value(v: Any) -> Any:
    if not isinstance(v, np.ndarray):
        return v
    if v.dtype.names is not None:  # struct (array)
        items = [{n: _scipy_value(e[n]) for n in v.dtype.names} for e in v.reshape(-1, order="F")]
        return items[0] if len(items) == 1 else items
    if v.dtype == object:  # cell array
        return [_scipy_value(e) for e in v.reshape(-1, order="F")]
    if v.dtype.kind == "U":  # char array: one string per row
        rows = [str(s) for s in v.reshape(-1)]
        return "".join(rows) if len(rows) <= 1 else rows
    return v


def _attr(obj: Any, name: str) -> str:
    value = obj.attrs.get(name)
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("ascii", "replace")
    if isinstance(value, np.ndarray) and value.dtype.kind == "S":
        return b"".join(value.reshape(-1)).decode("ascii", "replace")
    return str(value)


def _read_v73(path: Path) -> dict[str, Any]:
    try:
        import h5py
    except ImportError:  # pragma: no cover - h5py is a dependency
        raise ModelError(f"{path}: a MAT v7.3 (HDF5) file; reading it needs the h5py package") from None
    try:
        with h5py.File(path, "r") as f:
            return {k: _h5_value(f[k], f) for k in f.keys() if not k.startswith("#")}
    except ModelError:
        raise
    except Exception as err:
        raise ModelError(f"{path}: cannot read the MAT v7.3 (HDF5) file: {_one_line(err)}") from None


def _h5_value(obj: Any, f: Any) -> Any:
    import h5py

    if isinstance(obj, h5py.Group):
        fields = obj.attrs.get("MATLAB_fields")
        keys = list(obj.keys())
        if fields is not None:  # MATLAB's field order
            named = [b"".join(np.asarray(x).reshape(-1)).decode("ascii", "replace") for x in fields]
            keys = [k for k in named if k in obj] + [k for k in keys if k not in named]
        return {k: _h5_value(obj[k], f) for k in keys}
    cls = _attr(obj, "MATLAB_class")
    if int(np.asarray(obj.attrs.get("MATLAB_empty", 0)).reshape(-1)[0]) != 0:
        return {"char": "", "cell": [], "struct": {}}.get(cls, np.zeros((0, 0), dtype=np.float64))
    if h5py.check_dtype(ref=obj.dtype) is not None:  # a cell array (or a struct array's field)
        refs = obj[()]
        # the HDF5 dataset has MATLAB's axes reversed: its C order is MATLAB's column-major order
        return [_h5_value(f[r], f) for r in np.asarray(refs).reshape(-1)]
    data = obj[()]
    if cls == "char":
        codes = np.asarray(data).T  # MATLAB's rows x columns
        rows = ["".join(chr(int(c)) for c in row) for row in np.atleast_2d(codes)]
        return rows[0] if len(rows) == 1 else rows
    if isinstance(data, np.ndarray) and data.dtype.names is not None:
        raise ModelError(f"unsupported MATLAB value {obj.name} (complex or compound data)")
    arr = np.asarray(data)
    if cls == "logical":
        arr = arr.astype(bool)
    return arr.T


# ------------------------------------------------------------------------------- simplenn


def _str(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return "".join(value)
    if isinstance(value, np.ndarray) and value.size == 0:
        return ""
    return str(value)


def _empty(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, np.ndarray):
        return value.size == 0
    return isinstance(value, (list, str, dict)) and len(value) == 0


def _ints(layer: dict[str, Any], key: str, n: int, default: Sequence[int] | None, where: str) -> tuple[int, ...]:
    value = layer.get(key)
    if _empty(value):
        if default is None:
            raise ModelError(f"{where}: missing field {key!r}")
        return tuple(default)
    a = np.asarray(value, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(a)) or np.any(a != np.round(a)):
        raise ModelError(f"{where}: field {key!r} must hold integers, got {a.tolist()}")
    vals = [int(x) for x in a]
    if len(vals) == 1:
        vals = vals * n
    elif n == 4 and len(vals) == 2:
        vals = [vals[0], vals[0], vals[1], vals[1]]
    if len(vals) != n:
        raise ModelError(f"{where}: field {key!r} needs {n} values (or 1), got {len(vals)}")
    return tuple(vals)


def _conv_arrays(layer: dict[str, Any], where: str) -> tuple[np.ndarray, np.ndarray | None]:
    if "weights" in layer:
        weights = layer["weights"]
        if isinstance(weights, np.ndarray):  # a lone numeric array instead of a cell
            weights = [weights]
        if not isinstance(weights, list) or not weights:
            raise ModelError(f"{where}: 'weights' must be a cell {{filters, biases}}")
        filters, biases = weights[0], (weights[1] if len(weights) > 1 else None)
    elif "filters" in layer:
        filters, biases = layer["filters"], layer.get("biases")
    else:
        raise ModelError(f"{where}: a conv layer without 'weights' (or 'filters')")
    if not isinstance(filters, np.ndarray) or filters.size == 0:
        raise ModelError(f"{where}: empty or non-numeric filters")
    if biases is not None and (not isinstance(biases, np.ndarray) or biases.size == 0):
        biases = None
    return filters, biases


def _conv_layer(layer: dict[str, Any], channels: int, where: str) -> tuple[nn.Conv2d, int]:
    filters, biases = _conv_arrays(layer, where)
    if filters.ndim > 4:
        raise ModelError(f"{where}: filters have {filters.ndim} dimensions (H x W x Cin x Cout expected)")
    f = filters.reshape(filters.shape + (1,) * (4 - filters.ndim))  # MATLAB drops trailing singletons
    kh, kw, depth, n_out = map(int, f.shape)
    stride = _ints(layer, "stride", 2, (1, 1), where)
    pad = _ints(layer, "pad", 4, (0, 0, 0, 0), where)
    dilation = _ints(layer, "dilate", 2, (1, 1), where)
    if depth <= 0 or channels % depth:
        raise ModelError(f"{where}: filters of depth {depth} do not divide the {channels} input channels")
    groups = channels // depth
    if n_out % groups:
        raise ModelError(f"{where}: {n_out} filters cannot be split into {groups} groups")
    # MATLAB's column-major H x W x Cin x Cout is, read backwards, a C-order Cout x Cin x W x H array
    # (free for scipy's Fortran-ordered and h5py's reversed arrays); torch then swaps W and H.
    backwards = np.ascontiguousarray(f.T, dtype=np.float32)
    weight = torch.from_numpy(backwards).permute(0, 1, 3, 2).contiguous()
    bias = None
    if biases is not None:
        b = np.asarray(biases, dtype=np.float32).reshape(-1)
        if b.size != n_out:
            raise ModelError(f"{where}: {b.size} biases for {n_out} filters")
        bias = torch.from_numpy(b.copy())
    t, bt, lf, rt = pad
    kwargs: dict[str, Any] = dict(stride=stride, dilation=dilation, groups=groups, bias=bias is not None)
    if t == bt == lf == rt == 0 and groups == 1:  # fc6-fc8 are such convolutions
        conv: nn.Conv2d = nn.utils.skip_init(DenseConv2d, channels, n_out, (kh, kw), **kwargs)
    elif t == bt and lf == rt:
        conv = nn.utils.skip_init(nn.Conv2d, channels, n_out, (kh, kw), padding=(t, lf), **kwargs)
    else:
        conv = nn.utils.skip_init(PaddedConv2d, channels, n_out, (kh, kw), pad=pad, **kwargs)
    conv.weight = nn.Parameter(weight)
    if bias is not None:
        conv.bias = nn.Parameter(bias)
    return conv, n_out


def _lrn_layer(layer: dict[str, Any], where: str) -> CaffeLRN:
    param = layer.get("param")
    if _empty(param):
        raise ModelError(f"{where}: a normalize layer without 'param' [N kappa alpha beta]")
    p = np.asarray(param, dtype=np.float64).reshape(-1)
    if p.size != 4:
        raise ModelError(f"{where}: 'param' needs 4 values [N kappa alpha beta], got {p.size}")
    n, kappa, alpha, beta = p
    if n != round(n) or int(n) % 2 != 1:
        raise ModelError(f"{where}: only odd normalization windows are supported, got N = {n:g}")
    return CaffeLRN(int(n), float(alpha) * int(n), float(beta), float(kappa), across_channels=True)


def _pool_layer(layer: dict[str, Any], where: str) -> Pool2d:
    method = _str(layer.get("method", "max")).lower() or "max"
    if method not in ("max", "avg"):
        raise ModelError(f"{where}: unknown pooling method {method!r} (max, avg)")
    kernel = _ints(layer, "pool", 2, None, where)
    stride = _ints(layer, "stride", 2, (1, 1), where)
    pad = _ints(layer, "pad", 4, (0, 0, 0, 0), where)
    return Pool2d(kernel, stride, pad, method=method, ceil_mode=False)


def _simplenn_parts(variables: dict[str, Any], path: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    top = variables
    if "layers" not in top and isinstance(top.get("net"), dict):
        top = top["net"]
    if "vars" in top and "params" in top:
        raise ModelError(f"{path}: a MatConvNet DagNN model; only SimpleNN models are supported "
                         f"(the paper's imagenet-*.mat files are SimpleNN)")
    layers = top.get("layers")
    if layers is None:
        raise ModelError(f"{path}: no 'layers' variable: not a MatConvNet SimpleNN model")
    if isinstance(layers, dict):
        layers = [layers]
    if not isinstance(layers, list) or not all(isinstance(x, dict) for x in layers):
        raise ModelError(f"{path}: 'layers' is not a cell array of layer structs")
    meta = dict(top.get("meta") or {}) if isinstance(top.get("meta"), dict) else {}
    for key in ("normalization", "classes"):  # older releases keep these at the top level
        if key not in meta and isinstance(top.get(key), dict):
            meta[key] = top[key]
    return layers, meta


def simplenn_convention(meta: dict[str, Any], default: InputConvention | None = None) -> InputConvention:
    """The input convention of a SimpleNN ``meta`` struct (RGB, mean of ``averageImage``)."""
    base = default or InputConvention(mean=(0.0, 0.0, 0.0), input_size=224)
    norm = meta.get("normalization") if isinstance(meta.get("normalization"), dict) else {}
    assert isinstance(norm, dict)
    mean = base.mean
    avg = norm.get("averageImage")
    if isinstance(avg, np.ndarray) and avg.size:
        a = np.asarray(avg, dtype=np.float64)
        if a.size == 3:
            mean = tuple(float(x) for x in a.reshape(3))
        elif a.ndim == 3 and a.shape[2] == 3:
            mean = tuple(float(x) for x in a.reshape(-1, 3).mean(0))
        else:
            warnings.warn(f"averageImage of shape {a.shape} not understood; using mean {mean}", stacklevel=3)
    size = base.input_size
    image_size = norm.get("imageSize")
    if isinstance(image_size, np.ndarray) and image_size.size:
        size = int(np.asarray(image_size).reshape(-1)[0])
    return InputConvention(mean=mean, std=(1.0, 1.0, 1.0), bgr=False, input_size=size, source="matconvnet")


def _classes(meta: dict[str, Any]) -> list[str] | None:
    classes = meta.get("classes")
    if not isinstance(classes, dict):
        return None
    for key in ("description", "name"):
        value = classes.get(key)
        if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            return list(value)
    return None


def _match(net: SequentialNet, named: bool, want: str | None, path: Path) -> str | None:
    """The paper's architecture the file holds, or None; raise if it is not ``want``.

    Architectures are told apart by the kinds, parameter shapes and hyper-parameters of their layers
    (CaffeNet and AlexNet by the order of pooling and normalization); when one matches, the layers
    take the paper's names (a warning says so if the file named them differently).
    """
    sig = signature(net)
    n_classes = next((m.out_channels for m in reversed(list(net.children())) if isinstance(m, nn.Conv2d)), 1000)
    candidates = [want] if want is not None else [a for a in ARCHITECTURES if a != "torchvision-alexnet"]
    for arch in candidates:
        ref = signature(meta_build(arch, num_classes=n_classes))
        if len(ref) == len(sig) and all((a.kind, a.shape, a.hyper) == (b.kind, b.shape, b.hyper)
                                        for a, b in zip(sig, ref)):
            renamed = [(a.name, b.name) for a, b in zip(sig, ref) if a.name != b.name]
            if renamed and named:
                warnings.warn(f"{path}: {arch} layers renamed to the paper's names "
                              f"({renamed[0][0]!r} -> {renamed[0][1]!r}, ...)", stacklevel=3)
            net._modules = {r.name: m for r, m in zip(ref, net._modules.values())}
            return arch
    if want is not None:
        ref = signature(meta_build(want, num_classes=n_classes))
        for i, (a, b) in enumerate(zip(sig, ref)):
            if (a.kind, a.shape, a.hyper) != (b.kind, b.shape, b.hyper):
                raise ModelError(f"{path}: not {want}: layer {i + 1} is {a.name!r} ({a.kind} {a.shape or ''}"
                                 f"{a.hyper}), {want} has {b.name!r} ({b.kind} {b.shape or ''}{b.hyper})")
        raise ModelError(f"{path}: not {want}: {len(sig)} layers (without dropout), {want} has {len(ref)}")
    return None


def load_matconvnet(path: str | PathLike[str], arch: str | None = None) -> SequentialNet:
    """Read a MatConvNet SimpleNN ``.mat`` file (v5/v7 or v7.3) into a :class:`SequentialNet`.

    Args:
        path: e.g. ``imagenet-vgg-m.mat``.
        arch: if given (``"alexnet"``, ``"caffenet"``, ``"vgg-m"``, ``"vgg-vd-16"``), the file must
            hold that network (same layer kinds, order and parameter shapes), else ModelError.

    Returns:
        The network in evaluation mode with the file's weights; ``net.arch`` is the detected
        architecture (``"custom"`` if none matches), ``net.convention`` the file's input convention
        and ``net.classes`` its class descriptions (or None).

    Raises:
        ModelError: missing or unreadable file, not a SimpleNN model, unsupported layer type,
            inconsistent shapes, or not the requested architecture.
    """
    p = Path(path)
    want = None
    if arch is not None:
        want = canonical_arch(arch)
        if want is None or want == "torchvision-alexnet":
            raise ModelError(f"unknown MatConvNet network {arch!r} (known: alexnet, caffenet, vgg-m, vgg-vd-16)")
    layers, meta = _simplenn_parts(read_mat(p), p)
    modules: list[tuple[str, nn.Module]] = []
    taken: set[str] = set()
    channels = 3
    named = True
    for i, layer in enumerate(layers):
        kind = _str(layer.get("type", "")).lower()
        raw_name = _str(layer.get("name", "")) if not _empty(layer.get("name")) else ""
        named = named and bool(raw_name)
        where = f"{p}: layer {i + 1} ({raw_name or 'unnamed'}, {kind or 'no type'})"
        module: nn.Module
        if kind == "conv":
            module, channels = _conv_layer(layer, channels, where)
        elif kind == "pool":
            module = _pool_layer(layer, where)
        elif kind in ("normalize", "lrn"):
            module = _lrn_layer(layer, where)
        elif kind == "relu":
            leak = layer.get("leak")
            slope = 0.0 if _empty(leak) else float(np.asarray(leak, dtype=np.float64).reshape(-1)[0])
            module = nn.LeakyReLU(slope) if slope else nn.ReLU()
        elif kind == "softmax":
            module = nn.Softmax(dim=1)
        elif kind == "sigmoid":
            module = nn.Sigmoid()
        elif kind == "dropout":
            continue
        else:
            raise ModelError(f"{where}: unsupported layer type {kind!r} "
                             f"(supported: conv, pool, normalize, relu, softmax, sigmoid, dropout)")
        name = base = sanitize_name(raw_name or f"layer{i + 1}")
        suffix = 2
        while name in taken or hasattr(nn.Sequential, name):
            name = f"{base}_{suffix}"
            suffix += 1
        taken.add(name)
        modules.append((name, module))
    if not modules:
        raise ModelError(f"{p}: the model has no layers")
    net = SequentialNet(modules)
    detected = _match(net, named, want, p)
    if detected is not None:
        net.arch = detected
    default = meta_build(detected).convention if detected is not None else None
    net.convention = simplenn_convention(meta, default)
    net.classes = _classes(meta)
    return net
