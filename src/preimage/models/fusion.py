"""ReLUs fused into their neighbours in Φ's optimization copy (issue 5): a ReLU followed by max
pooling, and a convolution followed by a ReLU, each run as one kernel.

Max pooling and the ReLU commute, and so do their gradients: ``pool(relu(x))`` routes each
window's gradient to its first maximum, which the ReLU then drops unless it is positive; the
fused kernel (:func:`preimage.models.pooling.max_pool2d` with ``relu=True``) pools ``x``, clips
the maximum at 0 and drops the same gradients.  That saves the ReLU's pass over the full-size
map in both directions and its output's memory: SqueezeNet's conv1 map is 38 MB in bf16 at
batch 16, and its ReLU's forward and backward took a third of the bare step up to fire5.

:func:`fuse_relu_pool` rewrites the chain of a :class:`~preimage.models.networks.SequentialNet`
or the layer graph of a :class:`~preimage.models.caffe.CaffeNet`, in a new container that shares
every other module, wherever a ``nn.ReLU``'s output is read by one max pooling and nothing else,
and the ReLU is not the layer the cut returns.

A convolution whose output only a ReLU reads runs as oneDNN's convolution with a ReLU post-op
(:class:`ConvReLU`, :func:`fuse_conv_relu`): the ReLU's forward pass over the map is gone (VGG-VD-16
relu1_1: 0.65 ms per image in bf16 at batch 8, as long as conv1_1 itself).  Its backward pass is
the ReLU's own (``threshold_backward`` on the output) followed by the convolution's input
gradient, so codes and gradients are bit-identical to the unfused network.

A zero-padded 1 x 1 convolution (SqueezeNet's conv_final), which oneDNN runs up to 10x slower
than an unpadded one, is computed unpadded and given its border, the (rectified) bias
(:func:`border_padding`, inside :class:`ConvReLU`; :func:`unpad_pointwise` for one that no ReLU
follows): values equal to rounding, the same gradients.  :func:`fuse` applies the three
rewrites, the pooling one first (it also saves the ReLU's backward pass).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..objectives import crop_window
from .caffe import CaffeNet, CaffePooling
from .networks import SequentialNet


Fused = tuple[nn.Module, dict[nn.Module, nn.Module]]  # the rewritten network, replaced module -> stand-in


def _rewrite_chain(model: SequentialNet,
                   pair: Callable[[nn.Module, nn.Module], tuple[nn.Module, nn.Module, nn.Module, nn.Module] | None]
                   ) -> Fused | None:
    """``model`` with each adjacent pair of layers ``(a, b)`` for which ``pair(a, b)`` gives
    ``(new_a, new_b, replaced, stand_in)`` rewritten, in a new chain sharing every other module."""
    items = list(model.named_children())
    replaced: dict[nn.Module, nn.Module] = {}
    for i in range(len(items) - 1):
        (a_name, a), (b_name, b) = items[i], items[i + 1]
        done = pair(a, b)
        if done is not None:
            new_a, new_b, old, new = done
            replaced[old] = new
            items[i], items[i + 1] = (a_name, new_a), (b_name, new_b)
    return _sequential_with(model, items, replaced)


def _sequential_with(model: SequentialNet, items: list[tuple[str, nn.Module]],
                     replaced: dict[nn.Module, nn.Module]) -> Fused | None:
    """A new chain of ``items`` with ``model``'s metadata; None when nothing was replaced."""
    if not replaced:
        return None
    chain = SequentialNet(items, arch=model.arch, convention=model.convention)
    chain.classes = model.classes
    return chain, replaced


def _caffe_with(model: CaffeNet, modules: dict[str, nn.Module], replaced: dict[nn.Module, nn.Module]) -> Fused | None:
    """``model``'s layer graph with its modules taken from ``modules``; None when nothing was replaced."""
    if not replaced:
        return None
    return CaffeNet(model.layers, modules, model.input_shapes, model.name, model.blob_shapes()), replaced


def _fusable(relu: nn.Module, pool: nn.Module | None, keep: nn.Module) -> bool:
    return (type(relu) is nn.ReLU and relu is not keep and isinstance(pool, CaffePooling)
            and pool.method == "MAX" and not pool.global_pooling and not pool.relu_first)


def fuse_relu_pool(model: nn.Module, keep: nn.Module) -> tuple[nn.Module, dict[nn.Module, nn.Module]] | None:
    """``model`` with each ReLU -> max-pooling pair fused (the ReLU becomes ``nn.Identity``, the
    pooling a copy that takes the ReLU in), and the map from replaced pooling modules to their
    copies; None when there is no such pair (or ``model`` is neither kind of network).  ``keep``
    is the cut's module: a ReLU that is the cut is left alone."""
    if isinstance(model, SequentialNet):
        def pair(relu: nn.Module, pool: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module] | None:
            if not _fusable(relu, pool, keep):
                return None
            fused_pool = pool.fused_with_relu()  # type: ignore[operator]
            return nn.Identity(), fused_pool, pool, fused_pool

        return _rewrite_chain(model, pair)
    if isinstance(model, CaffeNet):
        modules = {layer.module_name: getattr(model, layer.module_name) for layer in model.layers}
        replaced: dict[nn.Module, nn.Module] = {}
        layers = model.layers
        for i, layer in enumerate(layers):
            relu = modules[layer.module_name]
            if type(relu) is not nn.ReLU or len(layer.bottoms) != 1 or len(layer.tops) != 1:
                continue
            blob = layer.tops[0]
            reader = _only_reader(layers, i, blob)
            if reader is None or blob in layers[reader].tops:
                continue
            pool_layer = layers[reader]
            pool = modules[pool_layer.module_name]
            if not _fusable(relu, pool, keep):
                continue
            replaced[pool] = modules[pool_layer.module_name] = pool.fused_with_relu()  # type: ignore[union-attr]
            modules[layer.module_name] = nn.Identity()
        return _caffe_with(model, modules, replaced)
    return None


@cache
def _pointwise_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


def border_padding(conv: nn.Conv2d) -> tuple[int, int] | None:
    """``(ph, pw)`` for a zero-padded 1 x 1, stride-1 convolution, which :class:`ConvReLU` computes
    unpadded and then surrounds with its border (the bias: a 1 x 1 window there sees only
    padding); None otherwise.

    oneDNN runs such a convolution padded far slower than unpadded: SqueezeNet's conv_final
    (512 -> 1000 channels at 13², padding 1), batch 16, channels-last, 15.8 against 1.6 ms in
    bf16 and 11.1 against 9.0 ms in fp32.
    """
    ph, pw = (int(p) for p in conv.padding)  # type: ignore[union-attr]
    if tuple(conv.kernel_size) != (1, 1) or tuple(conv.stride) != (1, 1) or (ph == 0 and pw == 0):
        return None
    return ph, pw


def _conv_pointwise(x: Tensor, conv: nn.Conv2d, relu: bool) -> Tensor:
    """oneDNN's convolution, with a ReLU post-op when ``relu``: ``F.relu(conv(x))`` bit for bit
    (tested); a :func:`border_padding` convolution computed unpadded and given its border (the
    same values to rounding: the unpadded kernel may sum the channels in another order)."""
    border = border_padding(conv)
    padding = [0, 0] if border is not None else list(conv.padding)
    y = torch.ops.mkldnn._convolution_pointwise(x, conv.weight, conv.bias, padding,  # type: ignore[arg-type]
                                                list(conv.stride), list(conv.dilation), conv.groups,
                                                "relu" if relu else "none", [], "")
    if border is None:
        return y
    ph, pw = border
    n, c, h, w = y.shape
    last = not y.is_contiguous() and y.is_contiguous(memory_format=torch.channels_last)
    out = torch.empty((n, c, h + 2 * ph, w + 2 * pw), dtype=y.dtype, device=y.device,
                      memory_format=torch.channels_last if last else torch.contiguous_format)
    edge = conv.bias.detach().to(y.dtype) if conv.bias is not None else y.new_zeros(c)
    edge = (edge.relu() if relu else edge).view(1, c, 1, 1)
    for strip in (out[:, :, :ph], out[:, :, ph + h :], out[:, :, ph : ph + h, :pw], out[:, :, ph : ph + h, pw + w :]):
        strip.copy_(edge.expand_as(strip))
    out[:, :, ph : ph + h, pw : pw + w] = y
    return out


class _ConvReLUFunction(torch.autograd.Function):
    """``relu(conv(x))`` (or ``conv(x)``) in one oneDNN call; backward: the ReLU's gradient on the
    output, then the convolution's input gradient (:mod:`~preimage.representations.input_conv`'s
    for an image-facing convolution, as the unfused cut computes it)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, conv: nn.Conv2d, relu: bool) -> Tensor:  # type: ignore[override]
        y = _conv_pointwise(x, conv, relu)
        ctx.conv, ctx.relu = conv, relu
        ctx.window = crop_window(x)  # the engine's crop: the input gradient's phases may go to its sink
        ctx.save_for_backward(x, y if relu else None)
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None]:  # type: ignore[override]
        from ..representations import input_conv

        x, y = ctx.saved_tensors
        conv: nn.Conv2d = ctx.conv
        if ctx.relu:
            grad = torch.ops.aten.threshold_backward(grad, y, 0)
        padding = list(conv.padding)
        border = border_padding(conv)
        if border is not None:  # the border does not depend on x
            (ph, pw), (h, w) = border, grad.shape[-2:]
            grad, padding = grad[:, :, ph : h - ph, pw : w - pw], [0, 0]
        if border is None and input_conv.qualifies(conv) and input_conv.method(conv, x) == "subpixel":
            pad = (int(conv.padding[0]), int(conv.padding[1]))  # type: ignore[index]
            dx = input_conv.input_gradient(grad, conv.weight, tuple(conv.stride), pad,  # type: ignore[arg-type]
                                           tuple(x.shape[-2:]), ctx.window)
            return (dx if dx is None else dx.to(x.dtype)), None, None
        (dx, _, _) = torch.ops.aten.convolution_backward(
            grad, x, conv.weight, None, list(conv.stride), padding, list(conv.dilation),  # type: ignore[arg-type]
            False, [0, 0], conv.groups, [True, False, False])
        return dx, None, None


class ConvReLU(nn.Module):
    """``relu(conv(x))`` as one oneDNN convolution with a ReLU post-op on the CPU (fp32 / bf16,
    frozen weights); elsewhere the two modules' own forward.  Shares ``conv``'s parameters.

    ``relu=False`` runs the convolution alone through the same path: :func:`fuse` uses it for a
    :func:`border_padding` convolution that no ReLU follows."""

    def __init__(self, conv: nn.Conv2d, relu: bool = True) -> None:
        super().__init__()
        self.conv, self.relu = conv, relu

    def extra_repr(self) -> str:
        return "" if self.relu else "relu=False"

    def fused_applies(self, x: Tensor) -> bool:
        w = self.conv.weight
        return (x.device.type == "cpu" and x.dim() == 4 and x.dtype == w.dtype
                and x.dtype in (torch.float32, torch.bfloat16) and not w.requires_grad
                and (self.conv.bias is None or not self.conv.bias.requires_grad) and _pointwise_available())

    def forward(self, x: Tensor) -> Tensor:
        if not self.fused_applies(x):
            y = self.conv(x)
            return F.relu(y) if self.relu else y
        if torch.is_grad_enabled() and x.requires_grad:
            return _ConvReLUFunction.apply(x, self.conv, self.relu)
        return _conv_pointwise(x, self.conv, self.relu)


def plain_conv(conv: nn.Module) -> bool:
    """A plain ``nn.Conv2d`` with zero padding given as numbers: what :class:`ConvReLU` runs."""
    return type(conv) is nn.Conv2d and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)


def _conv_fusable(conv: nn.Module, relu: nn.Module | None, keep: nn.Module) -> bool:
    """A :func:`plain_conv` that is not the cut, then a ReLU."""
    return plain_conv(conv) and conv is not keep and type(relu) is nn.ReLU


def fuse_conv_relu(model: nn.Module, keep: nn.Module) -> tuple[nn.Module, dict[nn.Module, nn.Module]] | None:
    """``model`` with each convolution -> ReLU pair fused into a :class:`ConvReLU` (the ReLU
    becomes ``nn.Identity``), and the map from replaced modules (the ReLUs) to their stand-ins;
    None when there is no such pair.  ``keep`` is the cut's module: a convolution that is the cut
    is left alone; a ReLU that is the cut maps to the ``nn.Identity`` that returns its value."""
    if isinstance(model, SequentialNet):
        def pair(conv: nn.Module, relu: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module] | None:
            if not _conv_fusable(conv, relu, keep):
                return None
            identity = nn.Identity()
            return ConvReLU(conv), identity, relu, identity  # type: ignore[arg-type]

        return _rewrite_chain(model, pair)
    if isinstance(model, CaffeNet):
        replaced: dict[nn.Module, nn.Module] = {}
        modules = {layer.module_name: getattr(model, layer.module_name) for layer in model.layers}
        layers = model.layers
        for i, layer in enumerate(layers):
            if len(layer.tops) != 1:
                continue
            reader = _only_reader(layers, i, layer.tops[0])
            if reader is None:
                continue
            conv, relu = modules[layer.module_name], modules[layers[reader].module_name]
            if not _conv_fusable(conv, relu, keep) or len(layers[reader].tops) != 1:
                continue
            modules[layer.module_name] = ConvReLU(conv)  # type: ignore[arg-type]
            replaced[relu] = modules[layers[reader].module_name] = nn.Identity()
        return _caffe_with(model, modules, replaced)
    return None


def _only_reader(layers: list[Any], i: int, blob: str) -> int | None:
    """The index of the one layer after ``i`` that reads ``blob`` (as its only input) before
    anything rewrites it, or None when there is not exactly one such layer."""
    readers: list[int] = []
    for j in range(i + 1, len(layers)):
        if blob in layers[j].bottoms:
            readers.append(j)
        if blob in layers[j].tops:  # rewritten (an in-place layer): later readers see another value
            break
    if len(readers) != 1 or tuple(layers[readers[0]].bottoms) != (blob,):
        return None
    return readers[0]


def unpad_pointwise(model: nn.Module) -> tuple[nn.Module, dict[nn.Module, nn.Module]] | None:
    """``model`` with each :func:`plain_conv` that has :func:`border_padding` (and is not already
    in a :class:`ConvReLU`) run as ``ConvReLU(conv, relu=False)``, the same values computed
    unpadded; and the map from the replaced convolutions to their stand-ins (the cut's own
    convolution included: its output is unchanged).  None when there is none."""
    def stand_in(conv: nn.Module) -> nn.Module | None:
        if plain_conv(conv) and border_padding(conv) is not None:  # type: ignore[arg-type]
            return ConvReLU(conv, relu=False)  # type: ignore[arg-type]
        return None

    replaced: dict[nn.Module, nn.Module] = {}
    if isinstance(model, SequentialNet):
        items = list(model.named_children())
        for i, (name, conv) in enumerate(items):
            new = stand_in(conv)
            if new is not None:
                replaced[conv] = new
                items[i] = (name, new)
        return _sequential_with(model, items, replaced)
    if isinstance(model, CaffeNet):
        modules = {layer.module_name: getattr(model, layer.module_name) for layer in model.layers}
        for name, conv in list(modules.items()):
            new = stand_in(conv)
            if new is not None:
                replaced[conv] = modules[name] = new
        return _caffe_with(model, modules, replaced)
    return None


def fuse(model: nn.Module, keep: nn.Module) -> tuple[nn.Module, dict[nn.Module, nn.Module]] | None:
    """:func:`fuse_relu_pool`, then :func:`fuse_conv_relu`, then :func:`unpad_pointwise` on the
    result: the network and the map from every replaced module to its stand-in, or None when
    none applies.  Any other
    module goes to :func:`~preimage.models.folding.fuse_module` (batch normalization folded, the
    same fusions found by tracing)."""
    if not isinstance(model, (SequentialNet, CaffeNet)):
        from .folding import fuse_module

        return fuse_module(model, keep) if _pointwise_available() else None
    replaced: dict[nn.Module, nn.Module] = {}
    pooled = fuse_relu_pool(model, keep)
    if pooled is not None:
        model, replaced = pooled
    convs = fuse_conv_relu(model, keep) if _pointwise_available() else None
    if convs is not None:
        model, more = convs
        replaced.update(more)
    unpadded = unpad_pointwise(model) if _pointwise_available() else None
    if unpadded is not None:
        model, more = unpadded
        replaced.update(more)
    return (model, replaced) if replaced else None
