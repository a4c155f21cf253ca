"""Batch normalization folded into convolutions, and the ReLU fusions, for any ``nn.Module`` (issue 5).

:mod:`~preimage.models.fusion` rewrites the paper's networks, whose layer order it knows.  A
network the user brings (``--module``, e.g. a ResNet) is a tree of modules called by its own
``forward``; :func:`fuse_module` traces it once with ``torch.fx`` to learn which module's
output feeds which, and then *substitutes modules* in a copy of the tree, leaving every
``forward`` as written:

* a convolution whose output only an evaluation-mode ``BatchNorm2d`` reads becomes one
  convolution with the normalization folded into its weights and bias (``W * g / sqrt(v + eps)``,
  ``(b - m) * g / sqrt(v + eps) + beta``, computed in fp32 and stored in the weights' dtype), and
  the normalization an ``nn.Identity``.  This is the one rewrite that changes arithmetic: codes
  agree with the unfolded network to rounding (fp32: ~1e-6 relative; bf16: the rounding of the
  folded weights, ~1e-3), not bit for bit;
* a ReLU module whose output only an ``nn.MaxPool2d`` reads goes into the pooling, and a
  convolution (folded or not) whose output only a ReLU module reads becomes a
  :class:`~preimage.models.fusion.ConvReLU`, as in :mod:`~preimage.models.fusion` (and so does a
  zero-padded 1 x 1 convolution, computed unpadded: :func:`~preimage.models.fusion.border_padding`);
* every ``nn.MaxPool2d`` runs through :func:`~preimage.models.pooling.max_pool2d` (torch's values
  and gradients bit for bit, in C on the CPU), and every ``nn.Linear`` through
  :func:`~preimage.models.networks.frozen_linear` (:class:`FrozenLinear`: the same values; in
  bf16 the input gradient from a transposed copy of the weights).

A module called more than once per forward pass (torchvision's ResNet blocks call one ReLU
twice) is left alone, and so is any rewrite that would change the cut's own output.  Models that
``torch.fx`` cannot trace (data-dependent control flow) are used as they are.

Measured on a ResNet-18 cut at layer3, bf16 channels-last, batch 16 (``benchmarks/README.md``):
batch normalization took a quarter of Φ's forward + backward and the ReLUs a sixth.
"""

from __future__ import annotations

import copy
from collections import Counter
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from .fusion import ConvReLU, border_padding, plain_conv
from .networks import frozen_linear
from .pooling import max_pool2d


M = TypeVar("M", bound=nn.Module)


def _as(cls: type[M], module: nn.Module) -> M:
    """An instance of ``cls`` (a subclass of ``module``'s class) with ``module``'s attributes,
    sharing its parameters and buffers."""
    stand_in = cls.__new__(cls)
    stand_in.__dict__ = dict(module.__dict__)
    return stand_in


class NativeMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` (no dilation, no indices) through :func:`~preimage.models.pooling.max_pool2d`,
    of ``relu(x)`` when ``relu_first``: the same values and gradients, faster on the CPU."""

    relu_first: bool = False

    @classmethod
    def of(cls, pool: nn.MaxPool2d, relu_first: bool = False) -> "NativeMaxPool2d":
        native = _as(cls, pool)
        native.relu_first = relu_first
        return native

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        return max_pool2d(x, _pair(self.kernel_size), _pair(self.stride or self.kernel_size), _pair(self.padding),
                          bool(self.ceil_mode), relu=self.relu_first)


class FrozenLinear(nn.Linear):
    """``nn.Linear`` through :func:`~preimage.models.networks.frozen_linear`: the same values, the
    input gradient of frozen bf16 weights on the CPU from a transposed copy (2.4x faster)."""

    @classmethod
    def of(cls, linear: nn.Linear) -> "FrozenLinear":
        return _as(cls, linear)

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        return frozen_linear(x, self.weight, self.bias, self)


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _native_pool(m: nn.Module) -> bool:
    return (type(m) is nn.MaxPool2d and not m.return_indices and _pair(m.dilation) == (1, 1)
            and _ints(m.padding) and _ints(m.kernel_size) and _ints(m.stride if m.stride is not None else m.kernel_size))


def _ints(v: Any) -> bool:
    """An int or a pair of ints (not a 3-D or string argument)."""
    return isinstance(v, int) or (isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(i, int) for i in v))


def fold_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A copy of ``conv`` computing ``bn(conv(x))`` (``bn`` in evaluation mode), frozen, its
    weights in ``conv``'s dtype and memory layout."""
    w = conv.weight
    scale = bn.running_var.float().add(bn.eps).rsqrt()  # type: ignore[union-attr]
    if bn.weight is not None:
        scale = scale * bn.weight.float()
    bias = (conv.bias.float() if conv.bias is not None else torch.zeros_like(scale)) - bn.running_mean.float()  # type: ignore[union-attr]
    bias = bias * scale
    if bn.bias is not None:
        bias = bias + bn.bias.float()
    layout = torch.channels_last if w.dim() == 4 and w.is_contiguous(memory_format=torch.channels_last) \
        and not w.is_contiguous() else torch.contiguous_format
    folded = copy.copy(conv)
    folded._parameters = dict(conv._parameters)
    folded.weight = nn.Parameter((w.float() * scale.view(-1, 1, 1, 1)).to(w.dtype).contiguous(memory_format=layout),
                                 requires_grad=False)
    folded.bias = nn.Parameter(bias.to(w.dtype), requires_grad=False)
    return folded


def _foldable(bn: nn.Module) -> bool:
    return (type(bn) is nn.BatchNorm2d and not bn.training and bn.track_running_stats
            and bn.running_mean is not None and bn.running_var is not None)


def _frozen_conv(m: nn.Module) -> bool:
    return plain_conv(m) and not m.weight.requires_grad and (m.bias is None or not m.bias.requires_grad)


def _structural_copy(module: nn.Module) -> nn.Module:
    """``module`` with every container copied (a new ``_modules`` dict) and the leaves shared."""
    if not module._modules:
        return module
    clone = copy.copy(module)
    clone._modules = {name: _structural_copy(child) if child is not None else None
                      for name, child in module._modules.items()}
    return clone


def _set(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    (root.get_submodule(parent) if parent else root)._modules[leaf] = module


def fuse_module(model: nn.Module, keep: nn.Module) -> tuple[nn.Module, dict[nn.Module, nn.Module]] | None:
    """A copy of ``model`` with the rewrites above, and the map from ``keep`` (the cut's module)
    to the module that now computes its output; None when nothing applies or ``model`` cannot
    be traced."""
    try:
        graph = torch.fx.Tracer().trace(model)
    except Exception:  # noqa: BLE001 -- any tracing failure: use the model as it is
        return None
    modules = dict(model.named_modules())
    nodes = [n for n in graph.nodes if n.op == "call_module"]
    calls = Counter(n.target for n in nodes)
    keep_names = {name for name, m in modules.items() if m is keep}

    def only_user(node: Any) -> Any:
        users = list(node.users)
        if len(users) != 1 or users[0].op != "call_module" or calls[users[0].target] != 1:
            return None
        if tuple(users[0].args) != (node,) or users[0].kwargs:
            return None
        return users[0]

    new: dict[str, nn.Module] = {}  # qualified name -> replacement
    for node in nodes:  # ReLU -> max pooling
        pool = only_user(node)
        if (pool is not None and type(modules.get(node.target)) is nn.ReLU and calls[node.target] == 1
                and node.target not in keep_names and _native_pool(modules[pool.target])):
            new[node.target] = nn.Identity()
            new[pool.target] = NativeMaxPool2d.of(modules[pool.target], relu_first=True)  # type: ignore[arg-type]
    for node in nodes:  # convolution [-> batch normalization] [-> ReLU]
        conv = modules.get(node.target)
        if conv is None or calls[node.target] != 1 or not _frozen_conv(conv) or node.target in keep_names:
            continue
        out, folded = node, conv
        bn_node = only_user(node)
        if bn_node is not None and _foldable(modules[bn_node.target]):
            folded = fold_batchnorm(conv, modules[bn_node.target])  # type: ignore[arg-type]
            new[bn_node.target] = nn.Identity()
            out = bn_node
        relu_node = only_user(out) if out.target not in keep_names else None
        if (relu_node is not None and type(modules[relu_node.target]) is nn.ReLU
                and relu_node.target not in new):
            new[relu_node.target] = nn.Identity()
            folded = ConvReLU(folded)
        elif border_padding(folded) is not None:  # type: ignore[arg-type]
            folded = ConvReLU(folded, relu=False)  # type: ignore[arg-type]
        if folded is not conv:
            new[node.target] = folded
    for name, m in modules.items():  # every other max pooling; every linear layer
        if name and name not in new and _native_pool(m):
            new[name] = NativeMaxPool2d.of(m)  # type: ignore[arg-type]
        elif name and type(m) is nn.Linear:
            new[name] = FrozenLinear.of(m)  # type: ignore[arg-type]
    if not new:
        return None
    fused = _structural_copy(model)
    for name, m in new.items():
        _set(fused, name, m)
    replaced: dict[nn.Module, nn.Module] = {}
    for name in keep_names:
        if name:
            replaced[keep] = fused.get_submodule(name)
    return fused, replaced
