"""Shared fixtures: small real photos (scikit-image's bundled ones) and the shared data folder."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# The engine fuses its CPU step with preimage's C kernels where they can be built (preimage.native,
# ~1 s once per machine): the tests run that path, as users do.  Where they cannot, table4 / table5 /
# figures would fall back to torch.compile (~15 s per process), so the tests stay eager instead.
from preimage import native  # noqa: E402

if native.library(quiet=True) is None:
    os.environ.setdefault("PREIMAGE_COMPILE", "0")

SHARED = Path(__file__).resolve().parents[2] / "shared"
IMAGENET = SHARED / "images" / "imagenet-sample"


def benchmark_module():
    """``benchmarks/run.py`` (a script, not part of the package) as a module, loaded once."""
    import importlib.util
    import sys

    if "preimage_bench" not in sys.modules:
        spec = importlib.util.spec_from_file_location("preimage_bench", Path(__file__).parents[1] / "benchmarks" / "run.py")
        module = sys.modules["preimage_bench"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules["preimage_bench"]


def photo(name: str = "astronaut", size: int = 64) -> torch.Tensor:
    """A bundled scikit-image photo, shorter side resized to ``size``, centre-cropped, (3, s, s) in [0, 1]."""
    from skimage import data

    from preimage.io import resize_crop

    a = getattr(data, name)()
    im = Image.fromarray(a).convert("RGB")
    im = resize_crop(im, size)
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1).contiguous()


@pytest.fixture
def threads(request: pytest.FixtureRequest):
    """``torch.set_num_threads(request.param)`` for one test (parametrize it ``indirect=True``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.fixture
def imagenet_dir() -> Path:
    if not IMAGENET.is_dir():
        pytest.skip(f"shared ImageNet sample not found at {IMAGENET}")
    return IMAGENET


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """A folder of three small PNG photos (astronaut, coffee, chelsea), 48x48."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in ("astronaut", "coffee", "chelsea"):
        a = (photo(name, 48).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(a).save(folder / f"{name}.png")
    return folder


def tiny_cnn(seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 5, stride=2, padding=2),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 16, 3, padding=1),
        torch.nn.ReLU(),
    )
