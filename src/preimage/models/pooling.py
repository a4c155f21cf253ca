"""Max pooling for Φ (issue 5): ``F.max_pool2d``, through the C kernels on the CPU.

torch's CPU max pooling keeps an int64 input index per output, zero-fills the input gradient
and scatters into it; in bf16 channels-last its kernels ran at a fraction of the memory's speed
(SqueezeNet's pool1 at batch 16, a 38 MB input: 7.3 ms forward, 11.3 ms backward).
:func:`preimage.native.max_pool` computes the same outputs bit for bit in one pass, keeps one
byte per output (the maximum's position in its window) and gathers the gradient per input pixel,
written once.  Gradients are torch's values (the same additions in the same order, in fp32; in
bf16 rounded once, where torch's bf16 kernel rounds after each addition of overlapping windows).
Elsewhere (CUDA, float64, other layouts, ``PREIMAGE_NATIVE=0``, no C compiler) this is
``F.max_pool2d``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import native


def torch_pool_size(size: int, kernel: int, stride: int, pad: int, dilation: int, ceil: bool) -> int:
    """torch's pooled size (ATen ``pooling_output_shape``)."""
    span = size + 2 * pad - dilation * (kernel - 1) - 1
    out = (-(-span // stride) if ceil else span // stride) + 1
    if ceil and (out - 1) * stride >= size + pad:
        out -= 1
    return out


class _MaxPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, kernel: tuple[int, int], stride: tuple[int, int], pad: tuple[int, int],
                out_size: tuple[int, int], nhwc: bool, relu: bool) -> Tensor:  # type: ignore[override]
        out = native.max_pool(x, kernel, stride, pad, out_size, indices=True, relu=relu)
        assert out is not None
        y, idx = out
        ctx.save_for_backward(idx)
        ctx.geometry = (tuple(x.shape), kernel, stride, pad, nhwc)
        return y

    @staticmethod
    def backward(ctx, gy: Tensor):  # type: ignore[override]
        (idx,) = ctx.saved_tensors
        in_shape, kernel, stride, pad, nhwc = ctx.geometry
        gx = native.max_pool_backward(gy, idx, in_shape, kernel, stride, pad, nhwc)
        return gx, None, None, None, None, None, None


def _torch(x: Tensor, kernel: tuple[int, int], stride: tuple[int, int], pad: tuple[int, int], ceil_mode: bool,
           relu: bool) -> Tensor:
    return F.max_pool2d(F.relu(x) if relu else x, kernel, stride, pad, ceil_mode=ceil_mode)


def max_pool2d(x: Tensor, kernel: tuple[int, int], stride: tuple[int, int], pad: tuple[int, int],
               ceil_mode: bool, relu: bool = False) -> Tensor:
    """``F.max_pool2d(x, kernel, stride, pad, ceil_mode=ceil_mode)`` (``pad`` at most half the
    kernel, as torch requires), of ``F.relu(x)`` if ``relu``, through
    :func:`preimage.native.max_pool` where it applies: then the ReLU costs nothing (the pooled
    maximum is clipped at 0 and its gradient dropped where it was not positive; the same values
    and gradients, since max pooling and the ReLU commute)."""
    nhwc = native.pool_layout(x, kernel, stride, pad)  # (None with PREIMAGE_NATIVE=0: no library)
    if nhwc is None:
        return _torch(x, kernel, stride, pad, ceil_mode, relu)
    out_size = tuple(torch_pool_size(s, k, st, p, 1, ceil_mode) for s, k, st, p in zip(x.shape[2:], kernel, stride, pad))
    if min(out_size) < 1:
        return _torch(x, kernel, stride, pad, ceil_mode, relu)  # torch's own error
    if torch.is_grad_enabled() and x.requires_grad:
        return _MaxPool.apply(x, kernel, stride, pad, out_size, nhwc, relu)
    out = native.max_pool(x, kernel, stride, pad, out_size, indices=False, relu=relu)
    assert out is not None
    return out[0]
