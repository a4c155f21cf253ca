"""A ReLU followed by max pooling, run as one kernel in Φ's optimization copy (issue 5).

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
"""

from __future__ import annotations

from torch import nn

from .caffe import CaffeNet, CaffePooling
from .networks import SequentialNet


def _fusable(relu: nn.Module, pool: nn.Module | None, keep: nn.Module) -> bool:
    return (type(relu) is nn.ReLU and relu is not keep and isinstance(pool, CaffePooling)
            and pool.method == "MAX" and not pool.global_pooling and not pool.relu_first)


def fuse_relu_pool(model: nn.Module, keep: nn.Module) -> tuple[nn.Module, dict[nn.Module, nn.Module]] | None:
    """``model`` with each ReLU -> max-pooling pair fused (the ReLU becomes ``nn.Identity``, the
    pooling a copy that takes the ReLU in), and the map from replaced pooling modules to their
    copies; None when there is no such pair (or ``model`` is neither kind of network).  ``keep``
    is the cut's module: a ReLU that is the cut is left alone."""
    if isinstance(model, SequentialNet):
        items = list(model.named_children())
        replaced: dict[nn.Module, nn.Module] = {}
        for i in range(len(items) - 1):
            (relu_name, relu), (pool_name, pool) = items[i], items[i + 1]
            if _fusable(relu, pool, keep):
                replaced[pool] = pool.fused_with_relu()  # type: ignore[union-attr]
                items[i], items[i + 1] = (relu_name, nn.Identity()), (pool_name, replaced[pool])
        if not replaced:
            return None
        fused = SequentialNet(items, arch=model.arch, convention=model.convention)
        fused.classes = model.classes
        return fused, replaced
    if isinstance(model, CaffeNet):
        modules = {layer.module_name: getattr(model, layer.module_name) for layer in model.layers}
        replaced = {}
        layers = model.layers
        for i, layer in enumerate(layers):
            relu = modules[layer.module_name]
            if type(relu) is not nn.ReLU or len(layer.bottoms) != 1 or len(layer.tops) != 1:
                continue
            blob = layer.tops[0]
            readers: list[int] = []
            for j in range(i + 1, len(layers)):
                if blob in layers[j].bottoms:
                    readers.append(j)
                if blob in layers[j].tops:  # rewritten (an in-place layer): later readers see another value
                    break
            if len(readers) != 1 or tuple(layers[readers[0]].bottoms) != (blob,) or blob in layers[readers[0]].tops:
                continue
            pool_layer = layers[readers[0]]
            pool = modules[pool_layer.module_name]
            if not _fusable(relu, pool, keep):
                continue
            replaced[pool] = modules[pool_layer.module_name] = pool.fused_with_relu()  # type: ignore[union-attr]
            modules[layer.module_name] = nn.Identity()
        if not replaced:
            return None
        return CaffeNet(layers, modules, model.input_shapes, model.name, model.blob_shapes()), replaced
    return None
