"""Benchmark suite of the pre-image engine (issue 5 §1).

For every *case* -- a representation (HOG, HOGb, DSIFT, or a CNN cut at a layer), an input size,
a precision and a batch size -- one run measures:

* **engine**: seconds per image per iteration of the whole engine step of
  :func:`preimage.engine.optimize` (jitter crop, Φ forward, loss, regularizers, backward to the
  image, Algorithm-1 update, projection), timed over ``k`` iterations after a warm-up;
* **bare**: the same for a bare forward + backward-to-input of the representation as the engine
  differentiates it (``rep.for_optimization()``: DSIFT without VLFeat's rounding, CNNs with the
  sub-pixel backward of their first convolution), ``phi(x).backward(ones)`` with the output
  gradient formed once, no loss, no weight gradients; and the ratio engine / bare;
* **full inversion**: seconds per image of the default inversion (300 + 50 = 350 iterations,
  :func:`preimage.visualizations.invert`): really run for HOG / HOGb / DSIFT, estimated as
  ``350 x engine step`` for CNNs (``"estimated": true``) unless ``--full``;
* **FLOPs** of one bare forward + backward (:class:`torch.utils.flop_counter.FlopCounterMode`;
  null for HOG / DSIFT, whose work is mostly not counted), the achieved GFLOP/s of the engine step
  and its fraction of the machine's peak, measured in the same run in fp32 and in bf16 as the
  better of a large matrix product and a 3 x 3 convolution (``peak_kernels`` has both);
* **peak memory** of the case, run in a fresh subprocess (``--case ID --json-line``):
  ``ru_maxrss`` on CPU, ``torch.cuda.max_memory_allocated`` on CUDA.  ``--in-process`` measures
  every case in the driver's process instead (no interpreter start, CUDA initialization and
  model build per case: what a short GPU lease wants); CUDA's peak is reset per case, while the
  CPU's ``ru_maxrss`` is then the process's peak so far (recorded as ``ru_maxrss_process``).

It prints a table and a *targets* section (PASS / FAIL / SKIP with the numbers, never an
assertion) and writes everything to a JSON file (atomically, after every case).

Usage (from the repository root)::

    .venv/bin/python benchmarks/run.py                                 # everything, CPU
    .venv/bin/python benchmarks/run.py --quick --only hog --out /tmp/x.json   # smoke test, seconds
    .venv/bin/python benchmarks/run.py --only squeezenet,alexnet --precision bf16 --batch 1,16
    .venv/bin/python benchmarks/run.py --device cuda --full --compile --in-process
    .venv/bin/python benchmarks/run.py --case "alexnet/conv3@227:bf16:b16" --json-line   # one case

Case ids read ``FAMILY[/LAYER]@SIZE:PRECISION:bBATCH``, e.g. ``hog@160:fp32:b16`` or
``squeezenet/fire5/concat@227:bf16:b1``.  ``--only`` takes families (``hog``, ``hogb``, ``dsift``,
``squeezenet``, ``alexnet``, ``vgg-m``, ``vgg-vd-16``) or ``family/layer``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from preimage import graphs
from preimage.allocator import keep_freed_memory
from preimage.defaults import PAPER
from preimage.engine import Stage, Trace, optimize
from preimage.objectives import L2Loss
from preimage.representations.base import Representation

HERE = Path(__file__).resolve()
SHARED = HERE.parents[2] / "shared"  # beside the checkout
SQUEEZENET_DIR = SHARED / "models" / "squeezenet-v1.0"
DEFAULT_OUT = HERE.parent / "results.json"
FULL_ITERATIONS = PAPER.iterations + PAPER.fine_iterations  # 350: the default inversion

SHALLOW = ("hog", "hogb", "dsift")
CNN_LAYERS: dict[str, tuple[str, str, str]] = {  # early, middle, last
    "squeezenet": ("conv1", "fire5/concat", "pool_final"),
    "alexnet": ("conv1", "conv3", "fc8"),
    "vgg-m": ("conv1", "conv3", "fc8"),
    "vgg-vd-16": ("conv1_1", "conv3_3", "fc8"),
}
CNN_INPUT = {"squeezenet": 227, "alexnet": 227, "vgg-m": 224, "vgg-vd-16": 224}
FAMILIES = (*SHALLOW, *CNN_LAYERS)

Record = dict[str, Any]


# ------------------------------------------------------------------------------------ cases


@dataclass(frozen=True)
class Case:
    """One measurement: a representation at an input size, precision and batch size."""

    family: str
    layer: str | None  # None for HOG / HOGb / DSIFT
    size: int
    precision: str
    batch: int

    @property
    def shallow(self) -> bool:
        return self.layer is None

    @property
    def id(self) -> str:
        name = self.family if self.layer is None else f"{self.family}/{self.layer}"
        return f"{name}@{self.size}:{self.precision}:b{self.batch}"

    @classmethod
    def parse(cls, text: str) -> "Case":
        """Inverse of :attr:`id`."""
        try:
            name, rest = text.split("@", 1)
            size, precision, batch = rest.split(":")
            family, _, layer = name.partition("/")
            if family not in FAMILIES or precision not in ("fp32", "bf16") or not batch.startswith("b"):
                raise ValueError
            return cls(family, layer or None, int(size), precision, int(batch[1:]))
        except ValueError:
            raise SystemExit(f"bad case id {text!r}: expected FAMILY[/LAYER]@SIZE:PRECISION:bBATCH") from None


def select_cases(only: Sequence[str] | None, sizes: Sequence[int], precisions: Sequence[str],
                 batches: Sequence[int], quick: bool) -> list[Case]:
    """The cases of a run, in table order.

    ``only`` holds families (all their default layers; ``quick``: the early layer only) or
    ``family/layer`` (that layer, which may be any layer of the network).
    """
    wanted = list(dict.fromkeys(only or []))
    bad = [w for w in wanted if w.split("/", 1)[0] not in FAMILIES or (w.split("/", 1)[0] in SHALLOW and "/" in w)]
    if bad:
        raise SystemExit(f"--only: unknown {', '.join(bad)}; choose from {', '.join(FAMILIES)} or a CNN's family/layer")

    cases: list[Case] = []
    for family in SHALLOW:
        if not wanted or family in wanted:
            cases += [Case(family, None, size, "fp32", batch) for size in sizes for batch in batches]
    for family, default_layers in CNN_LAYERS.items():
        named = [w.split("/", 1)[1] for w in wanted if w.startswith(f"{family}/")]
        layers = list(default_layers[:1] if quick else default_layers) if not wanted or family in wanted else []
        layers += [layer for layer in named if layer not in layers]
        cases += [Case(family, layer, CNN_INPUT[family], precision, batch)
                  for layer in layers for precision in precisions for batch in batches]
    return cases


# ------------------------------------------------------------------------- representations


def squeezenet_prototxt() -> str:
    """SqueezeNet v1.0's deploy.prototxt (same layer names as the released one), for random weights."""
    out = ['name: "SqueezeNet_v1.0"', 'input: "data"', "input_dim: 1", "input_dim: 3", "input_dim: 227",
           "input_dim: 227"]

    def layer(name: str, kind: str, bottoms: Sequence[str], top: str, params: str = "") -> None:
        lines = [f'  name: "{name}"', f'  type: "{kind}"', *(f'  bottom: "{b}"' for b in bottoms),
                 f'  top: "{top}"']
        out.append("layer {\n" + "\n".join(lines) + (f"\n  {params}" if params else "") + "\n}")

    def conv(name: str, bottom: str, num: int, kernel: int, stride: int = 1, pad: int = 0) -> str:
        layer(name, "Convolution", [bottom], name,
              f"convolution_param {{ num_output: {num} kernel_size: {kernel} stride: {stride} pad: {pad} }}")
        layer(f"{name.rsplit('/', 1)[0]}/relu_{name.rsplit('/', 1)[-1]}" if "/" in name else f"relu_{name}",
              "ReLU", [name], name)
        return name

    def pool(name: str, bottom: str) -> str:
        layer(name, "Pooling", [bottom], name, "pooling_param { pool: MAX kernel_size: 3 stride: 2 }")
        return name

    top = pool("pool1", conv("conv1", "data", 96, 7, stride=2))
    fires = {2: (16, 64), 3: (16, 64), 4: (32, 128), 5: (32, 128), 6: (48, 192), 7: (48, 192), 8: (64, 256),
             9: (64, 256)}
    for i, (squeeze, expand) in fires.items():
        s = conv(f"fire{i}/conv1x1_1", top, squeeze, 1)
        e1 = conv(f"fire{i}/conv1x1_2", s, expand, 1)
        e3 = conv(f"fire{i}/conv3x3_2", s, expand, 3, pad=1)
        top = f"fire{i}/concat"
        layer(top, "Concat", [e1, e3], top)
        if i in (4, 8):
            top = pool(f"pool{i}", top)
    layer("drop9", "Dropout", [top], top, "dropout_param { dropout_ratio: 0.5 }")
    final = conv("conv_final", top, 1000, 1, pad=1)
    layer("pool_final", "Pooling", [final], "pool_final", "pooling_param { pool: AVE global_pooling: true }")
    return "\n".join(out) + "\n"


def load_squeezenet(force_random: bool = False) -> tuple[Any, str]:
    """SqueezeNet v1.0: the released weights from ``../shared`` if present, else random weights."""
    from preimage.models.zoo import load_model

    proto, weights = SQUEEZENET_DIR / "deploy.prototxt", SQUEEZENET_DIR / "squeezenet_v1.0.caffemodel"
    if not force_random and proto.is_file() and weights.is_file():
        return load_model(proto, weights), "real"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "squeezenet-v1.0" / "deploy.prototxt"
        path.parent.mkdir()
        path.write_text(squeezenet_prototxt())
        return load_model(path), "random"


def build_representation(case: Case, force_random_squeezenet: bool = False) -> tuple[Representation, str]:
    """The representation Φ of ``case`` and its weights (``"real"``, ``"random"`` or ``"n/a"``)."""
    if case.shallow:
        from preimage.representations import make_representation

        return make_representation(case.family), "n/a"
    assert case.layer is not None
    if case.family == "squeezenet":
        loaded, weights = load_squeezenet(force_random_squeezenet)
    else:
        from preimage.models.zoo import load_model

        loaded, weights = load_model(case.family), "random"
    return loaded.representation(case.layer, precision=case.precision), weights


def case_problem(case: Case, device: torch.device, force_random_squeezenet: bool = False
                 ) -> tuple[Representation, str, Tensor, L2Loss]:
    """``case``'s representation on ``device``, its weights' kind, the photos and the inversion
    loss of their codes (what every measurement of a case starts from)."""
    rep, weights = build_representation(case, force_random_squeezenet)
    rep = rep.to(device)
    photos = sample_photos(case.batch, case.size).to(device)
    with torch.no_grad():
        target = rep(rep.preprocess(photos)).float()
    return rep, weights, photos, L2Loss(target)


def sample_photos(batch: int, size: int) -> Tensor:
    """``batch`` copies of scikit-image's astronaut, centre-cropped and resized to ``size`` (RGB, [0, 1])."""
    try:
        from skimage import data

        photo = torch.from_numpy(data.astronaut().copy()).permute(2, 0, 1).float() / 255
    except Exception:  # pragma: no cover - a smooth synthetic image instead
        yy, xx = torch.meshgrid(torch.linspace(0, 1, 512), torch.linspace(0, 1, 512), indexing="ij")
        photo = torch.stack([yy, xx, (torch.sin(12 * xx) * torch.cos(9 * yy) + 1) / 2])
    side = min(photo.shape[-2:])
    top, left = (photo.shape[-2] - side) // 2, (photo.shape[-1] - side) // 2
    photo = photo[None, :, top : top + side, left : left + side]
    photo = torch.nn.functional.interpolate(photo, size=(size, size), mode="bilinear", antialias=True,
                                            align_corners=False).clamp(0, 1)
    return photo.expand(batch, -1, -1, -1).contiguous()


# ------------------------------------------------------------------------------ measurements


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels (CUDA); a no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_engine(rep: Representation, loss: L2Loss, size: int, batch: int, warmup: int, iters: int,
                device: torch.device, compile: bool | None = None) -> tuple[float, Trace]:
    """Seconds per engine step (whole batch): ``iters`` steps of one :func:`optimize` call after
    ``warmup``; and the engine's :class:`Trace` (whether the step ran fused, ``compiled``, and
    whether it skipped Φ for ``AᵀA``, ``quadratic``).

    Time stamps are taken in the engine's callback, so set-up and tear-down of :func:`optimize`
    are not counted.  On the CPU every step is stamped and the median step is reported (this
    shared 2-core machine has bursts of interference that a mean of a few steps absorbs: one
    full run put VGG-VD-16 conv3_3 bf16 b1 at 37 ms per image against 25 in interleaved A/B);
    on CUDA, where a stamp would synchronize every step, the mean over ``gcd(warmup, iters)``-step
    intervals.
    """
    stamps: dict[int, float] = {}

    def stamp(t: int, _total: int, _energies: dict[str, float]) -> None:
        synchronize(device)
        stamps[t] = time.perf_counter()

    if device.type == "cuda":  # past the eager steps and the record of a CUDA-graph step (preimage.graphs)
        warmup = max(warmup, graphs.WARMUP + 2)
    every = 1 if device.type == "cpu" else math.gcd(warmup, iters)
    trace = optimize(rep, loss, (size, size), list(range(batch)), PAPER, [Stage(warmup + iters)], device=device,
                     callback=stamp, callback_every=every, batch_size=batch, compile=compile)
    if every == 1 and warmup >= 1:
        return statistics.median(stamps[t + 1] - stamps[t] for t in range(warmup, warmup + iters)), trace
    return (stamps[warmup + iters] - stamps[warmup]) / iters, trace


def bare_step(rep: Representation, x: Tensor, grads: list[Tensor]) -> None:
    """One forward + backward to the input ``x`` (no weight gradients): Φ alone, fed a fixed
    output gradient (formed once, in the code's dtype and layout, and kept in ``grads``), so
    that no loss is timed -- the floor the engine builds on."""
    x.grad = None
    code = rep(x)
    if not grads:
        grads.append(torch.ones_like(code))
    code.backward(grads[0])


def bare_input(rep: Representation, batch: int, size: int, device: torch.device) -> Tensor:
    """A noise image batch in the representation's input space, requiring gradients."""
    g = torch.Generator().manual_seed(0)
    return (torch.randn(batch, rep.in_channels, size, size, generator=g) * 40).to(device).requires_grad_()


def time_bare(rep: Representation, batch: int, size: int, warmup: int, iters: int, device: torch.device) -> float:
    """Seconds per bare forward + backward-to-input (whole batch) of Φ as the engine runs it:
    the median step on the CPU, the mean on CUDA (as :func:`time_engine`)."""
    rep = rep.for_optimization()
    x = bare_input(rep, batch, size, device)
    grads: list[Tensor] = []
    for _ in range(warmup):
        bare_step(rep, x, grads)
    synchronize(device)
    if device.type == "cpu":
        steps = []
        for _ in range(iters):
            start = time.perf_counter()
            bare_step(rep, x, grads)
            steps.append(time.perf_counter() - start)
        return statistics.median(steps)
    start = time.perf_counter()
    for _ in range(iters):
        bare_step(rep, x, grads)
    synchronize(device)
    return (time.perf_counter() - start) / iters


def count_flops(rep: Representation, batch: int, size: int, device: torch.device) -> int:
    """FLOPs counted by :class:`FlopCounterMode` in one bare forward + backward (whole batch), of
    Φ's own arithmetic (``rep``, not ``for_optimization``, whose sub-pixel backward multiplies
    some zero taps)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = bare_input(rep, batch, size, device)
    counter = FlopCounterMode(display=False)
    with counter:
        bare_step(rep, x, [])
    return int(counter.get_total_flops())


def time_full_inversion(rep: Representation, photos: Tensor, device: torch.device, compile: bool | None = None) -> float:
    """Seconds for the default inversion (300 + 50 iterations) of the whole batch, target code included."""
    from preimage.visualizations import invert

    synchronize(device)
    start = time.perf_counter()
    invert(rep, photos, seeds=[0], settings=PAPER, device=device, batch_size=len(photos), compile=compile)
    synchronize(device)
    return time.perf_counter() - start


def max_rss_mb() -> float:
    """The process's peak resident set size so far, in MiB (``ru_maxrss`` is in KiB on Linux)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


def run_case(case: Case, opts: argparse.Namespace) -> Record:
    """Measure one case in this process (meant to be a fresh one: peak memory is the process's)."""
    keep_freed_memory()  # what the engine does on its first call: the bare timing gets it too
    device = torch.device(opts.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    rss_before = max_rss_mb()
    rep, weights, photos, loss = case_problem(case, device, opts.random_squeezenet)
    iters = opts.shallow_iters if case.shallow else opts.iters
    warmup = max(1, opts.warmup)

    engine, trace = time_engine(rep, loss, case.size, case.batch, warmup, iters, device, opts.compile)
    bare = time_bare(rep, case.batch, case.size, warmup, iters, device)
    flops = count_flops(rep, case.batch, case.size, device)
    estimated = not (case.shallow or opts.full)
    full = FULL_ITERATIONS * engine if estimated else time_full_inversion(rep, photos, device, opts.compile)

    per_img = 1.0 / case.batch
    gflop = None if case.shallow or flops == 0 else flops * per_img / 1e9
    if device.type == "cuda":
        peak_mb, memory = torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_memory_allocated"
    else:
        peak_mb, memory = max_rss_mb(), "ru_maxrss_process" if getattr(opts, "in_process", False) else "ru_maxrss"
    return {
        "id": case.id,
        "family": case.family,
        "layer": case.layer,
        "kind": "shallow" if case.shallow else "cnn",
        "size": case.size,
        "precision": case.precision,
        "batch": case.batch,
        "device": str(device),
        "representation": getattr(rep, "name", case.family),
        "weights": weights,
        "code_shape": list(loss.target.shape[1:]),
        "threads": torch.get_num_threads(),
        "compiled": trace.compiled,  # the step ran fused (C kernels on CPU, else torch.compile)
        "quadratic": trace.quadratic,  # the loss came from AᵀA: Φ itself never ran (representations/affine.py)
        "compile_option": opts.compile,  # True / False as asked, None: the engine's default
        "graphed": trace.graphed,  # CUDA: the timed steps were replays of a recorded CUDA graph
        "graph_option": opts.graph,  # --graph / --no-graph; None: the default (recorded)
        "warmup": warmup,
        "iterations_timed": iters,
        "engine_s_per_img_iter": engine * per_img,
        "bare_s_per_img_iter": bare * per_img,
        "ratio_engine_bare": engine / bare,
        "full_inversion_iterations": FULL_ITERATIONS,
        "full_inversion_s_per_img": full * per_img,
        "inversions_per_s": case.batch / full,
        "estimated": estimated,
        "flops_counted_per_iter": flops,
        "gflop_per_img_iter": gflop,
        "gflops_engine": None if gflop is None else gflop / (engine * per_img),
        "gflops_bare": None if gflop is None else gflop / (bare * per_img),
        "peak_memory_mb": peak_mb,
        "memory_measure": memory,
        "rss_before_mb": rss_before,
        "wall_s": time.perf_counter() - started,
    }


def measure_peak(device: torch.device, precisions: Sequence[str], size: int, reps: int,
                 kernels: dict[str, dict[str, float]] | None = None) -> dict[str, float]:
    """Peak GFLOP/s per precision: the better of a ``size x size`` matrix product and a 3 x 3
    convolution (256 -> 256 channels at 56², channels-last, batch ``max(1, size // 256)``), each
    the best of ``reps`` after a warm-up.

    The matrix product alone understated this CPU's bf16 peak: ``torch.matmul`` ran at about
    2100-2300 GFLOP/s while oneDNN's AMX convolutions in VGG-VD-16 ran at 2700-3500, which made
    their "% of peak" exceed 100.  ``kernels``, if given, receives each kernel's own figure.
    """
    peak: dict[str, float] = {}
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}

    def best(fn: Callable[[], object]) -> float:
        fn()
        synchronize(device)
        fastest = math.inf
        for _ in range(max(1, reps)):
            start = time.perf_counter()
            fn()
            synchronize(device)
            fastest = min(fastest, time.perf_counter() - start)
        return fastest

    for precision in precisions:
        g = torch.Generator().manual_seed(0)
        dtype = dtypes[precision]
        a, b = (torch.randn(size, size, generator=g).to(device, dtype) for _ in range(2))
        batch = max(1, size // 256)
        x = torch.randn(batch, 256, 56, 56, generator=g).to(device, dtype).contiguous(memory_format=torch.channels_last)
        w = torch.randn(256, 256, 3, 3, generator=g).to(device, dtype).contiguous(memory_format=torch.channels_last)
        figures = {"matmul": 2 * size**3 / best(lambda: a @ b) / 1e9,
                   "conv3x3": 2 * 9 * 256 * 256 * 56 * 56 * batch / best(lambda: F.conv2d(x, w, padding=1)) / 1e9}
        peak[precision] = max(figures.values())
        if kernels is not None:
            kernels[precision] = figures
    return peak


def machine_info(device: torch.device) -> Record:
    """Threads, CPU model, torch version and accelerator of this run."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: Record = {
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "squeezenet_weights": "real" if (SQUEEZENET_DIR / "squeezenet_v1.0.caffemodel").is_file() else "random",
    }
    if device.type == "cuda":
        info["cuda_device"] = torch.cuda.get_device_name(device)
        info["cuda_version"] = torch.version.cuda
    return info


# ------------------------------------------------------------------------------------ targets


ROUND_FIELDS = ("engine_s_per_img_iter", "bare_s_per_img_iter", "ratio_engine_bare", "full_inversion_s_per_img",
                "peak_memory_mb", "wall_s")
"""What each round of a case keeps in its merged record's ``rounds`` (see :func:`merge_rounds`)."""


def merge_rounds(records: Sequence[Record]) -> Record:
    """One record from the rounds of one case (``--rounds``): the rounds that did not fail, with
    the engine and bare times their medians, the engine / bare ratio the median of each round's
    own ratio (both measured in one process, close in time), and everything derived from the
    times recomputed from the medians; each round's figures kept in ``rounds``, failed rounds
    counted in ``rounds_failed``.  All rounds failed: the last round's error record."""
    ok = [r for r in records if "error" not in r]
    if not ok:
        return {**records[-1], "rounds_failed": len(records)}
    merged = dict(ok[0])
    engine = statistics.median(r["engine_s_per_img_iter"] for r in ok)
    bare = statistics.median(r["bare_s_per_img_iter"] for r in ok)
    merged.update(engine_s_per_img_iter=engine, bare_s_per_img_iter=bare,
                  ratio_engine_bare=statistics.median(r["ratio_engine_bare"] for r in ok),
                  peak_memory_mb=max(r["peak_memory_mb"] for r in ok), wall_s=sum(r["wall_s"] for r in ok))
    full = statistics.median(r["full_inversion_s_per_img"] for r in ok) if not merged["estimated"] \
        else FULL_ITERATIONS * engine
    merged.update(full_inversion_s_per_img=full, inversions_per_s=1.0 / full)
    gflop = merged.get("gflop_per_img_iter")
    if gflop is not None:
        merged.update(gflops_engine=gflop / engine, gflops_bare=gflop / bare)
    merged["rounds"] = [{k: r[k] for k in ROUND_FIELDS} for r in ok]
    merged["rounds_failed"] = len(records) - len(ok)
    return merged


def _target(tid: str, text: str, checks: list[Record], threshold: float, better: str) -> Record:
    """Aggregate per-item ``checks`` (each with a ``value``) into one PASS / FAIL / SKIP target."""
    ok = (lambda v: v <= threshold) if better == "lower" else (lambda v: v >= threshold)
    for c in checks:
        c["pass"] = ok(c["value"])
    if not checks:
        return {"id": tid, "target": text, "status": "SKIP", "value": None, "threshold": threshold,
                "checks": [], "note": "not measured in this run"}
    worst = max(checks, key=lambda c: c["value"]) if better == "lower" else min(checks, key=lambda c: c["value"])
    return {"id": tid, "target": text, "status": "PASS" if all(c["pass"] for c in checks) else "FAIL",
            "value": worst["value"], "worst": worst["item"], "threshold": threshold, "checks": checks,
            "failing": [c["item"] for c in checks if not c["pass"]]}


def evaluate_targets(records: Sequence[Record]) -> list[Record]:
    """The four issue-5 targets, computed from the measured cases (reported, never asserted)."""
    ok = [r for r in records if "error" not in r]

    def find(**fields: Any) -> list[Record]:
        return [r for r in ok if all(r[k] == v for k, v in fields.items())]

    targets = []
    for family in ("hog", "dsift"):
        checks = [{"item": r["id"], "value": r["full_inversion_s_per_img"], "estimated": r["estimated"]}
                  for r in find(family=family, size=160, batch=16)]
        targets.append(_target(f"1-{family}", f"{family.upper()} default inversion ({FULL_ITERATIONS} it.) "
                               f"of 160x160 at batch 16 <= 0.5 s/img", checks, 0.5, "lower"))
    checks = [{"item": r["id"], "value": r["ratio_engine_bare"]} for r in find(kind="cnn")]
    targets.append(_target("2", "engine step <= 1.2x bare fwd+bwd for every CNN layer", checks, 1.2, "lower"))
    checks = []
    for r in find(family="vgg-vd-16", precision="bf16"):
        if r["layer"].startswith("conv"):
            for f in find(family="vgg-vd-16", precision="fp32", layer=r["layer"], batch=r["batch"], size=r["size"]):
                checks.append({"item": f"vgg-vd-16/{r['layer']} b{r['batch']}",
                               "value": f["bare_s_per_img_iter"] / r["bare_s_per_img_iter"]})
    targets.append(_target("3", "bf16 >= 3x faster than fp32, VGG-VD-16 conv layers (bare fwd+bwd)",
                           checks, 3.0, "higher"))
    checks = []
    for r in find(batch=16):
        if r["family"] in ("squeezenet", "alexnet"):
            for one in find(family=r["family"], layer=r["layer"], precision=r["precision"], size=r["size"], batch=1):
                checks.append({"item": f"{r['family']}/{r['layer']} {r['precision']}",
                               "value": one["engine_s_per_img_iter"] / r["engine_s_per_img_iter"]})
    targets.append(_target("4", "batch 16 >= 1.5x the throughput of batch 1, SqueezeNet and AlexNet (engine)",
                           checks, 1.5, "higher"))
    return targets


# ------------------------------------------------------------------------------------ output


def write_json(path: Path, payload: Record) -> None:
    """Write ``payload`` to ``path`` atomically (temporary file in the same folder, then ``os.replace``)."""
    from preimage.io import atomic_path

    with atomic_path(path) as tmp:  # the usual file mode, not mkstemp's 0600
        tmp.write_text(json.dumps(payload, indent=2) + "\n")


def _num(value: float | None, scale: float = 1.0, digits: int = 3, prefix: str = "") -> str:
    if value is None:
        return "-"
    v = value * scale
    return prefix + (f"{v:.{digits}g}" if abs(v) < 10 ** digits else f"{v:.0f}")


def print_report(records: Sequence[Record], targets: Sequence[Record], peak: dict[str, float],
                 by_round: Sequence[Sequence[Record]] | None = None) -> None:
    """The results table and the targets section (rich); with ``--rounds``, how far the rounds
    spread and each target's verdict in every round (``by_round``)."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 160)
    table = Table(title="preimage benchmarks (per image; ~ = estimated as 350 x engine step)")
    for col in ("case", "batch", "precision", "engine ms/img/iter", "bare ms/img/iter", "ratio",
                "full inv. s/img", "inv./s", "GFLOP/iter", "GFLOP/s", "% peak", "peak MB"):
        table.add_column(col, justify="left" if col == "case" else "right")
    for r in records:
        name = r["family"] if r.get("layer") is None else f"{r['family']}/{r['layer']}"
        name = f"{name}@{r['size']}"
        if "error" in r:
            table.add_row(name, str(r["batch"]), r["precision"], f"[red]error: {r['error'][:60]}[/red]",
                          *["-"] * 8)
            continue
        table.add_row(name, str(r["batch"]), r["precision"], _num(r["engine_s_per_img_iter"], 1e3),
                      _num(r["bare_s_per_img_iter"], 1e3),
                      _num(r["ratio_engine_bare"], digits=2) + (" AᵀA" if r.get("quadratic") else ""),
                      _num(r["full_inversion_s_per_img"], prefix="~" if r["estimated"] else ""),
                      _num(r.get("inversions_per_s"), prefix="~" if r["estimated"] else ""),
                      _num(r["gflop_per_img_iter"]), _num(r["gflops_engine"]), _num(r["pct_of_peak"], digits=2),
                      _num(r["peak_memory_mb"], digits=4))
    console.print(table)
    if any(r.get("quadratic") for r in records):
        console.print("AᵀA: the engine took the loss of this affine first layer from AᵀA and never ran Φ "
                      "(representations/affine.py); its GFLOP/s and % peak count Φ's arithmetic all the same")
    console.print("peak (the better of a matrix product and a 3x3 convolution): "
                  + ", ".join(f"{p} {v:.0f} GFLOP/s" for p, v in peak.items()))
    spreads = [(max(e) - min(e)) / statistics.median(e) for r in records if len(r.get("rounds", [])) > 1
               for e in [[x["engine_s_per_img_iter"] for x in r["rounds"]]]]
    if spreads:
        n = max(len(r.get("rounds", [])) for r in records)
        console.print(f"times: medians of {n} rounds; the engine step's spread across rounds (max - min) / "
                      f"median: median {100 * statistics.median(spreads):.0f} %, worst {100 * max(spreads):.0f} %")
    console.print("\n[bold]targets[/bold]")
    colour = {"PASS": "green", "FAIL": "red", "SKIP": "yellow"}
    for t in targets:
        line = f"[{colour[t['status']]}]{t['status']}[/] {t['id']:>7}  {t['target']}"
        if t["status"] != "SKIP":
            line += f": worst {t['value']:.3g} ({t['worst']}), threshold {t['threshold']:g}"
            if any(c.get("estimated") for c in t["checks"]):
                line += " [estimated]"
            if t["failing"]:
                shown = ", ".join(t["failing"][:6]) + (", ..." if len(t["failing"]) > 6 else "")
                line += f"; failing {len(t['failing'])}/{len(t['checks'])}: {shown}"
        else:
            line += f": {t['note']}"
        verdicts = [v["status"] for round_ in by_round or [] for v in round_ if v["id"] == t["id"]]
        if verdicts and t["status"] != "SKIP":
            line += f" (rounds: {' '.join(verdicts)})"
        console.print(line, highlight=False)


# ---------------------------------------------------------------------------------- driver


def _csv(kind: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    return lambda text: [kind(t.strip()) for t in text.split(",") if t.strip()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options; ``None`` defaults are filled in by :func:`apply_defaults`."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--only", type=_csv(str), help="families or family/layer, comma-separated (default: all)")
    p.add_argument("--precision", type=_csv(str), help="CNN precisions (default fp32,bf16; --quick: fp32)")
    p.add_argument("--batch", type=_csv(int), help="batch sizes (default 1,16; --quick: 1)")
    p.add_argument("--sizes", type=_csv(int), help="HOG/HOGb/DSIFT sizes (default 160,227; --quick: 160)")
    p.add_argument("--iters", type=int, help="timed engine / bare iterations for CNNs (default 5; --quick: 2)")
    p.add_argument("--shallow-iters", type=int, help="the same for HOG/HOGb/DSIFT (default 20; --quick: 3)")
    p.add_argument("--warmup", type=int, help="untimed iterations first (default 2; --quick: 1)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="engine with compile=True (preimage.fused: C kernels on the CPU, torch.compile on CUDA; "
                        "compilation happens in the warm-up) or, --no-compile, False (plain PyTorch operations); "
                        "default: the engine's default (fused on the CPU where the C kernels build)")
    p.add_argument("--graph", action=argparse.BooleanOptionalAction, default=None,
                   help="CUDA: record the engine step as a CUDA graph and replay it at every batch size "
                        "(preimage.graphs) or, --no-graph, launch every step from Python; default: the engine's "
                        "(recorded unless PREIMAGE_CUDA_GRAPHS=0; the flag sets it for the run)")
    p.add_argument("--full", action="store_true", help="really run the 350-iteration inversion for CNNs too")
    p.add_argument("--quick", action="store_true", help="smoke test: few iterations, batch 1, early layers, fp32")
    p.add_argument("--peak-size", type=int, help="side of the peak matrix product (default 4096; --quick: 1024)")
    p.add_argument("--peak-reps", type=int, help="timed repetitions of each peak kernel (default 5, cuda 20)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads in every process (default: torch's)")
    p.add_argument("--random-squeezenet", action="store_true", help="random SqueezeNet weights even if shared")
    p.add_argument("--rounds", type=int, default=1,
                   help="measure every case this many times, a round over all cases at a time, and report "
                        "medians (default 1)")
    p.add_argument("--case-timeout", type=float, default=3600.0, help="seconds allowed to one case")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON results (default {DEFAULT_OUT})")
    p.add_argument("--in-process", action="store_true",
                   help="measure every case in this process (CUDA's peak memory is reset per case; CPU's is cumulative)")
    p.add_argument("--case", help="measure this one case id in this process (used by the driver)")
    p.add_argument("--json-line", action="store_true", help="with --case: print the record as one JSON line")
    return p.parse_args(argv)


def apply_defaults(opts: argparse.Namespace) -> argparse.Namespace:
    """Fill unset options with the full or the ``--quick`` defaults."""
    q = opts.quick
    defaults = {
        "precision": ["fp32"] if q else ["fp32", "bf16"],
        "batch": [1] if q else [1, 16],
        "sizes": [160] if q else [160, 227],
        "iters": 2 if q else 5,
        "shallow_iters": 3 if q else 20,
        "warmup": 1 if q else 2,
        "peak_size": 1024 if q else 4096,
        "peak_reps": 2 if q else (20 if opts.device == "cuda" else 5),
    }
    for key, value in defaults.items():
        if getattr(opts, key) is None:
            setattr(opts, key, value)
    bad = set(opts.precision) - {"fp32", "bf16"}
    if bad:
        raise SystemExit(f"--precision: unknown {', '.join(sorted(bad))} (fp32, bf16)")
    if min(opts.iters, opts.shallow_iters) < 1:
        raise SystemExit("--iters and --shallow-iters must be at least 1")
    if opts.rounds < 1:
        raise SystemExit("--rounds must be at least 1")
    return opts


def child_argv(case: Case, opts: argparse.Namespace) -> list[str]:
    """The command line measuring ``case`` in a fresh process."""
    argv = [sys.executable, str(HERE), "--case", case.id, "--json-line", "--device", opts.device,
            "--iters", str(opts.iters), "--shallow-iters", str(opts.shallow_iters), "--warmup", str(opts.warmup)]
    if opts.full:
        argv.append("--full")
    if opts.compile is not None:
        argv.append("--compile" if opts.compile else "--no-compile")
    if opts.graph is not None:
        argv.append("--graph" if opts.graph else "--no-graph")
    if opts.threads:
        argv += ["--threads", str(opts.threads)]
    if opts.random_squeezenet:
        argv.append("--random-squeezenet")
    return argv


def run_in_subprocess(case: Case, opts: argparse.Namespace) -> Record:
    """Measure ``case`` in a fresh interpreter; an error record if it fails."""
    base: Record = {"id": case.id, "family": case.family, "layer": case.layer, "size": case.size,
                    "precision": case.precision, "batch": case.batch,
                    "kind": "shallow" if case.shallow else "cnn"}
    try:
        proc = subprocess.run(child_argv(case, opts), capture_output=True, text=True, timeout=opts.case_timeout)
    except subprocess.TimeoutExpired:
        return {**base, "error": f"timed out after {opts.case_timeout:g} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                break
    tail = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}, no output"])[-1]
    return {**base, "error": tail}


def run_here(case: Case, opts: argparse.Namespace) -> Record:
    """Measure ``case`` in this process (``--in-process``); an error record if it fails."""
    try:
        return run_case(case, opts)
    except Exception as exc:  # noqa: BLE001 - one case's failure is recorded, the run goes on
        return {"id": case.id, "family": case.family, "layer": case.layer, "size": case.size,
                "precision": case.precision, "batch": case.batch, "kind": "shallow" if case.shallow else "cnn",
                "error": f"{type(exc).__name__}: {exc}".replace("\n", " ")}
    finally:
        if opts.device == "cuda":
            torch.cuda.empty_cache()


def main(argv: Sequence[str] | None = None) -> int:
    opts = apply_defaults(parse_args(argv))
    if opts.graph is not None:  # what optimize() does unless told: the engine and the full inversion alike
        os.environ["PREIMAGE_CUDA_GRAPHS"] = "1" if opts.graph else "0"
    if opts.threads:
        torch.set_num_threads(opts.threads)
    if opts.device == "cuda" and not torch.cuda.is_available():
        print("benchmarks: CUDA is not available on this machine; nothing measured (use --device cpu).")
        return 0

    if opts.case:
        case = Case.parse(opts.case)
        try:
            record = run_case(case, opts)
        except Exception as exc:  # one line for the driver, which records it and goes on
            print(f"{type(exc).__name__}: {exc}".replace("\n", " "), file=sys.stderr)
            return 1
        print(json.dumps(record) if opts.json_line else json.dumps(record, indent=2), flush=True)
        return 0

    from rich.console import Console

    console = Console(stderr=True)
    cases = select_cases(opts.only, opts.sizes, opts.precision, opts.batch, opts.quick)
    if not cases:
        console.print("benchmarks: no case selected")
        return 1
    device = torch.device(opts.device)
    started = time.time()
    meta = {"machine": machine_info(device), "options": {k: str(v) if isinstance(v, Path) else v
                                                          for k, v in vars(opts).items()},
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started))}
    console.print(f"peak: {opts.peak_size}x{opts.peak_size} matrix products and 3x3 convolutions ...")
    kernels: dict[str, dict[str, float]] = {}
    peak = measure_peak(device, ["fp32", "bf16"], opts.peak_size, opts.peak_reps, kernels)
    payload: Record = {**meta, "peak_gflops": peak, "peak_matmul_size": opts.peak_size, "peak_kernels": kernels,
                       "complete": False, "cases": [], "targets": []}

    measured: list[list[Record]] = [[] for _ in cases]  # each case's rounds so far
    for round_ in range(1, opts.rounds + 1):  # rounds outermost: a case's repeats lie apart in time
        for i, case in enumerate(cases, 1):
            where = f"[{i}/{len(cases)}]" if opts.rounds == 1 else f"[round {round_}/{opts.rounds}, {i}/{len(cases)}]"
            console.print(f"{where} {case.id} ...", end=" ", highlight=False)
            record = run_here(case, opts) if opts.in_process else run_in_subprocess(case, opts)
            measured[i - 1].append(record)
            console.print(f"[red]{record['error']}[/red]" if "error" in record
                          else f"{1e3 * record['engine_s_per_img_iter']:.3g} ms/img/iter", highlight=False)
            merged = merge_rounds(measured[i - 1]) if opts.rounds > 1 else record
            gflops = merged.get("gflops_engine")
            merged["pct_of_peak"] = None if gflops is None else 100 * gflops / peak[case.precision]
            if round_ == 1:
                payload["cases"].append(merged)
            else:
                payload["cases"][i - 1] = merged
            payload["rounds_done"] = round_ - 1 + (i == len(cases))
            write_json(opts.out, payload)

    payload["targets"] = evaluate_targets(payload["cases"])
    if opts.rounds > 1:  # how firm each verdict is: the targets of every round on its own
        payload["targets_by_round"] = [[{k: t.get(k) for k in ("id", "status", "value", "worst")}
                                        for t in evaluate_targets([rounds[r] for rounds in measured])]
                                       for r in range(opts.rounds)]
    payload["complete"] = True
    payload["wall_s"] = time.time() - started
    write_json(opts.out, payload)
    print_report(payload["cases"], payload["targets"], peak, payload.get("targets_by_round"))
    console.print(f"wrote {opts.out} ({payload['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
