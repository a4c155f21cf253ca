"""The ``preimage`` command line: a thin front-end over the Python API.

Every command parses its arguments, calls the API and writes files atomically.  Bad input
(missing or corrupt image, unknown representation or layer, zero-norm target, unwritable
output) ends with a one-line ``preimage: error: ...`` on stderr and exit code 2, leaving no
partial files.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from . import __version__, fused, graphs
from .defaults import Settings
from .engine import PreimageError
from .io import ImageError, grid, list_images, read_image, save_json, save_npy, save_png
from .objectives import ObjectiveError
from .representations import SHALLOW, ModuleCut, Representation, RepresentationError, make_representation
from .representations.cnn import resolve_precision

console = Console(stderr=True)
EXPECTED = (ImageError, RepresentationError, ObjectiveError, PreimageError, FileExistsError, OSError,
            click.BadParameter)
SAMPLE = "astronaut"
DEFAULT_PRECISION = "auto"  # bf16 where the CPU (AMX / AVX512-BF16) or GPU runs it natively


class UsageFailure(click.ClickException):
    exit_code = 2

    def show(self, file: Any = None) -> None:  # one line, no traceback
        click.echo(f"preimage: error: {self.format_message()}", err=True)


@contextmanager
def _errors() -> Iterator[None]:
    try:
        yield
    except EXPECTED + (ValueError,) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if isinstance(exc, OSError) and getattr(exc, "filename", None):
            msg = f"{exc.strerror or msg}: {exc.filename}"
        raise UsageFailure(msg) from None


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        disable=not console.is_terminal and not _force_progress(),
    )


def _force_progress() -> bool:
    import os

    return os.environ.get("PREIMAGE_PROGRESS", "") == "1"


def _valid_device(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """``--device``: ``cpu``, ``cuda`` or ``cuda:N``, refused at once when CUDA is absent."""
    try:
        dev = torch.device(value)
    except RuntimeError:
        raise click.BadParameter(f"unknown device {value!r}; use cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter("CUDA is not available on this machine; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise click.BadParameter(f"unsupported device {value!r}; use cpu or cuda")
    return value


def _parse_ints(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise click.BadParameter(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values:
        raise click.BadParameter(f"no {what} given")
    return values


def _parse_channels(text: str) -> list[int]:
    """``"0-47"``, ``"0,3,7"`` or ``"0-3,9"`` -> channel indices."""
    chosen: list[int] = []
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = (int(v) for v in part.split("-", 1))
                if hi < lo:
                    raise ValueError
                chosen.extend(range(lo, hi + 1))
            elif part:
                chosen.append(int(part))
        except ValueError:
            raise click.BadParameter(f"--channels must look like '0-47' or '0,3,7', got {text!r}") from None
    if not chosen:
        raise click.BadParameter("--channels selects no channel")
    return chosen


def _settings(C: float, iterations: int, fine: int, jitter: int | None, alpha: float, beta: float, B: float,
              lr_fraction: float) -> Settings:
    if iterations < 0 or fine < 0:
        raise click.BadParameter("iteration counts must be non-negative")
    return Settings(C=C, iterations=iterations, fine_iterations=fine, jitter=jitter, alpha=alpha, beta=beta, B=B,
                    lr_fraction=lr_fraction)


def _load_module_cut(module: str, layer: str | None, weights: Path | None, preprocess: str) -> Representation:
    """``--module path/to/file.py:factory`` or ``package.module:factory`` cut at ``--layer``."""
    if ":" not in module:
        raise RepresentationError(f"--module must look like 'file.py:factory' or 'package.module:factory', got {module!r}")
    where, attr = module.rsplit(":", 1)
    try:
        if where.endswith(".py"):
            path = Path(where)
            if not path.is_file():
                raise RepresentationError(f"module file not found: {path}")
            spec = importlib.util.spec_from_file_location(path.stem, path)
            assert spec is not None and spec.loader is not None
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
        else:
            mod = importlib.import_module(where)
    except RepresentationError:
        raise
    except Exception as exc:
        raise RepresentationError(f"cannot import {where}: {exc}") from None
    factory = getattr(mod, attr, None)
    if factory is None:
        raise RepresentationError(f"{where} has no attribute {attr!r}")
    model = factory() if callable(factory) and not isinstance(factory, torch.nn.Module) else factory
    if not isinstance(model, torch.nn.Module):
        raise RepresentationError(f"{module} did not give a torch.nn.Module")
    if weights is not None:
        if not weights.is_file():
            raise RepresentationError(f"weights file not found: {weights}")
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
        except Exception as exc:
            raise RepresentationError(f"cannot load weights {weights}: {str(exc).splitlines()[0]}") from None
    conv = {"torchvision": {}, "caffe": dict(mean=(104.0, 117.0, 123.0), std=(1.0, 1.0, 1.0), scale=255.0, bgr=True)}
    return ModuleCut(model, layer, **conv[preprocess])


def _representation(rep: str | None, module: str | None, layer: str | None, weights: Path | None, preprocess: str,
                    cell_size: int, color: bool, step: int | None = None, fast: bool = False,
                    model_spec: str | None = None, exact_gradient: bool = False,
                    precision: str = "fp32") -> Representation:
    if model_spec is not None:
        from .models import load_model

        if not layer:
            raise click.BadParameter("--model needs --layer (see 'preimage layers --model ...')")
        return load_model(model_spec, weights).representation(layer, precision)
    if module is not None:
        return _load_module_cut(module, layer, weights, preprocess)
    if rep is None:
        raise click.BadParameter("give --rep (hog, hogb, dsift), --model or --module")
    return make_representation(rep, cell_size=cell_size, color=color, step=step, fast=fast,
                               exact_gradient=exact_gradient)


def _sample_image(out: Path, size: int | None, overwrite: bool) -> Path:
    """Write scikit-image's bundled ``astronaut`` photo into ``out`` (the built-in default)."""
    from PIL import Image
    from skimage import data

    path = out / f"{SAMPLE}.png"
    if not path.exists() or overwrite:
        save_png(np.asarray(Image.fromarray(getattr(data, SAMPLE)())), path)
    return path


def _check_writable(paths: Sequence[Path]) -> None:
    """Fail before any work if an output folder cannot be created or written."""
    import os

    for parent in {p.parent for p in paths}:
        probe = parent
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        if not probe.is_dir():
            raise ImageError(f"cannot write to {parent}: {probe} is not a folder")
        if not os.access(probe, os.W_OK):
            raise ImageError(f"cannot write to {parent}: permission denied")


def _check_free(paths: Sequence[Path], overwrite: bool) -> None:
    _check_writable(paths)
    if overwrite:
        return
    taken = [p for p in paths if p.exists()]
    if taken:
        raise FileExistsError(f"{taken[0]} exists (and {len(taken) - 1} more); use --overwrite" if len(taken) > 1
                              else f"{taken[0]} exists; use --overwrite")


def _stats_maxima(path: Path, layer: str, units: Sequence[int]) -> list[float]:
    """M of ``units`` of ``layer`` from a 'preimage stats' file (non-positive maxima become 1e-6)."""
    if not path.is_file():
        raise ImageError(f"stats file not found: {path}")
    try:
        layers = json.loads(path.read_text())["layers"]
    except (ValueError, KeyError):
        raise ImageError(f"not a 'preimage stats' file: {path}") from None
    if layer not in layers:
        raise RepresentationError(f"{path} has no statistics for layer {layer!r} (it has: {', '.join(layers)})")
    maxima = layers[layer]["max"]
    bad = [u for u in units if not 0 <= u < len(maxima)]
    if bad:
        raise RepresentationError(f"unit {bad[0]} out of range: {layer} has {len(maxima)} units")
    return [max(float(maxima[u]), 1e-6) for u in units]


def _step_callback(progress: Progress, task: Any) -> Callable[[int, int, dict[str, float]], None]:
    last = {"t": 0}

    def cb(t: int, total: int, e: dict[str, float]) -> None:
        if t < last["t"]:
            last["t"] = 0
        progress.update(task, advance=t - last["t"], total=total, info=f"E={e['total']:.3g} loss={e['loss']:.3g}")
        last["t"] = t

    return cb


common_rep = [
    click.option("--rep", type=click.Choice(SHALLOW, case_sensitive=False), help="Shallow representation."),
    click.option("--model", "model_spec", help="A CNN: alexnet, caffenet, vgg-m, vgg-vd-16 (with --weights), a Caffe "
                 "deploy.prototxt (with --weights X.caffemodel) or a MatConvNet .mat."),
    click.option("--module", help="Any torch module: 'file.py:factory' or 'package.module:factory'."),
    click.option("--layer", help="Dotted name of the module's layer to cut at (e.g. features.8)."),
    click.option("--weights", type=click.Path(path_type=Path),
                 help="Weights for --model (.mat, .caffemodel, .pth) or a state dict for --module."),
    click.option("--preprocess", type=click.Choice(["torchvision", "caffe"]), default="torchvision", show_default=True,
                 help="Input convention of --module: RGB normalized, or Caffe BGR 0..255 minus mean."),
    click.option("--cell-size", type=click.IntRange(2, 64), default=8, show_default=True,
                 help="HOG cell size / DSIFT bin size."),
    click.option("--color/--gray", default=False, show_default=True, help="HOG on colour (max-gradient channel)."),
    click.option("--exact-gradient", is_flag=True,
                 help="Plain HOG: back-propagate its exact gradient (the paper) instead of HOGb's surrogate."),
    click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default=DEFAULT_PRECISION, show_default=True,
                 help="Arithmetic of a --model network (bf16: several times faster on AMX CPUs and GPUs; "
                      "image and optimizer stay fp32)."),
]
def _announce(message: str) -> None:
    click.echo(message, err=True)


def _set_compile(ctx: click.Context, param: click.Parameter, value: bool | None) -> bool | None:
    fused.announce = _announce
    if value is not None:  # without the flag, PREIMAGE_COMPILE, else the engine's default decides
        fused.set_default(value)
    return value


BATCH_HELP = ("Images inverted and saved together (resume granularity); the engine may optimize them in "
              "smaller batches that stay in the CPU caches.")
compile_opt = click.option(
    "--compile/--no-compile", default=None, expose_value=False, callback=_set_compile,
    help="Fuse each step's image-side work and its loss into compiled kernels: preimage's C kernels on "
         "the CPU (the default there when a C compiler is present; built once, ~1 s), torch.compile's on "
         "a GPU (~15 s of compilation the first time). --no-compile: plain PyTorch operations.")


def _set_compile_long(ctx: click.Context, param: click.Parameter, value: bool | None) -> bool:
    fused.announce = _announce
    if value is None:  # long runs: on, unless PREIMAGE_COMPILE says otherwise
        value = fused.environment() is not False
    fused.set_default(value)
    return value


long_compile_opt = click.option(
    "--compile/--no-compile", default=None, expose_value=False, callback=_set_compile_long,
    help="Fuse each step's image-side work and its loss into compiled kernels: preimage's C kernels on "
         "the CPU (built once, ~1 s), torch.compile's on a GPU (~15 s of compilation the first time, "
         "cached by torch). On by default for this long-running command; PREIMAGE_COMPILE=0 also turns "
         "it off.")
def _set_graphs(ctx: click.Context, param: click.Parameter, value: bool | None) -> bool | None:
    graphs.set_default(value)  # None: PREIMAGE_CUDA_GRAPHS, else on
    return value


graphs_opt = click.option(
    "--cuda-graphs/--no-cuda-graphs", default=None, expose_value=False, callback=_set_graphs,
    help="On a GPU, record each stage's step as a CUDA graph after a few eager iterations and replay it "
         "(the same results, up to 14x faster at small batches). Default: on, unless PREIMAGE_CUDA_GRAPHS=0. "
         "Ignored on the CPU.")
common_opt = [
    click.option("--C", "C", type=float, default=100.0, show_default=True, help="Loss weight C of eq. (1)."),
    click.option("--iterations", type=click.IntRange(0), default=300, show_default=True, help="Iterations at eta0."),
    click.option("--fine-iterations", type=click.IntRange(0), default=50, show_default=True,
                 help="Second stage at eta0/10 without jitter (inversion only)."),
    click.option("--jitter", type=click.IntRange(1), default=None, help="Jitter T (default: round(stride/4))."),
    click.option("--alpha", type=float, default=6.0, show_default=True),
    click.option("--beta", type=float, default=2.0, show_default=True),
    click.option("--B", "B", type=float, default=80.0, show_default=True),
    click.option("--lr-fraction", type=float, default=0.01, show_default=True, help="eta0 = f * B^2 / alpha."),
    click.option("--seeds", default="0", show_default=True, help="Comma-separated seeds, one run each."),
    click.option("--device", default="cpu", show_default=True, callback=_valid_device, help="cpu or cuda."),
    click.option("--overwrite", is_flag=True, help="Replace existing outputs."),
    compile_opt,
    graphs_opt,
]


def _apply(options: list[Callable[..., Any]]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def deco(f: Callable[..., Any]) -> Callable[..., Any]:
        for o in reversed(options):
            f = o(f)
        return f

    return deco


class OneLineErrors(click.Group):
    """Usage errors (bad option value, missing argument) as one line, exit code 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            raise UsageFailure(exc.format_message()) from None


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="preimage")
def main() -> None:
    """Natural pre-images of image representations (Mahendran & Vedaldi, IJCV 2016)."""


def _write_results(kind: str, result: Any, sources: list[Path], stems: list[str], out_for: Callable[[Path], Path],
                   rep: Representation, extra: dict[str, Any], originals: torch.Tensor | None) -> list[Path]:
    written = []
    seeds = sorted({e["seed"] for e in result.elements})
    for n, el in enumerate(result.elements):
        i = el.get("image", 0)
        tag = f"unit{el['unit']}." if "unit" in el else ""
        png = out_for(sources[i]) / f"{stems[i]}.{rep.name.replace(':', '-')}.{kind}.{tag}seed{el['seed']}.png"
        save_png(result.images[n], png)
        save_json(
            {
                "source": str(sources[i]),
                **el,
                "error": float(result.error[n]),
                **({"activation": float(result.activation[n])} if result.activation is not None else {}),
                "final_energies": result.final_energies(n),
                "config": result.config | extra,
            },
            png.with_suffix(".json"),
        )
        written.append(png)
    if originals is not None and len(seeds) >= 1:
        for i, src in enumerate(sources):
            tiles = [rep.deprocess(originals[i : i + 1])[0]] + [
                result.images[n] for n, el in enumerate(result.elements) if el.get("image", 0) == i
            ]
            save_png(grid(tiles, columns=len(tiles)), out_for(src) / f"{stems[i]}.{rep.name.replace(':', '-')}.{kind}.grid.png")
    return written


@main.command()
@click.argument("images", nargs=-1, type=click.Path(path_type=Path))
@_apply(common_rep + common_opt)
@click.option("--size", type=click.IntRange(0), default=160, show_default=True,
              help="Shorter side resized to SIZE and centre-cropped square (0: keep the image).")
@click.option("--out", type=click.Path(path_type=Path), help="Output folder (default: next to each image).")
@click.option("--window", type=click.IntRange(1), default=None,
              help="Invert only the central WINDOW x WINDOW feature locations (eq. 3, Fig. 9); the receptive "
                   "field of the window is drawn in a '.box.png' beside the result.")
@click.option("--channels", default=None, help="Invert only these channels, e.g. '0-47' or '0,3,7' (eq. 3, Fig. 10).")
def invert(images: tuple[Path, ...], rep: str | None, model_spec: str | None, module: str | None, layer: str | None, weights: Path | None,
           preprocess: str, exact_gradient: bool, precision: str, cell_size: int, color: bool, C: float, iterations: int, fine_iterations: int,
           jitter: int | None, alpha: float, beta: float, B: float, lr_fraction: float, seeds: str, device: str,
           overwrite: bool, size: int, out: Path | None, window: int | None, channels: str | None) -> None:
    """Reconstruct IMAGE(s) from their code alone (eq. 2), one run per seed.

    Without IMAGE, inverts HOG of scikit-image's bundled 'astronaut' photo into ./preimage-out/.
    With --window or --channels only part of the code is matched (eq. 3).
    """
    from .render import draw_box
    from .visualizations import channel_mask, code_shape, invert as api_invert, mask_support, window_mask

    with _errors():
        if not images:
            out = out or Path("preimage-out")
            rep = rep or ("hog" if model_spec is None and module is None else None)
            images = (_sample_image(out, size, overwrite),)
        seed_list = _parse_ints(seeds, "seeds")
        representation = _representation(rep, module, layer, weights, preprocess, cell_size, color, model_spec=model_spec, precision=resolve_precision(precision, device),
                                         exact_gradient=exact_gradient)
        settings = _settings(C, iterations, fine_iterations, jitter, alpha, beta, B, lr_fraction)
        gray = representation.in_channels == 1
        photos = [read_image(p, size=size or None, gray=gray) for p in images]
        shapes = {tuple(p.shape) for p in photos}
        out_for = (lambda src: out) if out is not None else (lambda src: src.parent)
        stems = [p.stem for p in images]
        name = representation.name.replace(":", "-")
        kind = "invert"
        if window is not None:
            kind += f".window{window}"
        if channels is not None:
            channel_list = _parse_channels(channels)
            kind += f".ch{channels.replace(',', '_')}"
        planned = [out_for(p) / f"{p.stem}.{name}.{kind}.seed{s}.png" for p in images for s in seed_list]
        if window is not None:
            planned += [q.with_suffix(".box.png") for q in planned]
        _check_free(planned + [q.with_suffix(".json") for q in planned], overwrite)
        representation = representation.to(device)
        groups = [[i for i, p in enumerate(photos) if tuple(p.shape) == s] for s in shapes]
        errors: dict[tuple[int, int], float] = {}
        with _progress() as progress:
            for idx in groups:
                task = progress.add_task(f"invert {representation.name} x{len(idx) * len(seed_list)}",
                                         total=iterations + fine_iterations, info="")
                batch = torch.stack([photos[i] for i in idx])
                hw = tuple(batch.shape[-2:])
                mask, box = None, None
                if window is not None or channels is not None:
                    shape = code_shape(representation, hw, device)
                    mask = torch.ones(shape)
                    if window is not None:
                        mask = mask * window_mask(shape, window)
                        box = mask_support(representation, hw, mask, device)
                    if channels is not None:
                        mask = mask * channel_mask(shape, channel_list)
                result = api_invert(representation, batch, seeds=seed_list, settings=settings, mask=mask,
                                    device=device, callback=_step_callback(progress, task))
                with torch.no_grad():
                    x0 = representation.preprocess(batch.to(device)).cpu()
                extra = {"size": size, "window": window, "channels": channels, "receptive_box": box}
                _write_results(kind, result, [images[i] for i in idx], [stems[i] for i in idx], out_for,
                               representation, extra, x0)
                if box is not None:
                    for n, el in enumerate(result.elements):
                        i = idx[el["image"]]
                        png = out_for(images[i]) / f"{stems[i]}.{name}.{kind}.seed{el['seed']}.box.png"
                        save_png(draw_box(result.images[n], box), png)
                for n, el in enumerate(result.elements):
                    errors[(idx[el["image"]], el["seed"])] = float(result.error[n])
        for i, p in enumerate(images):
            errs = [errors[(i, s)] for s in seed_list]
            click.echo(f"{p}: reconstruction error {', '.join(f'{100 * e:.1f}%' for e in errs)} "
                       f"-> {out_for(p) / f'{p.stem}.{name}.{kind}.seed{seed_list[0]}.png'}")


@main.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@_apply(common_rep + common_opt)
@click.option("--size", type=click.IntRange(0), default=160, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), help="Output folder (default: next to each image).")
def caricature(images: tuple[Path, ...], rep: str | None, model_spec: str | None, module: str | None, layer: str | None, weights: Path | None,
               preprocess: str, exact_gradient: bool, precision: str, cell_size: int, color: bool, C: float, iterations: int, fine_iterations: int,
               jitter: int | None, alpha: float, beta: float, B: float, lr_fraction: float, seeds: str, device: str,
               overwrite: bool, size: int, out: Path | None) -> None:
    """Exaggerate what the representation sees in IMAGE(s) (section 7): Φ0 = max(0, Φ(x0)), start at x0."""
    from .visualizations import caricature as api_caricature

    with _errors():
        seed_list = _parse_ints(seeds, "seeds")
        representation = _representation(rep, module, layer, weights, preprocess, cell_size, color, model_spec=model_spec, precision=resolve_precision(precision, device),
                                         exact_gradient=exact_gradient).to(device)
        settings = _settings(C, iterations, 0, jitter, alpha, beta, B, lr_fraction)
        gray = representation.in_channels == 1
        photos = [read_image(p, size=size or None, gray=gray) for p in images]
        out_for = (lambda src: out) if out is not None else (lambda src: src.parent)
        name = representation.name.replace(":", "-")
        planned = [out_for(p) / f"{p.stem}.{name}.caricature.seed{s}.png" for p in images for s in seed_list]
        _check_free(planned, overwrite)
        with _progress() as progress:
            for i, p in enumerate(images):
                task = progress.add_task(f"caricature {p.name}", total=iterations, info="")
                result = api_caricature(representation, photos[i][None], seeds=seed_list, settings=settings,
                                        device=device, callback=_step_callback(progress, task))
                with torch.no_grad():
                    x0 = representation.preprocess(photos[i][None].to(device)).cpu()
                _write_results("caricature", result, [p], [p.stem], out_for, representation, {"size": size}, x0)
                start = float(result.extra["initial_activation"][0])
                click.echo(f"{p}: <Φ(x),Φ0> {start:.4g} -> {float(result.activation[0]):.4g}")


@main.command()
@_apply(common_rep + common_opt)
@click.option("--units", default="0", show_default=True, help="Comma-separated channels / neurons to maximize.")
@click.option("--size", type=click.IntRange(8), default=128, show_default=True, help="Side of the image sought.")
@click.option("--M", "M", type=float, default=1.0, show_default=True,
              help="The units' maximum over natural images (Z = M rho^2 / 100^2).")
@click.option("--stats", "stats_file", type=click.Path(path_type=Path),
              help="M per unit from 'preimage stats' (overrides --M).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("preimage-out"), show_default=True)
def maximize(rep: str | None, model_spec: str | None, module: str | None, layer: str | None, weights: Path | None, preprocess: str, exact_gradient: bool, precision: str,
             cell_size: int, color: bool, C: float, iterations: int, fine_iterations: int, jitter: int | None,
             alpha: float, beta: float, B: float, lr_fraction: float, seeds: str, device: str, overwrite: bool,
             units: str, size: int, M: float, stats_file: Path | None, out: Path) -> None:
    """Activation maximization (section 6): images that excite the chosen units."""
    from .visualizations import maximize as api_maximize

    with _errors():
        seed_list = _parse_ints(seeds, "seeds")
        unit_list = _parse_ints(units, "units")
        representation = _representation(rep, module, layer, weights, preprocess, cell_size, color, model_spec=model_spec, precision=resolve_precision(precision, device),
                                         exact_gradient=exact_gradient).to(device)
        settings = _settings(C, iterations, 0, jitter, alpha, beta, B, lr_fraction)
        name = representation.name.replace(":", "-")
        planned = [out / f"maximize.{name}.unit{u}.seed{s}.png" for u in unit_list for s in seed_list]
        _check_free(planned, overwrite)
        with _progress() as progress:
            task = progress.add_task(f"maximize {len(unit_list)} unit(s)", total=iterations, info="")
            Ms: float | list[float] = M
            if stats_file is not None:
                Ms = _stats_maxima(stats_file, layer or "", unit_list)
            result = api_maximize(representation, (size, size), unit_list, seeds=seed_list, M=Ms, settings=settings,
                                  device=device, callback=_step_callback(progress, task))
        inactive = []
        for n, el in enumerate(result.elements):
            png = out / f"maximize.{name}.unit{el['unit']}.seed{el['seed']}.png"
            save_png(result.images[n], png)
            activation = float(result.activation[n])
            dead = activation == 0.0  # exactly 0: a rectified unit that never fired had no gradient to follow
            save_json({**el, "activation": activation, "inactive": dead, "error": float(result.error[n]),
                       "final_energies": result.final_energies(n), "config": result.config}, png.with_suffix(".json"))
            click.echo(f"unit {el['unit']} seed {el['seed']}: activation {activation:.4g} -> {png}")
            inactive += [f"{el['unit']} (seed {el['seed']})"] if dead else []
        save_png(grid(list(result.images), columns=len(seed_list)), out / f"maximize.{name}.grid.png")
        if inactive:
            click.echo(f"warning: unit(s) {', '.join(inactive)} stayed at activation 0: rectified units that did not "
                       "fire on the random start get no gradient, and their images show only the regularizers; "
                       "maximize them before the ReLU (e.g. the convolution that feeds it: see 'preimage layers') "
                       "or try other --seeds", err=True)


@main.command()
@click.argument("image", type=click.Path(path_type=Path))
@click.option("--rep", type=click.Choice(SHALLOW, case_sensitive=False), required=True)
@click.option("--cell-size", type=click.IntRange(2, 64), default=8, show_default=True, help="HOG cell / DSIFT bin size.")
@click.option("--bin-size", type=click.IntRange(2, 64), default=None, help="DSIFT bin size (alias of --cell-size).")
@click.option("--step", type=click.IntRange(1, 64), default=None, help="DSIFT step (default: the bin size).")
@click.option("--fast", is_flag=True, help="DSIFT flat-window approximation.")
@click.option("--gray", is_flag=True, help="Convert to gray first (HOG on colour uses the max-gradient channel).")
@click.option("--size", type=click.IntRange(0), default=0, show_default=True, help="Resize+crop as in Table 4 (0: keep).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output .npy file.")
@click.option("--overwrite", is_flag=True)
def features(image: Path, rep: str, cell_size: int, bin_size: int | None, step: int | None, fast: bool, gray: bool,
             size: int, out: Path, overwrite: bool) -> None:
    """Write IMAGE's code as float32 .npy in VLFeat's layout.

    HOG / HOGb: (rows, columns, 31) as vl_hog.  DSIFT: (frames, 128) in vl_dsift's order.
    The image is read as 0..255 floats, as VLFeat is called.
    """
    with _errors():
        _check_free([out], overwrite)
        is_dsift = rep.lower() == "dsift"
        representation = make_representation(rep, cell_size=bin_size or cell_size, color=not (gray or is_dsift),
                                              step=step, fast=fast)
        photo = read_image(image, size=size or None, gray=gray or is_dsift)
        with torch.no_grad():
            code = representation(representation.preprocess(photo[None]))[0]
        arr = code.permute(1, 2, 0) if code.dim() == 3 else code
        save_npy(arr.float().numpy().astype(np.float32), out)
        click.echo(f"{image}: {rep} code {tuple(arr.shape)} -> {out}")


@main.command()
@click.option("--rep", type=click.Choice(SHALLOW, case_sensitive=False), required=True)
@click.option("--images", "images_dir", type=click.Path(path_type=Path), required=True, help="Folder of images.")
@click.option("--limit", type=click.IntRange(1), default=None, help="Use the first N images (sorted by name).")
@click.option("--size", type=click.IntRange(16), default=160, show_default=True)
@click.option("--cell-size", type=click.IntRange(2, 64), default=8, show_default=True)
@click.option("--exact-gradient", is_flag=True, help="Plain HOG: the paper's exact gradient, no HOGb surrogate.")
@_apply(common_opt)
@click.option("--batch-size", type=click.IntRange(1), default=16, show_default=True,
              help=BATCH_HELP)
@click.option("--resume", is_flag=True, help="Reuse reconstructions already in the output folder.")
@click.option("--method", type=click.Choice(["optimization", "hoggle"]), default="optimization", show_default=True,
              help="hoggle: the learned baseline (needs --hoggle-model; error measured with plain HOG).")
@click.option("--hoggle-model", type=click.Path(path_type=Path), help="A dictionary from 'preimage train-hoggle'.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="results.json; PNGs go to a folder beside it.")
def evaluate(rep: str, images_dir: Path, limit: int | None, size: int, cell_size: int, exact_gradient: bool, C: float, iterations: int,
             fine_iterations: int, jitter: int | None, alpha: float, beta: float, B: float, lr_fraction: float,
             seeds: str, device: str, overwrite: bool, batch_size: int, resume: bool, method: str,
             hoggle_model: Path | None, out: Path) -> None:
    """The paper's Table 4 protocol: invert each image from noise and report the mean error."""
    from .evaluation import evaluate_folder

    with _errors():
        hoggle = None
        if method == "hoggle":
            from .hoggle import HoggleModel

            if hoggle_model is None:
                raise click.BadParameter("--method hoggle needs --hoggle-model (see 'preimage train-hoggle')")
            if rep.lower() != "hog":
                raise click.BadParameter("HOGgle inverts plain HOG: use --rep hog")
            hoggle = HoggleModel.load(hoggle_model)
        seed = _parse_ints(seeds, "seeds")[0]
        files = list_images(images_dir, limit)
        folder = out.with_suffix("")
        _check_writable([out, folder / "any.png"])
        if not overwrite and not resume:
            _check_free([out] + ([folder] if folder.exists() and any(folder.iterdir()) else []), overwrite)
        representation = make_representation(rep, cell_size=cell_size, exact_gradient=exact_gradient).to(device)
        settings = _settings(C, iterations, fine_iterations, jitter if jitter is not None else 1, alpha, beta, B,
                             lr_fraction)
        t0 = time.perf_counter()
        with _progress() as progress:
            task = progress.add_task(f"evaluate {rep}", total=len(files), info="")
            step_task = progress.add_task("  iterations", total=iterations + fine_iterations, info="")

            def on_batch(k: int) -> None:
                progress.update(task, advance=k)
                progress.reset(step_task)

            summary = evaluate_folder(representation, files, folder, settings, size=size, seed=seed,
                                      batch_size=batch_size, device=device, resume=resume, on_batch=on_batch,
                                      on_step=_step_callback(progress, step_task), hoggle=hoggle)
        summary["wall_seconds"] = time.perf_counter() - t0
        summary["images_dir"] = str(images_dir)
        summary["reconstructions"] = str(folder)
        save_json(summary, out)
        click.echo(f"{rep}: error {100 * summary['mean_error']:.1f}% ± {100 * summary['std_error']:.1f} "
                   f"(95% CI ± {100 * summary['sem95']:.1f}) over {summary['n_images']} images, "
                   f"{summary['seconds_per_image']:.2f} s/image -> {out}")


@main.command()
@click.argument("image", type=click.Path(path_type=Path))
@_apply(common_rep + common_opt)
@click.option("--param", "parameter", default="C", show_default=True, help="Settings field to vary (C, beta, ...).")
@click.option("--values", default="1,20,100,300", show_default=True, help="Comma-separated values.")
@click.option("--size", type=click.IntRange(0), default=160, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output PNG (a row of images).")
def sweep(image: Path, rep: str | None, model_spec: str | None, module: str | None, layer: str | None, weights: Path | None, preprocess: str, exact_gradient: bool, precision: str,
          cell_size: int, color: bool, C: float, iterations: int, fine_iterations: int, jitter: int | None,
          alpha: float, beta: float, B: float, lr_fraction: float, seeds: str, device: str, overwrite: bool,
          parameter: str, values: str, size: int, out: Path) -> None:
    """Figure 2 analogues: invert IMAGE once per value of one parameter, as one row.

    The paper's Figure 2: --param C --values 1,20,100,300 and --param beta --values 1,1.5,2.
    """
    from .figures import sweep as api_sweep

    with _errors():
        try:
            vals = [float(v) for v in values.split(",") if v.strip()]
        except ValueError:
            raise click.BadParameter(f"--values must be comma-separated numbers, got {values!r}") from None
        _check_free([out, out.with_suffix(".json")], overwrite)
        representation = _representation(rep, module, layer, weights, preprocess, cell_size, color, model_spec=model_spec, precision=resolve_precision(precision, device),
                                         exact_gradient=exact_gradient).to(device)
        settings = _settings(C, iterations, fine_iterations, jitter, alpha, beta, B, lr_fraction)
        photo = read_image(image, size=size or None, gray=representation.in_channels == 1)
        with _progress() as progress:
            task = progress.add_task(f"sweep {parameter}", total=len(vals) * (iterations + fine_iterations), info="")
            done = {"n": 0}

            def cb(t: int, total: int, e: dict[str, float]) -> None:
                progress.update(task, completed=done["n"] * total + t, info=f"E={e['total']:.3g}")
                if t == total:
                    done["n"] += 1

            row, errors = api_sweep(representation, photo, parameter, vals, settings,
                                    seed=_parse_ints(seeds, "seeds")[0], device=device, callback=cb)
        save_png(row, out)
        save_json({"image": str(image), "parameter": parameter, "values": vals, "errors": errors,
                   "representation": representation.name, "settings": settings.to_dict()}, out.with_suffix(".json"))
        for v, e in zip(vals, errors):
            click.echo(f"{parameter}={v:g}: reconstruction error {100 * e:.1f}%")
        click.echo(f"-> {out}")


@main.command()
@click.option("--images", "images_dir", type=click.Path(path_type=Path), required=True, help="Folder of images.")
@click.option("--limit", type=click.IntRange(1), default=100, show_default=True, help="Evaluate the first N images.")
@click.option("--size", type=click.IntRange(16), default=160, show_default=True)
@click.option("--C", "C", type=float, default=100.0, show_default=True, help="Loss weight C.")
@click.option("--iterations", type=click.IntRange(0), default=300, show_default=True)
@click.option("--fine-iterations", type=click.IntRange(0), default=50, show_default=True)
@click.option("--methods", default="hoggle,hog,hogb,dsift", show_default=True)
@click.option("--hoggle-model", type=click.Path(path_type=Path),
              help="A trained HOGgle dictionary; default: OUT/hoggle.npz, trained if missing on the images after --limit.")
@click.option("--train-limit", type=click.IntRange(1), default=400, show_default=True,
              help="Images (after the evaluated ones) to train HOGgle on when no model is given.")
@click.option("--batch-size", type=click.IntRange(1), default=20, show_default=True,
              help=BATCH_HELP)
@click.option("--device", default="cpu", show_default=True, callback=_valid_device)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output folder.")
@long_compile_opt
@graphs_opt
def table4(images_dir: Path, limit: int, size: int, C: float, iterations: int, fine_iterations: int, methods: str,
           hoggle_model: Path | None, train_limit: int, batch_size: int, device: str, out: Path) -> None:
    """The paper's Table 4 and Figure 4: HOGgle, HOG, HOGb and DSIFT on the same images (resumable)."""
    from .hoggle import HoggleModel, train_hoggle as api_train
    from .table4 import METHODS, table4 as api_table4

    with _errors():
        chosen = [m.strip().lower() for m in methods.split(",") if m.strip()]
        bad = [m for m in chosen if m not in METHODS]
        if bad or not chosen:
            raise click.BadParameter(f"unknown method(s) {', '.join(bad) or '(none)'}; choose from {', '.join(METHODS)}")
        everything = list_images(images_dir)
        files = everything[:limit]
        _check_writable([out / "table4.md"])
        settings = Settings(C=C, iterations=iterations, fine_iterations=fine_iterations, jitter=1)
        model = None
        with _progress() as progress:
            if "hoggle" in chosen:
                path = hoggle_model or out / "hoggle.npz"
                if path.exists():
                    model = HoggleModel.load(path)
                elif hoggle_model is not None:
                    raise ImageError(f"HOGgle model not found: {hoggle_model}")
                else:
                    train = everything[limit : limit + train_limit]
                    if not train:
                        raise ImageError(f"no images left after the first {limit} to train HOGgle on; give --hoggle-model")
                    task = progress.add_task(f"train HOGgle on {len(train)} images", total=None, info="")
                    model = api_train(train, progress=lambda d, t: progress.update(task, completed=d, total=t))
                    model.save(path)
            task = progress.add_task("table4", total=len(files), info="")
            step_task = progress.add_task("  iterations", total=iterations + fine_iterations, info="")

            def on_method(m: str, n: int) -> None:
                progress.reset(task, total=n, description=f"table4 {m}")

            def on_batch(k: int) -> None:
                progress.update(task, advance=k)
                progress.reset(step_task)

            summaries = api_table4(files, out, settings, hoggle_model=model, methods=chosen, size=size,
                                   batch_size=batch_size, device=device, on_method=on_method, on_batch=on_batch,
                                   on_step=_step_callback(progress, step_task))
        click.echo((out / "table4.md").read_text().rstrip())
        click.echo(f"-> {out / 'table4.md'}, {out / 'figure4.png'}")


@main.command()
@click.option("--model", "model_spec", required=True, help="alexnet, caffenet, vgg-m, vgg-vd-16, a deploy.prototxt or a .mat.")
@click.option("--weights", type=click.Path(path_type=Path), help="Weights file (.mat, .caffemodel, .pth).")
@click.option("--images", "images_dir", type=click.Path(path_type=Path), required=True, help="Folder of natural images.")
@click.option("--limit", type=click.IntRange(1), default=100, show_default=True, help="Use the first N images.")
@click.option("--layers", "layer_spec", default="main", show_default=True,
              help="'main' (block outputs; every layer of AlexNet/VGG), 'all', or comma-separated names.")
@click.option("--C", "C_values", default="1,20,100,300", show_default=True, help="Comma-separated values of C.")
@click.option("--iterations", type=click.IntRange(0), default=300, show_default=True)
@click.option("--fine-iterations", type=click.IntRange(0), default=50, show_default=True)
@click.option("--jitter", type=click.IntRange(1), default=None, help="Jitter T (default: round(stride/4)).")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default=DEFAULT_PRECISION, show_default=True,
              help="Arithmetic of the network during the optimization (errors are measured in fp32).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=16, show_default=True,
              help=BATCH_HELP)
@click.option("--device", default="cpu", show_default=True, callback=_valid_device)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output folder.")
@click.option("--report", is_flag=True, help="Compute nothing: write the table from the cells already finished.")
@long_compile_opt
@graphs_opt
def table5(model_spec: str, weights: Path | None, images_dir: Path, limit: int, layer_spec: str, C_values: str,
           iterations: int, fine_iterations: int, jitter: int | None, precision: str, seed: int, batch_size: int,
           device: str, out: Path, report: bool) -> None:
    """The paper's Table 5 for a network: inversion error of every layer x C, with classification
    consistency; writes table5.md, table5.json and table5.png (resumable: rerun to continue)."""
    from .models import load_model
    from .table5 import select_layers, table5 as api_table5

    with _errors():
        try:
            Cs = [float(v) for v in C_values.split(",") if v.strip()]
        except ValueError:
            raise click.BadParameter(f"--C must be comma-separated numbers, got {C_values!r}") from None
        if not Cs or any(c < 0 for c in Cs):
            raise click.BadParameter("--C needs at least one non-negative value")
        loaded = load_model(model_spec, weights)
        chosen = select_layers(loaded, layer_spec)
        files = list_images(images_dir, limit)
        _check_writable([out / "table5.md"])
        settings = Settings(iterations=iterations, fine_iterations=fine_iterations, jitter=jitter)
        with _progress() as progress:
            cell = progress.add_task("table5", total=len(chosen) * len(Cs), info="")
            task = progress.add_task("  images", total=len(files), info="")
            step_task = progress.add_task("  iterations", total=iterations + fine_iterations, info="")

            def on_cell(layer: str, C: float) -> None:
                if progress.tasks[task].completed:
                    progress.update(cell, advance=1)
                progress.reset(task, total=len(files), description=f"  {layer} C={C:g}")

            def on_batch(k: int) -> None:
                progress.update(task, advance=k)
                progress.reset(step_task)

            api_table5(loaded, files, out, settings, chosen, Cs, precision=resolve_precision(precision, device), seed=seed,
                       batch_size=batch_size, device=device, on_cell=on_cell, on_batch=on_batch,
                       on_step=_step_callback(progress, step_task), report_only=report)
        click.echo((out / "table5.md").read_text().rstrip())
        click.echo(f"-> {out / 'table5.md'}, {out / 'table5.png'}")


FIGURES = {
    "5": "fig05-layers", "8": "fig08-diversity", "9": "fig09-window", "10": "fig10-streams",
    "11": "fig11-filters", "13": "fig13-classes", "14": "fig14-caricatures",
}


@main.command()
@click.argument("images", nargs=-1, type=click.Path(path_type=Path))
@click.option("--model", "model_spec", required=True, help="alexnet, caffenet, vgg-m, vgg-vd-16, a deploy.prototxt or a .mat.")
@click.option("--weights", type=click.Path(path_type=Path), help="Weights file (.mat, .caffemodel, .pth).")
@click.option("--images", "images_dir", type=click.Path(path_type=Path),
              help="Folder of natural images: the first --limit are visualized (if no IMAGE is given) and "
                   "the first --stats-limit give M for activation maximization.")
@click.option("--limit", type=click.IntRange(1), default=3, show_default=True, help="Images per figure.")
@click.option("--figures", "which", default=",".join(FIGURES), show_default=True,
              help="Which figures (5: every layer, 8: seeds, 9: 5x5 window, 10: channel streams, 11: filters, "
                   "13: classes, 14: caricatures).")
@click.option("--layers", "layer_spec", default="main", show_default=True, help="'main', 'all' or comma-separated names.")
@click.option("--seeds", default="0,1,2,3", show_default=True, help="Seeds of Fig. 8.")
@click.option("--window", type=click.IntRange(1), default=5, show_default=True, help="Fig. 9's window.")
@click.option("--filters", type=click.IntRange(1), default=8, show_default=True, help="Filters per layer in Fig. 11.")
@click.option("--classes", default="31,100,99,886", show_default=True,
              help="Class neurons of Fig. 13 (default: tree frog, black swan, goose, vending machine).")
@click.option("--labels", type=click.Path(path_type=Path), help="Class names (synset_words.txt) for Fig. 13.")
@click.option("--C", "fixed_C", type=float, default=None,
              help="C for the inversions of Figs 5, 8, 9, 10 (default: the paper's per-layer schedule).")
@click.option("--stats", "stats_file", type=click.Path(path_type=Path), help="A 'preimage stats' file with M.")
@click.option("--stats-limit", type=click.IntRange(1), default=50, show_default=True,
              help="Images of --images used to measure M when no --stats file has the layer.")
@click.option("--iterations", type=click.IntRange(0), default=300, show_default=True)
@click.option("--fine-iterations", type=click.IntRange(0), default=50, show_default=True)
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default=DEFAULT_PRECISION, show_default=True)
@click.option("--device", default="cpu", show_default=True, callback=_valid_device)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output folder.")
@click.option("--overwrite", is_flag=True, help="Redo figures already in --out (by default they are kept).")
@long_compile_opt
@graphs_opt
def figures(images: tuple[Path, ...], model_spec: str, weights: Path | None, images_dir: Path | None, limit: int,
            which: str, layer_spec: str, seeds: str, window: int, filters: int, classes: str, labels: Path | None,
            stats_file: Path | None, stats_limit: int, iterations: int, fine_iterations: int, precision: str,
            device: str, out: Path, overwrite: bool, fixed_C: float | None) -> None:
    """The paper's Figures 5-15 for a network, as PNG grids with JSON sidecars.

    Figures already in --out are kept, so an interrupted run continues where it stopped.
    """
    from . import figures as F
    from .models import load_model
    from .stats import unit_maxima, warp_crop
    from .table5 import select_layers

    with _errors():
        wanted = [w.strip() for w in which.split(",") if w.strip()]
        bad = [w for w in wanted if w not in FIGURES]
        if bad or not wanted:
            raise click.BadParameter(f"unknown figure(s) {', '.join(bad) or '(none)'}; choose from {', '.join(FIGURES)}")
        seed_list = _parse_ints(seeds, "seeds")
        class_list = _parse_ints(classes, "classes")
        loaded = load_model(model_spec, weights)
        layers = select_layers(loaded, layer_spec)
        files = list(images) or (list_images(images_dir, limit) if images_dir is not None else [])
        needs_photos = {"5", "8", "9", "10", "14"} & set(wanted)
        if needs_photos and not files:
            raise click.BadParameter("give IMAGE(s) or --images DIR for figures 5, 8, 9, 10 and 14")
        size = loaded.convention.input_size
        photos = torch.stack([warp_crop(p, size) for p in files]) if files else None
        names = loaded.classes
        if labels is not None:
            if not labels.is_file():
                raise ImageError(f"labels file not found: {labels}")
            names = [line.strip() for line in labels.read_text().splitlines() if line.strip()]
        _check_writable([out / "x.png"])
        precision = resolve_precision(precision, device)
        settings = Settings(iterations=iterations, fine_iterations=fine_iterations)
        am_settings = settings.replace(C=1.0)  # section 6: C = 1 for activation maximization and caricatures
        conv = F.filter_layers(loaded, layers)
        last = select_layers(loaded, "all")[-1]  # the class scores: the last layer before a softmax
        maxima_cache: dict[str, torch.Tensor] = {}

        def maxima(layer: str) -> torch.Tensor:
            if layer in maxima_cache:
                return maxima_cache[layer]
            if stats_file is not None and stats_file.is_file():
                stored = json.loads(stats_file.read_text()).get("layers", {})
                if layer in stored:
                    maxima_cache[layer] = torch.tensor(stored[layer]["max"])
                    return maxima_cache[layer]
            if images_dir is None:
                raise click.BadParameter(f"M of {layer} is needed: give --stats FILE or --images DIR")
            maxima_cache[layer] = unit_maxima(loaded.representation(layer), list_images(images_dir, stats_limit), size)
            return maxima_cache[layer]

        with _progress() as progress:
            fig_task = progress.add_task("figures", total=len(wanted), info="")
            step_task = progress.add_task("  iterations", total=None, info="")
            cb = _step_callback(progress, step_task)
            for w in wanted:
                png = out / f"{FIGURES[w]}.png"
                if png.exists() and not overwrite:
                    progress.update(fig_task, advance=1, info=f"{png.name} kept")
                    continue
                progress.update(fig_task, description=f"figure {w}")
                common = dict(precision=precision, device=device, callback=cb)
                inv = dict(common, fixed_C=fixed_C)
                if w == "5":
                    panel = F.layer_inversions(loaded, photos[:1], layers, settings, **inv)
                elif w == "8":
                    panel = F.diversity(loaded, photos, F.spread(layers, 3)[-3:], settings, seed_list, **inv)
                elif w == "9":
                    panel = F.window_inversions(loaded, photos[0], F.spatial_layers(loaded, layers, window + 2),
                                                settings, window=window, **inv)
                elif w == "10":
                    panel = F.stream_inversions(loaded, photos[0], F.spread(conv, 5), settings, **inv)
                elif w == "11":
                    panel = F.filter_grid(loaded, conv, filters, {n: maxima(n) for n in conv}, am_settings, **common)
                elif w == "13":
                    panel = F.class_grid(loaded, last, class_list, maxima(last), am_settings, names, **common)
                else:
                    panel = F.caricature_grid(loaded, photos, F.spread(conv + [last], 6), am_settings, **common)
                save_png(panel.image, png)
                save_json({"figure": w, "model": loaded.name, "weights": loaded.source, "precision": precision,
                           "images": [str(p) for p in files], "tiles": panel.tiles}, png.with_suffix(".json"))
                progress.update(fig_task, advance=1)
                click.echo(f"figure {w} -> {png}")


@main.command()
@click.option("--model", "model_spec", required=True, help="alexnet, caffenet, vgg-m, vgg-vd-16, a deploy.prototxt or a .mat.")
@click.option("--weights", type=click.Path(path_type=Path), help="Weights file (.mat, .caffemodel, .pth).")
@click.option("--layer", "layer_names", required=True, help="Comma-separated layer names.")
@click.option("--images", "images_dir", type=click.Path(path_type=Path), required=True, help="Folder of natural images.")
@click.option("--limit", type=click.IntRange(1), default=None, help="Use the first N images.")
@click.option("--batch-size", type=click.IntRange(1), default=16, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output JSON (the cache of M).")
@click.option("--overwrite", is_flag=True)
def stats(model_spec: str, weights: Path | None, layer_names: str, images_dir: Path, limit: int | None,
          batch_size: int, out: Path, overwrite: bool) -> None:
    """M for activation maximization (section 6): each unit's maximum over a folder of images.

    Per channel for convolutional layers.  Use the result with 'preimage maximize --stats FILE'.
    """
    from .models import load_model
    from .stats import unit_maxima

    with _errors():
        _check_free([out], overwrite)
        loaded = load_model(model_spec, weights)
        files = list_images(images_dir, limit)
        wanted = [name.strip() for name in layer_names.split(",") if name.strip()]
        reps = {name: loaded.representation(name) for name in wanted}
        result: dict[str, Any] = {"model": loaded.name, "weights": loaded.source, "images": str(images_dir),
                                  "n_images": len(files), "layers": {}}
        with _progress() as progress:
            for name, rep in reps.items():
                task = progress.add_task(f"stats {name}", total=len(files), info="")
                M = unit_maxima(rep, files, loaded.convention.input_size, batch_size,
                                on_batch=lambda k, task=task: progress.update(task, advance=k))
                result["layers"][name] = {"max": M.tolist(), "receptive_field": rep.geometry.receptive_field,
                                          "stride": rep.geometry.stride}
                click.echo(f"{name}: {M.numel()} units, M from {float(M.min()):.4g} to {float(M.max()):.4g}")
        save_json(result, out)
        click.echo(f"-> {out}")


@main.command("train-hoggle")
@click.option("--images", "images_dir", type=click.Path(path_type=Path), required=True, help="Folder of training photos.")
@click.option("--skip", type=click.IntRange(0), default=0, show_default=True,
              help="Skip the first N images (sorted), e.g. those you evaluate on.")
@click.option("--limit", type=click.IntRange(1), default=None, help="Use at most N images after --skip.")
@click.option("--atoms", type=click.IntRange(8), default=512, show_default=True, help="Dictionary size.")
@click.option("--patches", type=click.IntRange(100), default=40000, show_default=True, help="Training pairs.")
@click.option("--cell-size", type=click.IntRange(2, 64), default=8, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output .npz dictionary.")
@click.option("--overwrite", is_flag=True)
def train_hoggle(images_dir: Path, skip: int, limit: int | None, atoms: int, patches: int, cell_size: int, seed: int,
                 out: Path, overwrite: bool) -> None:
    """Learn the HOGgle baseline (Vondrick et al. 2013): a paired dictionary of patches and their HOG."""
    from .hoggle import train_hoggle as api_train

    with _errors():
        _check_free([out], overwrite)
        files = list_images(images_dir)[skip:]
        files = files[:limit] if limit is not None else files
        if not files:
            raise ImageError(f"no training images left in {images_dir} after --skip {skip}")
        with _progress() as progress:
            task = progress.add_task("train HOGgle", total=None, info="")

            def cb(done: int, total: int) -> None:
                progress.update(task, completed=done, total=total)

            model = api_train(files, cell_size=cell_size, n_atoms=atoms, n_patches=patches, seed=seed, progress=cb)
        model.save(out)
        click.echo(f"HOGgle dictionary ({atoms} atoms, {len(files)} images) -> {out}")


@main.command("show-hog")
@click.argument("image", type=click.Path(path_type=Path))
@click.option("--cell-size", type=click.IntRange(2, 64), default=8, show_default=True)
@click.option("--bilinear", is_flag=True, help="HOGb: bilinear orientation assignment.")
@click.option("--size", type=click.IntRange(0), default=0, show_default=True, help="Resize+crop first (0: keep).")
@click.option("--glyph-size", type=click.IntRange(5, 64), default=15, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), help="Output PNG (default: IMAGE.hog.png beside it).")
@click.option("--overwrite", is_flag=True)
def show_hog(image: Path, cell_size: int, bilinear: bool, size: int, glyph_size: int, out: Path | None,
             overwrite: bool) -> None:
    """Draw IMAGE's HOG as oriented-edge glyphs (like vl_hog_render), beside the image."""
    from .render import render_hog

    with _errors():
        out = out or image.with_name(f"{image.stem}.{'hogb' if bilinear else 'hog'}.png")
        _check_free([out], overwrite)
        rep = make_representation("hogb" if bilinear else "hog", cell_size=cell_size)
        photo = read_image(image, size=size or None, gray=True)
        with torch.no_grad():
            code = rep(rep.preprocess(photo[None]))[0]
        glyphs = render_hog(code, glyph_size=glyph_size)
        scaled = torch.nn.functional.interpolate(photo[None], size=glyphs.shape[-2:], mode="bilinear",
                                                 align_corners=False)[0]
        save_png(grid([scaled.expand(3, -1, -1), glyphs.expand(3, -1, -1)], columns=2), out)
        click.echo(f"{image}: HOG {tuple(code.shape[1:])} cells -> {out}")


@main.command()
@click.option("--model", "model_spec", required=True, help="alexnet, caffenet, vgg-m, vgg-vd-16, a deploy.prototxt or a .mat.")
@click.option("--weights", type=click.Path(path_type=Path), help="Weights file (.mat, .caffemodel, .pth).")
@click.option("--size", type=click.IntRange(1), default=None, help="Input side (default: the model's).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def layers(model_spec: str, weights: Path | None, size: int | None, as_json: bool) -> None:
    """List a model's layers with output shape, receptive field and stride (Tables 1-3)."""
    from rich.table import Table

    from .models import load_model

    with _errors():
        loaded = load_model(model_spec, weights)
        rows = loaded.layer_table(size)
        if as_json:
            click.echo(json.dumps([{"layer": r[0], "shape": list(r[1]), "receptive_field": r[2], "stride": r[3]}
                                   for r in rows], indent=1))
            return
        table = Table(title=f"{loaded.name} ({loaded.source})")
        for col in ("layer", "output shape", "receptive field", "stride"):
            table.add_column(col, justify="left" if col == "layer" else "right")
        for r in rows:
            table.add_row(str(r[0]), "x".join(str(v) for v in r[1]), str(r[2]), str(r[3]))
        Console().print(table)


@main.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--model", "model_spec", required=True, help="alexnet, caffenet, vgg-m, vgg-vd-16, a deploy.prototxt or a .mat.")
@click.option("--weights", type=click.Path(path_type=Path), help="Weights file (.mat, .caffemodel, .pth).")
@click.option("--labels", type=click.Path(path_type=Path), help="Class names, one per line (synset_words.txt).")
@click.option("--top", type=click.IntRange(1), default=5, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def classify(images: tuple[Path, ...], model_spec: str, weights: Path | None, labels: Path | None, top: int,
             as_json: bool) -> None:
    """Top classes of IMAGE(s), to check that a model was read correctly.

    Preprocessing as Caffe's reference: warp to 256x256 (bilinear), centre crop of the input size.
    """
    from .models import load_model
    from .stats import warp_crop

    with _errors():
        loaded = load_model(model_spec, weights)
        names = loaded.classes
        if labels is not None:
            if not labels.is_file():
                raise ImageError(f"labels file not found: {labels}")
            names = [line.strip() for line in labels.read_text().splitlines() if line.strip()]
        batch = [warp_crop(p, loaded.convention.input_size) for p in images]
        rep = loaded.representation(loaded.layers[-1])
        with torch.no_grad():
            scores = rep(rep.preprocess(torch.stack(batch))).flatten(1)
        if scores.min() < 0 or abs(float(scores[0].sum()) - 1) > 1e-3:
            scores = scores.softmax(1)
        p_top, i_top = scores.topk(min(top, scores.shape[1]), dim=1)
        out = []
        for n, path in enumerate(images):
            preds = [{"class": int(i), "label": names[int(i)] if names and int(i) < len(names) else str(int(i)),
                      "probability": float(pv)} for pv, i in zip(p_top[n], i_top[n])]
            out.append({"image": str(path), "top": preds})
        if as_json:
            click.echo(json.dumps(out, indent=1))
        else:
            for o in out:
                click.echo(o["image"])
                for k, pr in enumerate(o["top"]):
                    click.echo(f"  {k + 1}. {pr['probability']:.3f}  {pr['label']}")


def run() -> None:
    """Entry point that turns stray expected errors into one-line messages (exit 2)."""
    try:
        main(standalone_mode=True)
    except KeyboardInterrupt:
        click.echo("preimage: interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    run()
