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
