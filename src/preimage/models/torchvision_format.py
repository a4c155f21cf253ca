"""torchvision state dicts (AlexNet, VGG-16) as the paper's networks, without torchvision.

torchvision's pretrained files (``alexnet-owt-7be5be79.pth``, ``vgg16-397923af.pth`` from
https://download.pytorch.org/models/) are plain state dicts, read here with
``torch.load(weights_only=True)`` (no code is unpickled).  Their names map onto the layer names
of Tables 1 and 3:

* AlexNet: ``features.0/3/6/8/10`` -> ``conv1``-``conv5``, ``classifier.1/4/6`` -> ``fc6``-``fc8``.
  torchvision's AlexNet is *not* Caffe's: 64/192/384/256/256 channels, no normalization layers,
  no grouped convolutions, pad 2 in conv1 -- it becomes
  :func:`~preimage.models.networks.torchvision_alexnet` (same naming scheme, same receptive fields
  and strides as Table 1 for the layers it has).
* VGG-16: ``features.0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28`` -> ``conv1_1`` ... ``conv5_3``,
  ``classifier.0/3/6`` -> ``fc6``-``fc8``; the architecture is exactly
  :func:`~preimage.models.networks.vgg_vd_16` (1:1).

The fully connected weights ``(4096, 256*6*6)`` / ``(4096, 512*7*7)`` become the 6x6 / 7x7 fc6
convolution by a reshape (torchvision flattens pool5 in C, H, W order); at 224x224 torchvision's
``AdaptiveAvgPool2d`` before the classifier is the identity, so the outputs agree.  The pooling
uses torch's floor rounding and the input convention is torchvision's (RGB, ``(photo - mean) /
std``).  State dicts saved from our own networks (``net.state_dict()``, keys ``conv1.weight`` ...)
load too.  Every problem raises a one-line :class:`~preimage.models.caffe.ModelError`.
"""

from __future__ import annotations

from collections.abc import Mapping
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .caffe import ModelError
from .networks import (
    TORCHVISION_MEAN,
    TORCHVISION_STD,
    VGG16_BLOCKS,
    InputConvention,
    SequentialNet,
    canonical_arch,
    meta_build,
)

__all__ = ["TORCHVISION_CONVENTION", "TORCHVISION_NAMES", "load_torchvision", "read_state_dict",
           "to_torchvision_state_dict"]

TORCHVISION_CONVENTION = InputConvention(mean=TORCHVISION_MEAN, std=TORCHVISION_STD, bgr=False, input_size=224,
                                         source="torchvision")
"""torchvision's ImageNet input convention (RGB, 0..255 units minus mean, divided by std)."""


def _vgg16_names() -> dict[str, str]:
    names: dict[str, str] = {}
    index = 0
    for b, widths in enumerate(VGG16_BLOCKS, start=1):
        for i in range(1, len(widths) + 1):
            names[f"conv{b}_{i}"] = f"features.{index}"
            index += 2  # conv, relu
        index += 1  # pool
    names.update({"fc6": "classifier.0", "fc7": "classifier.3", "fc8": "classifier.6"})
    return names


TORCHVISION_NAMES: dict[str, dict[str, str]] = {
    "torchvision-alexnet": {"conv1": "features.0", "conv2": "features.3", "conv3": "features.6",
                            "conv4": "features.8", "conv5": "features.10",
                            "fc6": "classifier.1", "fc7": "classifier.4", "fc8": "classifier.6"},
    "vgg-vd-16": _vgg16_names(),
}
"""Our layer name -> torchvision module name, per architecture."""


def read_state_dict(path: str | PathLike[str]) -> dict[str, Tensor]:
    """A state dict from a ``torch.save`` file (``weights_only``; ``state_dict``/``model`` wrappers and
    ``module.`` prefixes of DataParallel checkpoints are removed)."""
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"{p}: no such weights file" if not p.exists() else f"{p}: not a file")
    try:
        obj: Any = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:
        msg = " ".join(str(err).split())[:200]
        raise ModelError(f"{p}: not a torch state dict (torch.load with weights_only failed: {msg})") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(k, str) and isinstance(v, Tensor)
                                                           for k, v in obj.items()):
        raise ModelError(f"{p}: not a state dict (a mapping from parameter names to tensors)")
    out: dict[str, Tensor] = {}
    for k, v in obj.items():
        out[k[len("module."):] if k.startswith("module.") else k] = v
    return out


def _detect(sd: Mapping[str, Tensor], path: Path) -> str:
    if any("running_mean" in k for k in sd):
        raise ModelError(f"{path}: a batch-normalized network (e.g. vgg16_bn); only alexnet and vgg16 are supported")
    w0 = sd.get("features.0.weight")
    if w0 is None:
        raise ModelError(f"{path}: torchvision-style keys without 'features.0.weight'")
    n_convs = sum(1 for k, v in sd.items() if k.startswith("features.") and k.endswith(".weight") and v.dim() == 4)
    if tuple(w0.shape) == (64, 3, 11, 11):
        return "torchvision-alexnet"
    if tuple(w0.shape) == (64, 3, 3, 3) and n_convs == 13:
        return "vgg-vd-16"
    raise ModelError(f"{path}: a torchvision network that is neither AlexNet nor VGG-16 "
                     f"(features.0 {tuple(w0.shape)}, {n_convs} convolutions)")


def _skeleton(arch: str, num_classes: int, **kwargs: Any) -> SequentialNet:
    """``arch`` with its parameters on the ``meta`` device, to be replaced by loaded tensors."""
    return meta_build(arch, num_classes=num_classes, **kwargs)


def _check_materialized(net: SequentialNet, path: Path) -> SequentialNet:
    missing = [name for name, p in net.named_parameters() if p.is_meta]
    if missing:  # pragma: no cover - every mapped layer is assigned
        raise ModelError(f"{path}: no weights for {missing[0]}")
    return net.eval()


def _num_classes(sd: Mapping[str, Tensor], key: str) -> int:
    w = sd.get(key)
    return int(w.shape[0]) if w is not None else 1000


def _assign(net: SequentialNet, name: str, weight: Tensor, bias: Tensor | None, path: Path, source: str) -> None:
    layer = net.layer(name)
    assert isinstance(layer, nn.Conv2d)
    target = layer.weight.shape
    if weight.numel() != target.numel() or (weight.dim() == 4 and weight.shape != target):
        raise ModelError(f"{path}: {source}.weight has shape {tuple(weight.shape)}, layer {name} needs {tuple(target)}")
    if bias is None or bias.numel() != target[0]:
        raise ModelError(f"{path}: {source}.bias is missing or has the wrong size for layer {name}")
    # the loaded tensors become the parameters (no copy); fc matrices are viewed as convolutions
    layer.weight = nn.Parameter(weight.detach().float().reshape(target).contiguous())
    layer.bias = nn.Parameter(bias.detach().float().reshape(-1).contiguous())


def load_torchvision(path: str | PathLike[str], arch: str | None = None) -> SequentialNet:
    """Read a torchvision AlexNet / VGG-16 state dict (or one of our own networks' state dicts).

    Args:
        path: a ``torch.save`` file (``.pth``/``.pt``).
        arch: expected architecture.  ``"alexnet"`` accepts torchvision's AlexNet (and gives
            ``torchvision-alexnet``, since the architectures differ); ``"vgg-vd-16"`` (``"vgg16"``)
            torchvision's VGG-16.  For our own state dicts (keys ``conv1.weight``, ...) it says which
            network they belong to (default: the one whose parameter shapes match).

    Returns:
        A :class:`SequentialNet` in evaluation mode; torchvision files get torchvision's input
        convention and floor pooling.

    Raises:
        ModelError: unreadable file, not a state dict, unknown or mismatched architecture, missing,
            unexpected or mis-shaped tensors.
    """
    p = Path(path)
    want = canonical_arch(arch) if arch is not None else None
    if arch is not None and want is None:
        raise ModelError(f"unknown network {arch!r}")
    sd = read_state_dict(p)
    if any(k.startswith(("features.", "classifier.")) for k in sd):
        found = _detect(sd, p)
        if want is not None and want != found and not (want == "alexnet" and found == "torchvision-alexnet"):
            raise ModelError(f"{p}: holds torchvision's {found}, not {want} (torchvision has AlexNet and VGG-16 only)")
        mapping = TORCHVISION_NAMES[found]
        used = {f"{src}.{kind}" for src in mapping.values() for kind in ("weight", "bias")}
        unexpected = sorted(set(sd) - used)
        if unexpected:
            raise ModelError(f"{p}: unexpected tensor {unexpected[0]!r} for torchvision's {found}")
        net = _skeleton(found, _num_classes(sd, f"{mapping['fc8']}.weight"), ceil_mode=False,
                        convention=TORCHVISION_CONVENTION)
        for name, src in mapping.items():
            if f"{src}.weight" not in sd:
                raise ModelError(f"{p}: missing {src}.weight (layer {name} of {found})")
            _assign(net, name, sd[f"{src}.weight"], sd.get(f"{src}.bias"), p, src)
        return _check_materialized(net, p)
    return _load_native(sd, p, want)


def _load_native(sd: dict[str, Tensor], path: Path, want: str | None) -> SequentialNet:
    """A state dict of one of our networks (keys ``conv1.weight``, ``fc6.bias``, ...)."""
    n_classes = _num_classes(sd, "fc8.weight")
    given = {k: tuple(v.shape) for k, v in sd.items()}
    if want is None:
        def shapes(arch: str) -> dict[str, tuple[int, ...]]:
            return {k: tuple(v.shape) for k, v in meta_build(arch, num_classes=n_classes).state_dict().items()}

        found = [arch for arch in ("alexnet", "vgg-m", "vgg-vd-16", "torchvision-alexnet") if shapes(arch) == given]
        if not found:
            raise ModelError(f"{path}: a state dict whose names and shapes match none of alexnet, caffenet, vgg-m, "
                             f"vgg-vd-16, torchvision-alexnet")
        if found[0] == "alexnet":
            raise ModelError(f"{path}: AlexNet and CaffeNet have the same parameters; say which network it is")
        want = found[0]
    expected = meta_build(want, num_classes=n_classes).state_dict()
    missing = sorted(set(expected) - set(sd))
    extra = sorted(set(sd) - set(expected))
    if missing or extra:
        what = f"missing {missing[0]!r}" if missing else f"unexpected {extra[0]!r}"
        raise ModelError(f"{path}: not a {want} state dict ({what})")
    bad = next((k for k in expected if tuple(expected[k].shape) != given[k]), None)
    if bad is not None:
        raise ModelError(f"{path}: {bad} has shape {given[bad]}, {want} needs {tuple(expected[bad].shape)}")
    net = _skeleton(want, n_classes)  # the constructor's pooling and input convention
    net.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True, assign=True)
    return _check_materialized(net, path)


def to_torchvision_state_dict(net: SequentialNet) -> dict[str, Tensor]:
    """Our AlexNet-torchvision / VGG-16 weights under torchvision's names (fc weights flattened)."""
    mapping = TORCHVISION_NAMES.get(net.arch)
    if mapping is None:
        raise ModelError(f"torchvision has no {net.arch} network (only alexnet and vgg16)")
    out: dict[str, Tensor] = {}
    for name, src in mapping.items():
        layer = net.layer(name)
        assert isinstance(layer, nn.Conv2d) and layer.bias is not None
        w = layer.weight.detach()
        out[f"{src}.weight"] = w.reshape(w.shape[0], -1).clone() if name.startswith("fc") else w.clone()
        out[f"{src}.bias"] = layer.bias.detach().clone()
    return out
