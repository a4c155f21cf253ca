"""Importers of pretrained networks as ``torch.nn.Module`` s.

:func:`load_caffe` reads a Caffe ``deploy.prototxt`` and ``.caffemodel`` (no Caffe installation
needed) into a :class:`CaffeNet` with Caffe's exact semantics; see :mod:`preimage.models.caffe`.
"""

from __future__ import annotations

from .caffe import (
    SUPPORTED_LAYERS,
    CaffeLayer,
    CaffeNet,
    ModelError,
    caffe_pool_output_size,
    load_blobproto,
    load_caffe,
    read_caffemodel,
    read_prototxt,
    sanitize_name,
)

__all__ = [
    "SUPPORTED_LAYERS",
    "CaffeLayer",
    "CaffeNet",
    "ModelError",
    "caffe_pool_output_size",
    "load_blobproto",
    "load_caffe",
    "read_caffemodel",
    "read_prototxt",
    "sanitize_name",
]

# --- the paper's networks (Tables 1-3), their importers and the resolver -------------------------
from .matconvnet import load_matconvnet, read_mat  # noqa: E402
from .networks import (  # noqa: E402
    ARCHITECTURES,
    InputConvention,
    Pool2d,
    SequentialNet,
    alexnet,
    caffenet,
    torchvision_alexnet,
    vgg_m,
    vgg_vd_16,
)
from .torchvision_format import load_torchvision  # noqa: E402
from .zoo import LoadedModel, caffe_prototxt, load_caffemodel, load_model, weights_format  # noqa: E402

__all__ += [
    "ARCHITECTURES",
    "InputConvention",
    "LoadedModel",
    "Pool2d",
    "SequentialNet",
    "alexnet",
    "caffe_prototxt",
    "caffenet",
    "load_caffemodel",
    "load_matconvnet",
    "load_model",
    "load_torchvision",
    "read_mat",
    "torchvision_alexnet",
    "vgg_m",
    "vgg_vd_16",
    "weights_format",
]
