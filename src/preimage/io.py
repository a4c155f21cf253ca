"""Images in and out: reading, the paper's crop protocol, grids, JSON sidecars, atomic writes.

Every file is written to a temporary name in the destination folder and renamed into place,
so a failed or interrupted run never leaves a half-written output.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


class ImageError(ValueError):
    """An image that cannot be read or used."""


def read_image(path: str | Path, size: int | None = None, gray: bool = False) -> Tensor:
    """Read ``path`` as a ``(3, H, W)`` RGB (or ``(1, H, W)`` gray) float tensor in [0, 1].

    With ``size``, the shorter side is resized to ``size`` (bicubic, antialiased) and the
    centre square cropped: the protocol of the paper's Table 4.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            im = im.convert("L" if gray else "RGB")
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ImageError(f"cannot read image {path}: {exc}") from None
    if size is not None:
        im = resize_crop(im, size)
    a = np.asarray(im, dtype=np.float32) / 255.0
    t = torch.from_numpy(a.copy())
    return t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1).contiguous()


def resize_crop(im: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to ``size`` and crop the centre ``size x size`` square."""
    w, h = im.size
    s = size / min(w, h)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    im = im.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return im.crop((left, top, left + size, top + size))


def list_images(folder: str | Path, limit: int | None = None) -> list[Path]:
    """Image files of ``folder`` in sorted order, at most ``limit``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ImageError(f"no images in {folder}")
    return files[:limit] if limit is not None else files


def to_uint8(photo: Tensor) -> np.ndarray:
    """``(3 or 1, H, W)`` in [0, 1] -> ``(H, W, 3)`` or ``(H, W)`` uint8."""
    a = (photo.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    if a.shape[0] == 1:
        return a[0].numpy()
    return a.permute(1, 2, 0).numpy()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it to ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600 files; outputs get the usual mode
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def save_png(photo: Tensor | np.ndarray, path: str | Path) -> None:
    a = photo if isinstance(photo, np.ndarray) else to_uint8(photo)
    with atomic_path(path) as tmp:
        Image.fromarray(a).save(tmp, format="PNG")


def _jsonable(o: Any) -> Any:
    if isinstance(o, Tensor):
        return o.tolist()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def save_json(data: Any, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")


def save_npy(array: np.ndarray, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)


def grid(photos: Sequence[Tensor], columns: int, pad: int = 2, background: float = 1.0) -> Tensor:
    """Tile equally sized ``(3, H, W)`` images into one ``(3, H', W')`` image, row-major."""
    if not photos:
        raise ValueError("no images to tile")
    C, H, W = photos[0].shape
    rows = (len(photos) + columns - 1) // columns
    out = torch.full((C, rows * (H + pad) + pad, columns * (W + pad) + pad), background)
    for i, p in enumerate(photos):
        r, c = divmod(i, columns)
        y, x = pad + r * (H + pad), pad + c * (W + pad)
        out[:, y : y + H, x : x + W] = p
    return out
