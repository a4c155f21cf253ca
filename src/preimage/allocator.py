"""Keep glibc from returning the engine's buffers to the OS between iterations (issue 5).

Every step allocates and frees the same few MB-sized tensors (codes, gradients, regularizer
temporaries).  With glibc's defaults, blocks above a dynamic ``mmap`` threshold are mapped and
unmapped on every allocation, and freed heap memory is trimmed eagerly, so each step pays page
faults to touch fresh memory: measured on 2 cores, SqueezeNet conv1 in bf16 at batch 1 ran the
bare forward+backward in 2.8 ms with the buffers kept instead of 3-4.5 ms (and noisy), the whole
engine step in 4.2 ms instead of 5-6 ms.  Blocks over 32 MB (glibc's largest ``mmap``
threshold) are always mapped unless ``mmap`` is off for ``malloc``: VGG-VD-16 conv1_1 in fp32
at batch 3 (38 MB activations) took 18-19 ms per image and step with them mapped, 9.2 without.
:func:`keep_freed_memory` sets, with ``mallopt``, the ``mmap`` threshold to 32 MB, the number of
``mmap``-ed blocks to 0 and the trim threshold to 256 MB -- the equivalent of
``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=268435456`` -- once
per process, the first time the engine runs.  Large blocks then come from the heap, whose free
top beyond 256 MB still goes back to the OS.  It changes only when memory goes back to the OS,
never results.  Set ``PREIMAGE_KEEP_MALLOC=1`` (or run with your own ``MALLOC_*`` settings) to
leave glibc alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

MMAP_THRESHOLD = 32 << 20  # glibc's maximum on 64-bit systems
TRIM_THRESHOLD = 256 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4  # mallopt parameter numbers (malloc.h)

_done: bool | None = None


def keep_freed_memory() -> bool:
    """Apply the settings above once per process; True when glibc accepted them."""
    global _done
    if _done is not None:
        return _done
    _done = False
    if not sys.platform.startswith("linux") or os.environ.get("PREIMAGE_KEEP_MALLOC"):
        return _done
    if any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_MAX_")):
        return _done  # the user chose
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...): nothing to tune
        return _done
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = (bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_MMAP_MAX, 0))
             and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)))
    return _done
