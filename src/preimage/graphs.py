"""The engine step recorded as a CUDA graph and replayed (issue 5; GPUs only).

On a GPU a step's kernels are short, and at small batches the GPU waits on Python: an H200
finished AlexNet conv1's bare forward + backward at batch 16 in 0.5 ms while the whole engine
step took 2.1 ms, Python launching the crop, the loss kernel, autograd's backward and the fused
update one by one (benchmarks/README.md, "GPU").  A CUDA graph records one step's kernels once
and replays them with one launch.

The engine (:func:`preimage.engine.optimize_batch`) runs the first :data:`WARMUP` iterations of
each stage eagerly, on a side stream as CUDA graphs want (they compile the fused kernels, let
cuDNN choose its algorithms and make every cached constant: the stage's step size, the loss's
scale), then records the next iteration and replays that record for the rest of the stage.
Everything the step reads or writes in place (the canvas, Algorithm 1's ``G`` and ``mu``)
stays at one address; the jitter offsets of each iteration are copied into a fixed device
tensor before its replay.  One record per stage: the step size is part of it.  Same
arithmetic, same results as the eager step (``tests/test_cuda.py``; HOG's CUDA ``index_add_``
is not deterministic, eager or recorded).

Measured on an H200 (benchmarks/README.md, "CUDA graphs"): the engine step 3-14x faster per
image at batch 1 and 1.0-10x at batch 16 (HOG 160² at batch 16: 0.61 -> 0.06 ms per image;
AlexNet conv3 in bf16: 0.22 -> 0.06; VGG-VD-16 conv3_3 and fc8, already GPU-bound: no change).

At batch 128, where the GPU itself is the bottleneck, the record is 0.5-4 % faster than the
eager step (every layer of SqueezeNet, AlexNet and VGG-VD-16 in the benchmark, bf16).  It once
measured 8-22 % slower on first layers: their stages have no jitter (T = 1), the eager step cut
the window with a plain slice while the recorded one gathered it at device offsets (two index
kernels, 0.4 ms of 2.4 at AlexNet conv1); a stage without jitter now keeps its one offset on
the host, recorded or not.

Where recording fails (a representation that reads a value back to the host inside Φ, an
operation CUDA graphs refuse) the engine warns once per process and goes on eagerly.
``optimize(..., graph=True / False)`` decides for a call, :func:`set_default` (the CLI's
``--cuda-graphs`` / ``--no-cuda-graphs``) or ``PREIMAGE_CUDA_GRAPHS=1`` / ``0`` for the process;
by default every CUDA step is recorded.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

WARMUP = 3
"""Eager iterations at the start of every stage before its step is recorded."""

_warned = False


_default: bool | None = None  # set_default's value (the CLI's --cuda-graphs); None: the environment decides


def set_default(on: bool | None) -> None:
    """Whether runs that do not say (``graph=None``) record their CUDA steps: always (True),
    never (False), or as ``PREIMAGE_CUDA_GRAPHS`` says (None)."""
    global _default
    _default = None if on is None else bool(on)


def wanted(graph: bool | None, device: torch.device) -> bool:
    """Whether to record the step: ``graph`` if given; else :func:`set_default`'s value; else
    not if ``PREIMAGE_CUDA_GRAPHS`` says 0 / false / no / off; else yes.  Never off a CUDA device."""
    if device.type != "cuda":
        return False
    if graph is not None:
        return bool(graph)
    if _default is not None:
        return _default
    said = os.environ.get("PREIMAGE_CUDA_GRAPHS", "").strip().lower()
    return said not in ("0", "false", "no", "off")


class RecordedStep:
    """One recorded step: ``step(offsets)`` replays it for this iteration's ``(N, 2)`` device
    offsets and returns its output (a tensor the next replay overwrites)."""

    def __init__(self, graph: torch.cuda.CUDAGraph, offsets: Tensor, out: Tensor) -> None:
        self.graph, self.offsets, self.out = graph, offsets, out

    def __call__(self, offsets: Tensor) -> Tensor:
        self.offsets.copy_(offsets)
        self.graph.replay()
        return self.out


def record(step: Callable[[Tensor], Tensor], offsets: Tensor) -> RecordedStep | None:
    """Record ``step(offsets)`` (nothing runs: the first replay does the iteration); None, with
    one warning for the process, if CUDA cannot record it.  Each record has its own memory pool
    (handing a new stage's record the pool of the last one, which had been freed by then,
    tripped an internal assertion of torch 2.11's CUDA allocator)."""
    global _warned
    static = offsets.clone()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            out = step(static)
    except Exception as err:  # noqa: BLE001 - whatever Φ does that a graph cannot hold
        try:
            torch.cuda.synchronize()
        except Exception:  # noqa: BLE001 - the capture's own error again; the warning names the first
            pass
        while err.__context__ is not None and isinstance(err.__context__, Exception):
            err = err.__context__  # the first failure, not the ended capture's complaint about it
        if not _warned:
            _warned = True
            text = str(err).strip()
            warnings.warn(f"the step could not be recorded as a CUDA graph, running eagerly: "
                          f"{type(err).__name__}: {text.splitlines()[0] if text else ''}", RuntimeWarning, stacklevel=3)
        return None
    return RecordedStep(graph, static, out)


def side_stream(device: torch.device) -> torch.cuda.Stream:
    """A stream for the eager warm-up iterations, ordered after the current stream's work."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    return stream
