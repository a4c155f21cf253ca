"""The image-facing convolution's input gradient: autograd's (oneDNN / cuDNN) against the
sub-pixel form of :mod:`preimage.representations.input_conv`, on one device.

Times one forward + backward to the input (no weight gradients) of the first convolution of
AlexNet (11x11, stride 4), VGG-M and SqueezeNet (7x7, stride 2), 96 filters, in fp32 and bf16,
channels-last, and prints the median milliseconds per batch of both forms and their ratio, and
in bf16 the image padded to 8 channels (``padded_input_gradient``, what CUDA uses).
This is the measurement that decides :data:`input_conv.DEVICES` (the devices that use the
sub-pixel form)::

    .venv/bin/python benchmarks/first_conv.py                   # CPU
    python benchmarks/first_conv.py --device cuda --batch 16,128
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

from preimage.representations import input_conv

LAYERS = {"alexnet/conv1": (11, 4, 0, 227), "vgg-m/conv1": (7, 2, 0, 224), "squeezenet/conv1": (7, 2, 0, 227)}


def timed(step, device: torch.device, reps: int) -> float:
    """Median seconds of ``step()`` over ``reps`` runs after two warm-ups."""
    for _ in range(2):
        step()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def padded(conv: nn.Conv2d, x: torch.Tensor, grad: torch.Tensor) -> None:
    """Forward + the 8-channel input gradient (:func:`input_conv.padded_input_gradient`)."""
    with torch.no_grad():
        conv(x)
        offset = (int(conv.padding[0]), int(conv.padding[1]))
        input_conv.padded_input_gradient(grad, conv.weight, tuple(conv.stride), offset, tuple(x.shape[-2:]))


def measure(name: str, dtype: torch.dtype, batch: int, device: torch.device, reps: int) -> dict:
    kernel, stride, pad, size = LAYERS[name]
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 96, kernel, stride=stride, padding=pad).to(device, dtype).to(memory_format=torch.channels_last)
    conv.requires_grad_(False)
    x = torch.randn(batch, 3, size, size, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    grad = torch.ones_like(conv(x))
    hooks = input_conv.InputGradientHooks([conv])

    def native() -> None:
        x.grad = None
        conv(x).backward(grad)

    def subpixel() -> None:
        x.grad = None
        with hooks:
            conv(x).backward(grad)

    t_padded = None
    saved = set(input_conv.DEVICES)
    try:
        input_conv.DEVICES.add(device.type)  # the sub-pixel form here, for the measurement
        subpixel()
        assert x.grad is not None
        reference = x.grad.clone()
        native()
        agree = ((x.grad.float() - reference.float()).norm() / reference.float().norm()).item()
        t_native, t_sub = timed(native, device, reps), timed(subpixel, device, reps)
        if dtype != torch.float32:  # the 8-channel form (bf16 / fp16 only)
            t_padded = timed(lambda: padded(conv, x, grad), device, reps)
    finally:
        input_conv.DEVICES.clear()
        input_conv.DEVICES.update(saved)
    return {"layer": name, "dtype": str(dtype).split(".")[-1], "batch": batch, "device": str(device),
            "native_ms": 1e3 * t_native, "subpixel_ms": 1e3 * t_sub, "speedup": t_native / t_sub,
            "padded_ms": None if t_padded is None else 1e3 * t_padded, "relative_difference": agree}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", default="8", help="batch sizes, comma-separated")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--json", action="store_true", help="one JSON line per measurement")
    opts = p.parse_args()
    device = torch.device(opts.device)
    for name in LAYERS:
        for dtype in (torch.float32, torch.bfloat16):
            for batch in (int(b) for b in opts.batch.split(",")):
                r = measure(name, dtype, batch, device, opts.reps)
                print(json.dumps(r) if opts.json else
                      f"{r['layer']:<17} {r['dtype']:<9} b{r['batch']:<4} native {r['native_ms']:8.3f} ms  "
                      f"sub-pixel {r['subpixel_ms']:8.3f} ms  x{r['speedup']:.2f}  (rel. diff {r['relative_difference']:.1e})"
                      + ("" if r["padded_ms"] is None else f"  padded to 8 {r['padded_ms']:8.3f} ms"))


if __name__ == "__main__":
    main()
