"""The compiled step on the CPU: hand-written C kernels (``native.c``), built on first use.

On the CPU, inductor's code for :func:`preimage.fused.fused_update` makes four passes over the
canvas (masked loads for the TV differences, a second pass for the projection's per-pixel norm)
and its code for :func:`preimage.fused.squared_distance` two passes over the code, a few times
slower than memory allows.  ``native.c`` does the same arithmetic in one pass each:

* :func:`update` -- the regularizers (N_alpha, eq. 5; TV^beta with beta = 2), Algorithm 1 and
  the projection onto the B+ ball (eq. 6):
  reads ``x``, the data term's gradient, ``G`` and ``mu`` once and writes ``x``, ``G``, ``mu``
  once, row by row (the TV stencil reads the rows above and below from a copy of the old rows);
  the gradient either the canvas's or a :class:`~preimage.objectives.WindowGradient`, read in
  the windows where it lies (:func:`window_canvas` writes one out);
* :func:`squared_distance` -- the L2 loss (eq. 2) and its gradient, in fp32 or bf16 (rounded to
  nearest even, as torch), reading the code and the target once;
* :func:`crop` / :func:`uncrop` -- the jitter crop (eq. 7) fused with a network's input
  conversion (division by ``std``, bf16, channels-last) and its gradient, one pass each where
  ATen makes one copy per element plus two to four conversions each way (used by
  :meth:`preimage.representations.cnn.ModuleCut.encode_crops`);
* :func:`max_pool` / :func:`max_pool_backward` -- max pooling as ``F.max_pool2d`` computes it, in
  fp32 or bf16, NCHW or channels-last, with a one-byte window position per output where torch
  keeps an int64 input index, and a gradient gathered per input pixel (written once) where torch
  zero-fills the input gradient and scatters into it (used by
  :func:`preimage.models.pooling.max_pool2d`);
* :func:`lrn` -- Caffe's ACROSS_CHANNELS LRN and its gradient (used by
  :class:`~preimage.models.caffe.CaffeLRN`), in fp32 or bf16 (fp32 arithmetic), NCHW or
  channels-last, one pass each way where torch's form made about six;
* :func:`dsift_normalize` / :func:`dsift_normalize_backward` -- DSIFT's descriptor normalization
  in plain arithmetic (the optimization's DSIFT, ``vlfeat_rounding=False``), a frame at a time,
  where torch makes a dozen passes over strided ``(n, 128, F)`` views each way;
* :func:`hog_pool` / :func:`hog_pool_backward` -- HOG's bilinear spatial pooling into cells and
  its transpose (used by :mod:`preimage.representations.hog`), one pass each where torch's form
  made index tensors, two ``index_add_`` per term and batched products (four ``index_select``
  per term back);
* :func:`dsift_maps` / :func:`dsift_maps_backward` -- DSIFT's orientation maps (gradients, fast
  atan2 angle, modulus, the split between two bins) in plain arithmetic and their transpose, one
  pass each where torch's form made some twenty element-wise passes, a zero fill and two
  ``index_add_`` (two ``index_select`` and a dozen passes back);
* :func:`dsift_pool` / :func:`dsift_pool_backward` -- the same maps fused with DSIFT's banded
  spatial binning (the usual geometry, the step a multiple of the bin size), the maps never
  stored (rows computed into a small ring and binned, 4 bins at once in registers); the transpose
  fused with the maps' and the finite differences' (where torch's form padded the maps, made
  two batched products each way and a strided copy of the descriptors).

Measured on 2 cores (benchmarks/README.md): 16 x 3 x 227 x 227 update 4.7 -> ~1.4 ms; the
VGG-VD-16 conv1_1 loss (16 x 64 x 224 x 224, bf16) 42 -> ~14 ms.

The library is compiled with the system's C compiler (``$CC``, else ``cc``; the same one
``torch.compile`` needs on the CPU) with ``-O3 -march=native -fopenmp`` into
``$PREIMAGE_CACHE`` (default ``~/.cache/preimage``), named by a hash of the source, the flags
and the CPU, so it is built once per machine (~1 s); it is written to a temporary
name and renamed, so concurrent processes never load a half-written file.  Where the cache
cannot be written, the build goes to ``$TMPDIR/preimage-UID`` instead.  If it cannot be
built or loaded, :func:`library` returns None and the engine uses ``torch.compile``'s kernels
instead.  ``PREIMAGE_NATIVE=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("native.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fPIC", "-shared", "-std=c11"]

_lib: ctypes.CDLL | None = None
_failure: str | None = None  # why the library is unavailable, once tried
_warned = False


def enabled() -> bool:
    """False when ``PREIMAGE_NATIVE`` says 0 / false / no / off."""
    return os.environ.get("PREIMAGE_NATIVE", "").strip().lower() not in ("0", "false", "no", "off")


def cache_dir() -> Path:
    """Where the built library goes: ``$PREIMAGE_CACHE``, else ``$XDG_CACHE_HOME/preimage``, else
    ``~/.cache/preimage``."""
    if os.environ.get("PREIMAGE_CACHE"):
        return Path(os.environ["PREIMAGE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "preimage"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return platform.processor()


def _build() -> Path:
    """Compile ``native.c`` unless a build for this source, these flags and this CPU is cached."""
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(FLAGS).encode(), platform.machine().encode(),
                                     _cpu_flags().encode()])).hexdigest()[:16]
    target = cache_dir() / f"native-{key}.so"
    if target.exists():
        return target
    compiler = os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C compiler ({compiler!r} not found)")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".native-", suffix=".so", dir=target.parent)
    except OSError:  # an unwritable cache: build for this user in the temporary directory instead
        target = Path(tempfile.gettempdir()) / f"preimage-{os.getuid()}" / target.name
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".native-", suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            said = (done.stderr or done.stdout).strip().splitlines()
            raise RuntimeError(f"{compiler} failed: {said[-1] if said else f'exit status {done.returncode}'}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def library(quiet: bool = False) -> ctypes.CDLL | None:
    """The loaded kernels, built on first use; None when they cannot be built or loaded (with
    one warning per process, unless ``quiet``: the engine's default only asks whether they
    are there), or when ``PREIMAGE_NATIVE=0``."""
    global _lib, _failure, _warned
    if not enabled():
        return None
    if _lib is not None:
        return _lib
    if _failure is not None:
        if not quiet and not _warned:
            _warned = True
            warnings.warn(f"preimage's C kernels are unavailable, using torch.compile's: {_failure}",
                          RuntimeWarning, stacklevel=2)
        return None
    try:
        lib = ctypes.CDLL(str(_build()))
        p, i64, f64, f32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_float, ctypes.c_int
        lib.preimage_update.argtypes = [p, p, p, p, i64, i64, i64, i64, f64, f64, f64, f64, f64, f64, f64, f32, p, p, i32]
        for name in ("preimage_l2_f32", "preimage_l2_bf16"):
            getattr(lib, name).argtypes = [p, p, p, p, p, i64, i64, i32]
        lib.preimage_crop.argtypes = [p, p, p, p, i64, i64, i64, i64, i64, i64, i32, i32, i32]
        lib.preimage_uncrop.argtypes = [p, p, p, p, *[i64] * 10, i32, i32]
        lib.preimage_update_window.argtypes = [p, p, p, p, p, p, p, p, i64, i64, i64, i64, f64, f64, f64, f64, f64, f64,
                                               f64, f32, p, p, i32]
        lib.preimage_window_canvas.argtypes = [p, p, p, p, p, p, i64, i64, i64, i64, i32]
        lib.preimage_maxpool.argtypes = [p, p, p, *[i64] * 12, i32, i32, i32, i32]
        lib.preimage_maxpool_backward.argtypes = [p, p, p, *[i64] * 12, i32, i32, i32]
        lib.preimage_dsift_normalize.argtypes = [p, i64, i64, i64, p, i64, i64, f32, f32, f32, i32]
        lib.preimage_dsift_normalize_backward.argtypes = [p, i64, i64, i64, p, i64, i64, i64, p, i64, i64, i64, i64,
                                                          i64, f32, f32, f32, i32]
        lib.preimage_lrn.argtypes = [p, p, i64, i64, i64, i64, f32, f32, f32, i32, i32, i32]
        lib.preimage_lrn_backward.argtypes = [p, p, p, i64, i64, i64, i64, f32, f32, f32, i32, i32, i32]
        lib.preimage_hog_pool.argtypes = [p, p, p, p, p, p, p, p, *[i64] * 6, i32]
        lib.preimage_hog_pool_backward.argtypes = [p, p, p, p, p, p, p, p, *[i64] * 6, i32]
        lib.preimage_hog_differences.argtypes = [p, i64, i64, i64, i64, p, p, p, p, i32]
        lib.preimage_hog_differences_backward.argtypes = [p, p, p, p, f32, p, p, p, f32, p, p, i64, i64, i64, i64, i32]
        lib.preimage_hog_orientations.argtypes = [p, p, p, p, i64, i64, p, p, p, p, p, i32]
        lib.preimage_hog_normalize.argtypes = [p, i64, p, i64, i64, i64, i64, f32, i32]
        lib.preimage_hog_normalize_backward.argtypes = [p, i64, p, p, i64, i64, i64, i64, f32, i32]
        lib.preimage_dsift_maps.argtypes = [p, p, *[i64] * 7, p, i32]
        lib.preimage_dsift_maps_backward.argtypes = [p, p, p, p, *[i64] * 7, p, i32]
        lib.preimage_dsift_pool.argtypes = [p, p, *[i64] * 11, p, p, p, i32]
        lib.preimage_dsift_pool_backward.argtypes = [p, p, p, *[i64] * 11, p, p, p, i32]
        for name in ("preimage_update", "preimage_update_window", "preimage_window_canvas", "preimage_l2_f32",
                     "preimage_l2_bf16", "preimage_crop", "preimage_uncrop", "preimage_maxpool",
                     "preimage_maxpool_backward", "preimage_dsift_normalize", "preimage_dsift_normalize_backward",
                     "preimage_lrn", "preimage_lrn_backward", "preimage_hog_pool",
                     "preimage_hog_pool_backward", "preimage_hog_orientations", "preimage_hog_normalize",
                     "preimage_hog_normalize_backward", "preimage_dsift_maps", "preimage_dsift_maps_backward",
                     "preimage_dsift_pool", "preimage_dsift_pool_backward"):
            getattr(lib, name).restype = i32
        _lib = lib
    except Exception as err:  # noqa: BLE001 - no compiler, a failed build, an unloadable file
        _failure = f"{type(err).__name__}: {err}"
        return library(quiet)
    return _lib


def failure() -> str | None:
    """Why :func:`library` returned None, if it was tried and failed."""
    return _failure


def _cpu_dense(*tensors: Tensor) -> bool:
    return all(t.device.type == "cpu" and t.is_contiguous() for t in tensors)


def _window(window: Any, shape: tuple[int, ...]) -> tuple[Tensor, ...] | None:
    """The C arguments of a :class:`~preimage.objectives.WindowGradient` for a canvas of
    ``shape`` ``(N, C, Hc, Wc)`` (kept referenced by the caller for the call): ``values``, the
    descriptor, offsets, divisor, scale; None where the kernels do not apply (values not fp32 or
    bf16 on the CPU, a divisor or scale not fp32, windows beyond the canvas, no library)."""
    v = window.values
    if v.dim() != 6 or v.dtype not in (torch.float32, torch.bfloat16) or v.device.type != "cpu" or len(shape) != 4:
        return None
    N, C, A, s, Bw, s2 = v.shape
    (H, W), (top, left) = window.size, window.origin
    if (N, C) != tuple(shape[:2]) or s2 != s or s < 1 or min(top, left) < 0:
        return None
    extra = [t for t in (window.divisor, window.scale) if t is not None]
    if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in extra):
        return None
    if (window.divisor is not None and window.divisor.numel() != C) or (window.scale is not None
                                                                        and window.scale.numel() != N):
        return None
    offsets = window.offsets.to(torch.int64).contiguous()
    if offsets.shape != (N, 2) or library(quiet=True) is None:
        return None
    pairs = offsets.tolist()
    if pairs:
        rows, cols = [r for r, _ in pairs], [c for _, c in pairs]
        if min(rows + cols) < 0 or max(rows) + H > shape[2] or max(cols) + W > shape[3]:
            return None
    sn, sc, sa, sy, sb, sx = v.stride()
    desc = torch.tensor([int(v.dtype == torch.bfloat16), s, A, Bw, top, left, sn, sc, sa, sy, sb, sx, H, W],
                        dtype=torch.int64)
    div = window.divisor.contiguous() if window.divisor is not None else None
    scale = window.scale.contiguous() if window.scale is not None else None
    return v, desc, offsets, div, scale  # type: ignore[return-value]


def _pointers(args: tuple[Tensor | None, ...]) -> list[int | None]:
    return [None if t is None else t.data_ptr() for t in args]


def window_canvas(window: Any, shape: tuple[int, ...]) -> Tensor | None:
    """The canvas gradient of a :class:`~preimage.objectives.WindowGradient`, a new fp32
    ``shape`` tensor, in one pass; None where the kernels do not apply (see :func:`_window`)."""
    args = _window(window, shape)
    if args is None:
        return None
    out = torch.empty(shape)
    library(quiet=True).preimage_window_canvas(*_pointers(args), out.data_ptr(), *shape,  # type: ignore[union-attr]
                                               torch.get_num_threads())
    return out


def update(x: Tensor, grad: Tensor | Any, G: Tensor, mu: Tensor, lr: float, *, alpha: float, B: float,
           B_plus: float, V: float, lambda_alpha: float, lambda_tv: float, rho: float) -> tuple[Tensor, Tensor] | None:
    """:func:`preimage.fused.fused_update` (beta = 2) in one pass: updates ``x``, ``G``, ``mu``
    in place and returns ``(N_alpha, TV^2)`` per element before the step; None where the
    kernels do not apply (not fp32, not contiguous, not on the CPU, no library).  ``grad``, the
    data term's gradient, is the canvas's or a :class:`~preimage.objectives.WindowGradient`,
    read in its windows (the same arithmetic, bit for bit, as its :meth:`canvas`)."""
    window = None if isinstance(grad, Tensor) else grad
    dense = [G, mu] if window is not None else [grad, G, mu]
    if x.dim() != 4 or x.dtype != torch.float32 or not all(t.dtype == torch.float32 and t.shape == x.shape
                                                          for t in dense):
        return None
    if not _cpu_dense(x, *dense):
        return None
    lib = library()
    if lib is None:
        return None
    args = _window(window, tuple(x.shape)) if window is not None else None
    if window is not None and args is None:
        return None
    N, C, H, W = x.shape
    e_range = torch.empty(N)
    e_tv = torch.empty(N)
    common = (N, C, H, W, alpha, B, B_plus, V, lambda_alpha, lambda_tv, rho, float(lr), e_range.data_ptr(),
              e_tv.data_ptr(), torch.get_num_threads())
    if args is not None:
        status = lib.preimage_update_window(x.data_ptr(), *_pointers(args), G.data_ptr(), mu.data_ptr(), *common)
    else:
        status = lib.preimage_update(x.data_ptr(), grad.data_ptr(), G.data_ptr(), mu.data_ptr(), *common)
    if status != 0:
        raise MemoryError("out of memory in the engine's update kernel")
    return e_range, e_tv


def squared_distance(code: Tensor, target: Tensor, scale: Tensor) -> tuple[Tensor, Tensor] | None:
    """:func:`preimage.fused.squared_distance` in one pass: ``scale * ||code - target||²`` per
    element (fp32) and ``2 * scale * (code - target)`` in the code's dtype and layout; None where
    the kernels do not apply (another dtype, layouts that differ or are not dense with the batch
    outermost, not on the CPU, no library)."""
    kernel = {torch.float32: "preimage_l2_f32", torch.bfloat16: "preimage_l2_bf16"}.get(code.dtype)
    if kernel is None or target.dtype != code.dtype or target.shape != code.shape or code.dim() < 1:
        return None
    N = code.shape[0]
    if N == 0 or code.stride() != target.stride() or code.device.type != "cpu" or target.device.type != "cpu":
        return None
    M = code[0].numel()
    dense = code.is_contiguous() or (code.dim() == 4 and code.is_contiguous(memory_format=torch.channels_last))
    if not dense or code.stride(0) != M or scale.shape != (N,):
        return None
    lib = library()
    if lib is None:
        return None
    scale = scale.detach().to(torch.float32).contiguous()
    grad = torch.empty_like(code)
    value = torch.empty(N)
    status = getattr(lib, kernel)(code.data_ptr(), target.data_ptr(), scale.data_ptr(), grad.data_ptr(),
                                  value.data_ptr(), N, M, torch.get_num_threads())
    if status != 0:
        raise MemoryError("out of memory in the engine's loss kernel")
    return value, grad


def crop_applies(canvas: Tensor, offsets: Tensor, size: tuple[int, int], divisor: Tensor | None,
                 dtype: torch.dtype) -> bool:
    """Whether :func:`crop` runs for these arguments (and the library is there)."""
    if canvas.dim() != 4 or canvas.dtype != torch.float32 or dtype not in (torch.float32, torch.bfloat16):
        return False
    if not _cpu_dense(canvas) or offsets.shape != (canvas.shape[0], 2):
        return False
    if divisor is not None and (divisor.dtype != torch.float32 or divisor.numel() != canvas.shape[1]):
        return False
    if offsets.numel():
        (r_min, c_min), (r_max, c_max) = offsets.amin(0).tolist(), offsets.amax(0).tolist()
        if min(r_min, c_min) < 0 or r_max + size[0] > canvas.shape[2] or c_max + size[1] > canvas.shape[3]:
            return False
    return library(quiet=True) is not None


def crop(canvas: Tensor, offsets: Tensor, size: tuple[int, int], divisor: Tensor | None, dtype: torch.dtype,
         channels_last: bool) -> Tensor | None:
    """The jitter crop (eq. 7) of each element of an fp32 canvas ``(N, C, Hc, Wc)`` at its
    ``offsets`` row ``(r, c)``, divided per channel by ``divisor`` (None: not), in ``dtype``
    (fp32 or bf16, rounded to nearest even) and channels-last memory if asked, in one pass:
    what ``(canvas[n, :, r:r+H, c:c+W] / divisor).to(dtype, channels_last)`` gives, bit for bit.
    None where the kernel does not apply (:func:`crop_applies`; :func:`uncrop` is the gradient)."""
    if not crop_applies(canvas, offsets, size, divisor, dtype):
        return None
    return crop_kernel(canvas, offsets, size, divisor, dtype, channels_last)


def crop_kernel(canvas: Tensor, offsets: Tensor, size: tuple[int, int], divisor: Tensor | None, dtype: torch.dtype,
                channels_last: bool) -> Tensor:
    """:func:`crop` for arguments that :func:`crop_applies` has accepted (not checked again)."""
    lib = library(quiet=True)
    assert lib is not None
    N, C = canvas.shape[:2]
    H, W = size
    layout = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty((N, C, H, W), dtype=dtype, memory_format=layout)
    offsets = offsets.to(torch.int64).contiguous()
    div = divisor.contiguous() if divisor is not None else None
    status = lib.preimage_crop(canvas.data_ptr(), offsets.data_ptr(), None if div is None else div.data_ptr(),
                               out.data_ptr(), N, C, canvas.shape[2], canvas.shape[3], H, W,
                               int(dtype == torch.bfloat16), int(channels_last), torch.get_num_threads())
    if status != 0:
        raise MemoryError("out of memory in the engine's crop kernel")
    return out


def uncrop(grad: Tensor, offsets: Tensor, canvas_shape: tuple[int, ...], divisor: Tensor | None) -> Tensor:
    """The gradient of :func:`crop` w.r.t. the canvas: a new fp32 ``canvas_shape`` tensor, zero
    outside each element's window and ``grad / divisor`` inside it, in one pass.  ``grad``
    ``(N, C, H, W)`` is fp32 or bf16 with any strides (a convolution's input gradient can be a
    view into a padded tensor)."""
    lib = library(quiet=True)
    assert lib is not None and grad.dtype in (torch.float32, torch.bfloat16) and grad.device.type == "cpu"
    N, C, H, W = grad.shape
    out = torch.empty(canvas_shape)
    offsets = offsets.to(torch.int64).contiguous()
    div = divisor.contiguous() if divisor is not None else None
    lib.preimage_uncrop(grad.data_ptr(), offsets.data_ptr(), None if div is None else div.data_ptr(), out.data_ptr(),
                        N, C, canvas_shape[2], canvas_shape[3], H, W, *grad.stride(), int(grad.dtype == torch.bfloat16),
                        torch.get_num_threads())
    return out


def dsift_normalize(hist: Tensor, out: Tensor, eps: float, clamp: float, tiny: float) -> bool:
    """DSIFT's descriptor normalization in plain arithmetic (``dsift._normalize`` with
    ``vlfeat_math=False``) from ``hist`` ``(N, 128, F)`` (any strides) into ``out`` ``(N, F, 128)``
    (contiguous), one pass; False (``out`` untouched) where it does not apply (not fp32 on the
    CPU, no library).  The backward pass is :func:`dsift_normalize_backward`."""
    if not (hist.dtype == out.dtype == torch.float32 and hist.device.type == out.device.type == "cpu"
            and hist.dim() == 3 and hist.shape[1] == 128 and out.is_contiguous()
            and out.shape == (hist.shape[0], hist.shape[2], 128)):
        return False
    lib = library(quiet=True)
    if lib is None:
        return False
    N, _, F = hist.shape
    lib.preimage_dsift_normalize(hist.data_ptr(), *hist.stride(), out.data_ptr(), N, F, eps, clamp, tiny,
                                 torch.get_num_threads())
    return True


def dsift_normalize_backward(grad: Tensor, hist: Tensor, eps: float, clamp: float, tiny: float,
                             frames_major: bool = False) -> Tensor:
    """The gradient w.r.t. ``hist`` ``(N, 128, F)`` of :func:`dsift_normalize`, given ``grad``
    ``(N, F, 128)`` (any strides); the frame's forward arithmetic is recomputed from ``hist``.
    A new tensor, contiguous, or with ``frames_major`` a view of a contiguous ``(F, N, 128)`` one
    (the layout of :func:`dsift_pool`)."""
    lib = library(quiet=True)
    assert lib is not None and grad.dtype == hist.dtype == torch.float32
    N, _, F = hist.shape
    gh = torch.empty(F, N, 128).permute(1, 2, 0) if frames_major else torch.empty(N, 128, F)
    lib.preimage_dsift_normalize_backward(hist.data_ptr(), *hist.stride(), grad.data_ptr(), *grad.stride(),
                                          gh.data_ptr(), *gh.stride(), N, F, eps, clamp, tiny, torch.get_num_threads())
    return gh


def pool_layout(x: Tensor, kernel: tuple[int, int], stride: tuple[int, int], pad: tuple[int, int]) -> bool | None:
    """``x``'s layout for :func:`max_pool`: False for NCHW, True for channels-last, None where
    the kernels do not apply (not a dense, non-empty fp32 / bf16 CPU tensor of 4 dimensions,
    windows over 255 pixels, no library)."""
    if kernel[0] * kernel[1] > 255 or min(*kernel, *stride) < 1 or min(pad) < 0:
        return None
    return _map_layout(x)


def _map_layout(x: Tensor) -> bool | None:
    """A feature map's layout for the kernels that take one (:func:`max_pool`, :func:`lrn`):
    False for NCHW, True for channels-last, None where they do not apply (not a dense, non-empty
    fp32 / bf16 CPU tensor of 4 dimensions, no library)."""
    if x.dim() != 4 or x.dtype not in (torch.float32, torch.bfloat16) or x.device.type != "cpu" or not x.numel():
        return None
    if library(quiet=True) is None:
        return None
    if x.is_contiguous():
        return False
    return True if x.is_contiguous(memory_format=torch.channels_last) else None


def max_pool(x: Tensor, kernel: tuple[int, int], stride: tuple[int, int], pad: tuple[int, int],
             out_size: tuple[int, int], indices: bool = True, relu: bool = False,
             ) -> tuple[Tensor, Tensor | None] | None:
    """``F.max_pool2d(x, kernel, stride, pad)`` (dilation 1; ``out_size`` from torch's rounding)
    in one pass, the same values (NaN included), in ``x``'s dtype and layout, with the maximum's
    position in its window per output (uint8, None unless ``indices``) for
    :func:`max_pool_backward`; with ``relu``, of ``F.relu(x)`` (255 in the index: no gradient).
    None where it does not apply (:func:`pool_layout`, windows over 255 pixels, no library)."""
    nhwc = pool_layout(x, kernel, stride, pad)
    if nhwc is None:
        return None
    lib = library(quiet=True)
    assert lib is not None
    N, C, H, W = x.shape
    OH, OW = out_size
    layout = torch.channels_last if nhwc else torch.contiguous_format
    y = torch.empty((N, C, OH, OW), dtype=x.dtype, memory_format=layout)
    idx = torch.empty((N, C, OH, OW), dtype=torch.uint8, memory_format=layout) if indices else None
    status = lib.preimage_maxpool(x.data_ptr(), y.data_ptr(), None if idx is None else idx.data_ptr(), N, C, H, W,
                                  OH, OW, *kernel, *stride, *pad, int(x.dtype == torch.bfloat16), int(nhwc),
                                  int(relu), torch.get_num_threads())
    if status != 0:
        raise MemoryError("out of memory in the max-pooling kernel")
    return y, idx


def max_pool_backward(gy: Tensor, idx: Tensor, in_shape: tuple[int, ...], kernel: tuple[int, int],
                      stride: tuple[int, int], pad: tuple[int, int], nhwc: bool) -> Tensor:
    """The gradient of :func:`max_pool` w.r.t. its input (shape ``in_shape``, channels-last if
    ``nhwc`` -- the input's layout, which ``idx``'s does not always tell --, ``gy``'s dtype), as
    torch computes it, bit for bit: each output's gradient added at its maximum, in output order
    (in bf16 rounded after each addition, as torch's kernel)."""
    lib = library(quiet=True)
    assert lib is not None
    layout = torch.channels_last if nhwc else torch.contiguous_format
    gy = gy.contiguous(memory_format=layout)
    N, C, H, W = in_shape
    gx = torch.empty((N, C, H, W), dtype=gy.dtype, memory_format=layout)
    status = lib.preimage_maxpool_backward(gy.data_ptr(), idx.data_ptr(), gx.data_ptr(), N, C, H, W, *idx.shape[2:],
                                           *kernel, *stride, *pad, int(gy.dtype == torch.bfloat16), int(nhwc),
                                           torch.get_num_threads())
    if status != 0:
        raise MemoryError("out of memory in the max-pooling kernel")
    return gx


def lrn_layout(x: Tensor) -> bool | None:
    """``x``'s layout for :func:`lrn` (:func:`_map_layout`: None where the kernels do not apply)."""
    return _map_layout(x)


def lrn(x: Tensor, size: int, alpha: float, beta: float, k: float, grad: Tensor | None = None) -> Tensor | None:
    """Caffe's ACROSS_CHANNELS LRN of ``x`` (:class:`~preimage.models.caffe.CaffeLRN`), in one
    pass, in ``x``'s dtype and layout (fp32 arithmetic); with ``grad``, its gradient w.r.t. ``x``
    for that output gradient instead (``s`` recomputed from ``x``: one pass reading ``x`` and
    ``grad``).  None where it does not apply (:func:`lrn_layout`)."""
    nhwc = lrn_layout(x)
    if nhwc is None:
        return None
    lib = library(quiet=True)
    assert lib is not None
    layout = torch.channels_last if nhwc else torch.contiguous_format
    N, C, H, W = x.shape
    out = torch.empty_like(x, memory_format=layout)
    args = (N, C, H * W, size, alpha, beta, k, int(x.dtype == torch.bfloat16), int(nhwc), torch.get_num_threads())
    if grad is None:
        status = lib.preimage_lrn(x.data_ptr(), out.data_ptr(), *args)
    else:
        grad = grad.to(x.dtype).contiguous(memory_format=layout)
        status = lib.preimage_lrn_backward(x.data_ptr(), grad.data_ptr(), out.data_ptr(), *args)
    if status != 0:
        raise MemoryError("out of memory in the LRN kernel")
    return out


def hog_applies(value: Tensor) -> bool:
    """Whether :func:`hog_pool` / :func:`hog_pool_backward` take HOG's terms like ``value``:
    fp32 on the CPU, with the library."""
    return value.dtype == torch.float32 and value.device.type == "cpu" and library(quiet=True) is not None


def hog_pool(terms: list[tuple[Tensor, Tensor]], top: Tensor, left: Tensor, corner: Tensor,
             cells: tuple[int, int], n_slots: int) -> Tensor:
    """HOG's bilinear spatial pooling (``hog._pool`` before the slot mixing) in one pass: the
    ``(N, Hc, Wc, T * n_slots)`` cell histograms of the ``T`` = 1 or 2 terms ``(slot, value)``
    (int32 and fp32, ``(N, H', W')``), given each interior row's and column's upper-left cell
    ``top`` ``(H',)``, ``left`` ``(W',)`` (int32) and the ``(4, H', W')`` corner weights."""
    lib = library(quiet=True)
    assert lib is not None
    (slot0, value0), *rest = [(s.contiguous(), v.contiguous()) for s, v in terms]
    slot1, value1 = rest[0] if rest else (None, None)
    n, hi, wi = slot0.shape
    hc, wc = cells
    out = torch.empty(n, hc, wc, len(terms) * n_slots)
    status = lib.preimage_hog_pool(*_pointers((slot0, value0, slot1, value1, top, left, corner, out)),
                                   n, hi, wi, hc, wc, n_slots, torch.get_num_threads())
    if status != 0:
        raise MemoryError("out of memory in the HOG pooling kernel")
    return out


def hog_pool_backward(padded: Tensor, slots: list[Tensor], top: Tensor, left: Tensor, corner: Tensor,
                      n_slots: int) -> list[Tensor]:
    """The transpose of :func:`hog_pool`: each term's value gradient ``(N, H', W')`` from the
    cells' gradients ``padded`` ``(N, Hc + 2, Wc + 2, T * n_slots)`` (a ring of zeros around the
    grid), given the terms' slots."""
    lib = library(quiet=True)
    assert lib is not None
    slot0, *rest = [s.contiguous() for s in slots]
    slot1 = rest[0] if rest else None
    n, hi, wi = slot0.shape
    grads = [torch.empty(n, hi, wi) for _ in slots]
    lib.preimage_hog_pool_backward(*_pointers((padded.contiguous(), slot0, slot1, top, left, corner, grads[0],
                                               grads[1] if rest else None)),
                                   n, hi, wi, padded.shape[1] - 2, padded.shape[2] - 2, n_slots,
                                   torch.get_num_threads())
    return grads


def hog_differences(image: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """HOG's central differences (``hog._central_differences``) in one pass over the fp32
    ``(N, C, H, W)`` image: ``gx, gy, g2`` ``(N, H - 2, W - 2)`` of the channel with the largest
    ``g2`` (the first on ties) and that channel (int32, ``None`` for gray images)."""
    lib = library(quiet=True)
    assert lib is not None
    image = image.contiguous()
    n, c, h, w = image.shape
    gx, gy, g2 = (torch.empty(n, h - 2, w - 2) for _ in range(3))
    channel = torch.empty(n, h - 2, w - 2, dtype=torch.int32) if c > 1 else None
    lib.preimage_hog_differences(image.data_ptr(), n, c, h, w, *_pointers((gx, gy, g2, channel)),
                                 torch.get_num_threads())
    return gx, gy, g2, channel


def hog_differences_backward(grad0: Tensor, grad1: Tensor | None, along: Tensor | None, across: Tensor | float | None,
                             gx: Tensor, gy: Tensor, magnitude: Tensor, channel: Tensor | None, out: Tensor) -> None:
    """The transpose of HOG's orientation terms and central differences (``hog._backward`` after
    the pooling's transpose), written to the contiguous fp32 image gradient ``out``
    ``(N, C, H, W)``: from the gradients of the terms' values ``grad0`` (``|g|``) and ``grad1``
    (HOGb's, with its ``along`` and ``across`` factors; ``None`` for HOG), the forward pass's
    gradient ``gx, gy`` and ``magnitude`` ``|g|`` (the unit gradient ``g / max(|g|, tiny)`` is
    formed here) and the selected ``channel`` of :func:`hog_differences`."""
    lib = library(quiet=True)
    assert lib is not None and out.is_contiguous()
    n, c, h, w = out.shape
    across_t = across.contiguous() if isinstance(across, Tensor) else None
    across_k = float(across) if across is not None and across_t is None else 0.0
    tensors = (grad0, grad1, along, across_t, gx, gy, magnitude, channel)
    g0, g1, al, ac, u, v, m, ch = (None if t is None else t.contiguous() for t in tensors)
    if lib.preimage_hog_differences_backward(*_pointers((g0, g1, al, ac)), across_k, *_pointers((u, v, m)),
                                             torch.finfo(torch.float32).tiny, *_pointers((ch, out)),
                                             n, c, h, w, torch.get_num_threads()) != 0:
        raise MemoryError("out of memory in the HOG differences kernel")


def hog_orientations(gx: Tensor, gy: Tensor, g2: Tensor, table: Tensor, bilinear: bool
                     ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """HOG's orientation assignment (``hog._orientations``) with libvl's scan on every pixel: from
    the fp32 gradients ``gx, gy`` and ``g2 = gx^2 + gy^2`` (any shape, the same) and VLFeat's
    ``(K, 2)`` table of ``(cos, sin)``, the best orientation slot (int32) and ``|g|``; with
    ``bilinear`` (``K > 1``) also HOGb's lower slot (int32), ``along = side * w1`` (``side`` = +-1
    the side of the best centre where the second bin lies, 0 for a null gradient; ``w1`` libvl's
    weight of the second bin) and ``term = |g| along``."""
    lib = library(quiet=True)
    assert lib is not None
    gx, gy, g2 = gx.contiguous(), gy.contiguous(), g2.contiguous()
    slot = torch.empty(gx.shape, dtype=torch.int32)
    magnitude = torch.empty(gx.shape)
    lower, term, along = ((torch.empty(gx.shape, dtype=torch.int32), torch.empty(gx.shape), torch.empty(gx.shape))
                          if bilinear else (None, None, None))
    lib.preimage_hog_orientations(*_pointers((gx, gy, g2, table.contiguous())), gx.numel(), table.shape[0],
                                  *_pointers((slot, magnitude, lower, term, along)), torch.get_num_threads())
    return slot, magnitude, lower, term, along


def _images_of(hist: Tensor) -> Tensor:
    """``hist`` ``(N, 2K, Hc, Wc)`` with each image's block contiguous (image ``n`` at
    ``n * hist.stride(0)``), copied only when it is not."""
    _, c, h, w = hist.shape
    return hist if hist.stride()[1:] == (h * w, w, 1) and hist.stride(0) >= c * h * w else hist.contiguous()


def hog_normalize(hist: Tensor, texture: float) -> Tensor:
    """HOG's UoCTTI block normalization (``hog._normalize``): the ``(N, 3K + 4, Hc, Wc)`` codes of
    the fp32 directed histograms ``hist`` ``(N, 2K, Hc, Wc)``, ``texture`` the texture features'
    factor."""
    lib = library(quiet=True)
    assert lib is not None
    hist = _images_of(hist)
    n, two_k, hc, wc = hist.shape
    code = torch.empty(n, 3 * two_k // 2 + 4, hc, wc)
    if lib.preimage_hog_normalize(hist.data_ptr(), hist.stride(0), code.data_ptr(), n, two_k // 2, hc, wc, texture,
                                  torch.get_num_threads()) != 0:
        raise MemoryError("out of memory in the HOG normalization kernel")
    return code


def hog_normalize_backward(hist: Tensor, grad: Tensor, texture: float) -> Tensor:
    """The transpose of :func:`hog_normalize` at ``hist``: the histograms' gradient
    ``(N, 2K, Hc, Wc)`` from the codes' gradient ``grad`` ``(N, 3K + 4, Hc, Wc)``."""
    lib = library(quiet=True)
    assert lib is not None
    hist, grad = _images_of(hist), grad.to(torch.float32).contiguous()
    n, two_k, hc, wc = hist.shape
    out = torch.empty(n, two_k, hc, wc)
    if lib.preimage_hog_normalize_backward(hist.data_ptr(), hist.stride(0), grad.data_ptr(), out.data_ptr(), n,
                                           two_k // 2, hc, wc, texture, torch.get_num_threads()) != 0:
        raise MemoryError("out of memory in the HOG normalization kernel")
    return out


def dsift_maps_applies(pixels: Tensor) -> bool:
    """Whether :func:`dsift_maps` / :func:`dsift_maps_backward` take the pixel-major ``(H, W, N)``
    image ``pixels``: fp32 on the CPU, at least 2 x 2 pixels, with the library."""
    return (pixels.dtype == torch.float32 and pixels.device.type == "cpu" and pixels.dim() == 3
            and min(pixels.shape[:2]) >= 2 and library(quiet=True) is not None)


def dsift_maps(pixels: Tensor, maps: Tensor, rows: tuple[int, int], cols: tuple[int, int], constants: Tensor) -> None:
    """DSIFT's orientation maps in plain arithmetic (``dsift._orientations`` and the scatter of
    ``dsift._histograms``) in one pass: writes the ``(R, Cm, N, 8)`` maps ``maps`` (contiguous)
    of the ``(H, W, N)`` image ``pixels`` over image rows ``rows = (first, R)`` and columns
    ``cols = (first, Cm)``; positions outside the image are left as they are.  ``constants``:
    fp32 ``(eps, c3, c1, pi/4, pi/2, 2 pi, tiny)``."""
    lib = library(quiet=True)
    assert lib is not None and maps.is_contiguous() and pixels.is_contiguous()
    H, W, N = pixels.shape
    lib.preimage_dsift_maps(pixels.data_ptr(), maps.data_ptr(), N, H, W, *rows, *cols, constants.data_ptr(),
                            torch.get_num_threads())


def dsift_maps_backward(pixels: Tensor, grad: Tensor, rows: tuple[int, int], cols: tuple[int, int],
                        constants: Tensor) -> tuple[Tensor, Tensor]:
    """The transpose of :func:`dsift_maps`: the gradients of the image's finite differences
    ``gx``, ``gy`` (``(H, W, N)`` each; zero outside the maps) from the maps' gradient ``grad``
    (contiguous), each pixel's forward arithmetic recomputed from ``pixels``."""
    lib = library(quiet=True)
    assert lib is not None and grad.is_contiguous()
    H, W, N = pixels.shape
    dgx, dgy = torch.empty(H, W, N), torch.empty(H, W, N)
    lib.preimage_dsift_maps_backward(pixels.data_ptr(), grad.data_ptr(), dgx.data_ptr(), dgy.data_ptr(), N, H, W,
                                     *rows, *cols, constants.data_ptr(), torch.get_num_threads())
    return dgx, dgy


def dsift_pool(pixels: Tensor, grid: tuple[int, ...], kernels: tuple[Tensor, Tensor], constants: Tensor) -> Tensor:
    """DSIFT's orientation maps and banded spatial binning in one pass (``dsift._histograms`` with
    banded axes, plain arithmetic): the ``(F, N, 128)`` spatial histograms (frames, images,
    dimension ``t + 8 bx + 32 by``) of the ``(H, W, N)`` pixel-major image ``pixels``.
    ``grid``: ``(rows.first, rows.centres, cols.first, cols.centres, bin size, step / bin size,
    nfy, nfx)``; ``kernels``: the rows' and columns' ``(4, 2s)`` fp32 window kernels;
    ``constants``: as :func:`dsift_maps`.  The maps are not stored (see ``native.c``)."""
    lib = library(quiet=True)
    assert lib is not None and pixels.is_contiguous() and all(k.is_contiguous() for k in kernels)
    H, W, N = pixels.shape
    hist = torch.empty(grid[-2] * grid[-1], N, 128)
    if lib.preimage_dsift_pool(pixels.data_ptr(), hist.data_ptr(), N, H, W, *grid, kernels[0].data_ptr(),
                               kernels[1].data_ptr(), constants.data_ptr(), torch.get_num_threads()):
        raise MemoryError("dsift_pool: out of memory for its row buffers")
    return hist


def dsift_pool_backward(pixels: Tensor, grad: Tensor, grid: tuple[int, ...], kernels: tuple[Tensor, Tensor],
                        constants: Tensor) -> Tensor:
    """The transpose of :func:`dsift_pool`: the ``(H, W, N)`` gradient of the image ``pixels``
    (finite differences included) from ``grad``, the histograms' ``(F, N, 128)`` gradient
    (contiguous); each pixel's forward arithmetic is recomputed from ``pixels``."""
    lib = library(quiet=True)
    assert lib is not None and grad.is_contiguous() and pixels.is_contiguous()
    H, W, N = pixels.shape
    out = torch.empty(H, W, N)
    if lib.preimage_dsift_pool_backward(pixels.data_ptr(), grad.data_ptr(), out.data_ptr(), N, H, W, *grid,
                                        kernels[0].data_ptr(), kernels[1].data_ptr(), constants.data_ptr(),
                                        torch.get_num_threads()):
        raise MemoryError("dsift_pool_backward: out of memory for its line buffers")
    return out
