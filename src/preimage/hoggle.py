"""HOGgles: HOG inversion with a paired dictionary (the paper's "HOGgle" baseline, Table 4).

Vondrick, Khosla, Malisiewicz and Torralba, "HOGgles: Visualizing Object Detection Features"
(ICCV 2013; reference code ``cvondrick/ihog``) invert HOG without optimization: a dictionary
of *pairs* (a gray image patch and the HOG of that patch) is learned jointly, so that a sparse
code that explains a HOG window over the HOG half of the dictionary, applied to the gray half,
gives an image that could have produced it.  Mahendran & Vedaldi (IJCV 2016, Table 4) compare
their pre-images against it (HOGgle: 60.1% normalized error on their ImageNet sample).

This module reimplements the method on top of the project's VLFeat-exact UoCTTI HOG
(:func:`preimage.representations.hog.hog`, 31 channels):

Pairs.  A *window* of ``wy x wx`` HOG cells (default ``5 x 5``, as ihog) at cells
``i .. i + wy - 1`` is paired with the gray patch that covers those cells plus one cell on
every side, i.e. ``(wy + 2) s x (wx + 2) s`` pixels (``56 x 56`` for ``s = 8``), as in ihog.
With VLFeat's cell grid (cell ``k`` covers pixels ``k s .. (k + 1) s - 1``) the patch starts at
pixel ``(i - 1) s``.  Windows are cut from the HOG of the whole image (so block normalization
sees the real neighbours), patches from the image itself.

Normalization (ihog's ``learnpairdict``).  Each gray patch and each HOG window is made
zero-mean and unit-norm independently; the pair is the concatenation of the two (norm
``sqrt(2)``).

Learning.  Online dictionary learning (Mairal, Bach, Ponce and Sapiro, 2009; ihog uses SPAMS'
``mexTrainDL``): minibatches are sparse-coded with non-negative codes (ihog's ``posAlpha``)
by solving ``min_a 0.5 ||x - D a||^2 + alpha ||a||_1, a >= 0`` with FISTA, the sufficient
statistics ``sum a a^T`` and ``sum x a^T`` are accumulated with a forgetting factor, and the
atoms are updated by block coordinate descent under ``||d_j|| <= 1``.  Atoms are initialized
from random training pairs; an unused atom is replaced by a random pair.

Inversion (ihog's ``invertHOG``).  The HOG array is padded by ``pad_cells`` cells of zeros;
every ``wy x wx`` window (stride one cell) is normalized like the training windows and coded
over the HOG half ``D_hog`` (same ``alpha``, non-negative), its gray patch is ``D_gray a``;
overlapping patches are averaged with a Gaussian weight centred on the patch, the image is
cropped to the requested size (cell alignment as above) and stretched to ``[0, 1]``.

All the numerics run in float32 torch on the CPU (or the device of the input code); nothing
beyond torch and numpy is needed.
"""

from __future__ import annotations

import ast
import contextlib
import math
import os
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .io import read_image
from .representations.hog import hog, hog_shape

__all__ = ["HoggleModel", "invert_images", "train_hoggle", "HOG_CHANNELS"]

HOG_CHANNELS = 31
"""Channels of the UoCTTI HOG code with 9 orientations (``3 * 9 + 4``)."""

_FORMAT = "preimage-hoggle-v1"
_EPS = 1e-8
_LOAD_ERRORS = (
    OSError, EOFError, KeyError, IndexError, TypeError, ValueError, SyntaxError, zipfile.BadZipFile
)
"""What a missing, truncated or foreign ``.npz`` can raise while :meth:`HoggleModel.load` reads it."""


# --------------------------------------------------------------------------------------------
# Numerics
# --------------------------------------------------------------------------------------------
def _normalize_columns(x: Tensor) -> Tensor:
    """Zero-mean, unit-norm columns of ``(d, n)`` (ihog's per-window normalization).

    A constant column (a flat patch, an empty HOG window) becomes 0.
    """
    x = x - x.mean(dim=0, keepdim=True)
    return x / torch.sqrt((x * x).sum(dim=0, keepdim=True) + _EPS)


def _lipschitz(gram: Tensor) -> float:
    """Largest eigenvalue of the (symmetric PSD) Gram matrix, the gradient's Lipschitz constant.

    With a 0.1% margin for the float32 eigensolver (a step above ``1 / L`` could diverge).
    """
    return float(torch.linalg.eigvalsh(gram.float().cpu()).max().clamp_min(1e-12)) * 1.001


def _nonneg_lasso(dictionary: Tensor, x: Tensor, alpha: float, n_iter: int, gram: Tensor | None = None) -> Tensor:
    """Codes ``(k, n)`` minimizing ``0.5 ||x - D a||^2 + alpha ||a||_1`` with ``a >= 0`` (FISTA).

    Args:
        dictionary: ``D``, ``(d, k)``.
        x: ``(d, n)`` signals.
        alpha: the l1 weight (SPAMS' ``lambda``).
        n_iter: FISTA iterations.
        gram: ``D^T D`` if already computed.
    """
    if gram is None:
        gram = dictionary.T @ dictionary
    step = 1.0 / _lipschitz(gram)
    target = dictionary.T @ x  # (k, n)
    threshold = alpha * step
    a = torch.zeros_like(target)
    y = a
    t = 1.0
    for _ in range(n_iter):
        a_next = torch.clamp_min(y - step * (gram @ y - target) - threshold, 0.0)
        t_next = (1.0 + math.sqrt(1.0 + 4.0 * t * t)) / 2.0
        y = a_next + ((t - 1.0) / t_next) * (a_next - a)
        a, t = a_next, t_next
    return a


def _gaussian_window(height: int, width: int, sigma: float) -> Tensor:
    """``(height * width,)`` Gaussian weights centred on the patch (MATLAB ``fspecial``), max 1."""
    ys = torch.arange(height, dtype=torch.float32) - (height - 1) / 2
    xs = torch.arange(width, dtype=torch.float32) - (width - 1) / 2
    w = torch.exp(-(ys[:, None] ** 2 + xs[None, :] ** 2) / (2 * sigma * sigma))
    return w.reshape(-1)


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------
@dataclass
class HoggleModel:
    """A HOGgle paired dictionary.

    Attributes:
        gray_dict: ``(P, K)`` gray halves of the atoms, ``P = (wy + 2) s * (wx + 2) s`` pixels in
            row-major order (zero-mean, unit-norm patch space).
        hog_dict: ``(D, K)`` HOG halves, ``D = 31 * wy * wx`` in ``(channel, row, col)`` order
            (zero-mean, unit-norm window space).
        cell_size: HOG cell size ``s`` in pixels.
        window_cells: ``(wy, wx)``, the HOG window in cells.
        alpha: l1 weight of the sparse coding (training and inversion).
        pad_cells: cells of zero HOG added around the code before inversion (ihog: 5 or 6).
        sigma: standard deviation, in pixels, of the Gaussian weight of a patch when the
            overlapping patches are averaged (ihog: 9 for ``s = 8``).
        n_iter: FISTA iterations of the sparse coding at inversion time.
        info: training metadata (number of images and pairs, seconds, seed, ...), JSON-like
            scalars only.
    """

    gray_dict: np.ndarray
    hog_dict: np.ndarray
    cell_size: int = 8
    window_cells: tuple[int, int] = (5, 5)
    alpha: float = 0.02
    pad_cells: int = 5
    sigma: float = 9.0
    n_iter: int = 100
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.gray_dict = np.ascontiguousarray(self.gray_dict, dtype=np.float32)
        self.hog_dict = np.ascontiguousarray(self.hog_dict, dtype=np.float32)
        self.cell_size = int(self.cell_size)
        self.window_cells = (int(self.window_cells[0]), int(self.window_cells[1]))
        wy, wx = self.window_cells
        s = self.cell_size
        if s < 1 or wy < 1 or wx < 1:
            raise ValueError(f"HOGgle model: bad cell_size={s} or window_cells={self.window_cells}")
        if self.gray_dict.ndim != 2 or self.hog_dict.ndim != 2:
            raise ValueError("HOGgle model: the dictionaries must be 2-D arrays")
        if self.gray_dict.shape != ((wy + 2) * (wx + 2) * s * s, self.n_atoms):
            raise ValueError(
                f"HOGgle model: gray dictionary of shape {self.gray_dict.shape} does not match "
                f"{self.window_cells} windows of {s}-pixel cells and {self.n_atoms} atoms"
            )
        if self.hog_dict.shape[0] != HOG_CHANNELS * wy * wx:
            raise ValueError(
                f"HOGgle model: HOG dictionary of shape {self.hog_dict.shape} does not match "
                f"{self.window_cells} windows of {HOG_CHANNELS} channels"
            )
        if not (np.isfinite(self.gray_dict).all() and np.isfinite(self.hog_dict).all()):
            raise ValueError("HOGgle model: the dictionaries contain NaN or inf")

    # ---------------------------------------------------------------------------------------
    @property
    def n_atoms(self) -> int:
        """Number of dictionary atoms ``K``."""
        return int(self.hog_dict.shape[1])

    @property
    def patch_size(self) -> tuple[int, int]:
        """Gray patch size in pixels, ``((wy + 2) s, (wx + 2) s)``."""
        wy, wx = self.window_cells
        return (wy + 2) * self.cell_size, (wx + 2) * self.cell_size

    # ---------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write the model to ``path`` (``.npz``) atomically: temp file in the same folder, then rename."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta_keys = sorted(self.info)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(
                    f,
                    format=np.array(_FORMAT),
                    gray_dict=self.gray_dict,
                    hog_dict=self.hog_dict,
                    cell_size=np.array(self.cell_size),
                    window_cells=np.array(self.window_cells),
                    alpha=np.array(self.alpha),
                    pad_cells=np.array(self.pad_cells),
                    sigma=np.array(self.sigma),
                    n_iter=np.array(self.n_iter),
                    info_keys=np.array(meta_keys, dtype=str),
                    info_values=np.array([repr(self.info[k]) for k in meta_keys], dtype=str),
                )
            os.chmod(tmp, 0o644)  # mkstemp creates 0600 files
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    @classmethod
    def load(cls, path: str | Path) -> HoggleModel:
        """Read a model written by :meth:`save`.

        Raises:
            ValueError: one line naming the file, if it is missing, not an ``.npz`` written by
                :meth:`save`, truncated or inconsistent.
        """
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"HOGgle model not found: {path}")
        try:
            with np.load(path, allow_pickle=False) as z:
                if "format" not in z.files or str(z["format"]) != _FORMAT:
                    raise ValueError("not a HOGgle model (no or wrong format tag)")
                info: dict[str, Any] = {}
                for k, v in zip(z["info_keys"].tolist(), z["info_values"].tolist()):
                    info[str(k)] = _literal(str(v))
                wc = z["window_cells"].tolist()
                return cls(
                    gray_dict=z["gray_dict"],
                    hog_dict=z["hog_dict"],
                    cell_size=int(z["cell_size"]),
                    window_cells=(int(wc[0]), int(wc[1])),
                    alpha=float(z["alpha"]),
                    pad_cells=int(z["pad_cells"]),
                    sigma=float(z["sigma"]),
                    n_iter=int(z["n_iter"]),
                    info=info,
                )
        except _LOAD_ERRORS as exc:
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ValueError(f"cannot read HOGgle model {path}: {msg}") from None

    # ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def invert(self, hog_code: np.ndarray | Tensor, size: tuple[int, int]) -> Tensor:
        """Reconstruct gray images from UoCTTI HOG codes.

        Args:
            hog_code: ``(N, 31, Hc, Wc)`` codes as :func:`preimage.representations.hog.hog`
                returns them (computed on ``0 .. 255`` images with this model's cell size), or a
                single code in VLFeat's layout ``(Hc, Wc, 31)``; numpy or torch.
            size: ``(H, W)`` of the images to return; must give the code's cell grid,
                ``hog_shape(H, W, cell_size) == (Hc, Wc)``.

        Returns:
            ``(N, 1, H, W)`` float32 gray images in ``[0, 1]`` (each stretched to the full range,
            as ihog does; the mean and contrast of the original are not recoverable from HOG),
            on the code's device.

        Raises:
            ValueError: on a code of the wrong shape or a size that does not match it.
        """
        code = torch.as_tensor(hog_code)
        if code.dim() == 3:
            if code.shape[-1] != HOG_CHANNELS:
                raise ValueError(f"HOGgle: a 3-D code must be (Hc, Wc, {HOG_CHANNELS}), got {tuple(code.shape)}")
            code = code.permute(2, 0, 1).unsqueeze(0)
        if code.dim() != 4 or code.shape[1] != HOG_CHANNELS:
            raise ValueError(f"HOGgle: expected a (N, {HOG_CHANNELS}, Hc, Wc) HOG code, got {tuple(code.shape)}")
        height, width = int(size[0]), int(size[1])
        s = self.cell_size
        n, _, hc, wc = code.shape
        if hog_shape(height, width, s) != (hc, wc):
            raise ValueError(
                f"HOGgle: a {height}x{width} image has {hog_shape(height, width, s)} cells of {s} pixels, "
                f"but the code has {(hc, wc)}"
            )
        device = code.device
        code = code.to(torch.float32)
        wy, wx = self.window_cells
        p = self.pad_cells
        # ihog pads with zeros so that the border cells are covered by as many windows as the
        # interior ones; make sure there is at least one window.
        pad_y = max(p, math.ceil((wy - hc) / 2))
        pad_x = max(p, math.ceil((wx - wc) / 2))
        padded = F.pad(code, (pad_x, pad_x, pad_y, pad_y))
        hp, wp = padded.shape[-2:]
        windows = F.unfold(padded, (wy, wx))  # (N, 31 wy wx, L), (channel, row, col) order
        n_win = windows.shape[-1]
        x = _normalize_columns(windows.permute(1, 0, 2).reshape(windows.shape[1], -1))
        d_hog = torch.from_numpy(self.hog_dict).to(device)
        d_gray = torch.from_numpy(self.gray_dict).to(device)
        codes = _nonneg_lasso(d_hog, x, self.alpha, self.n_iter)
        patches = (d_gray @ codes).reshape(d_gray.shape[0], n, n_win).permute(1, 0, 2)  # (N, P, L)
        ph, pw = self.patch_size
        weight = _gaussian_window(ph, pw, self.sigma).to(device)
        canvas = ((hp + 2) * s, (wp + 2) * s)  # canvas pixel 0 = image pixel -(pad + 1) s
        num = F.fold(patches * weight[None, :, None], canvas, (ph, pw), stride=s)
        den = F.fold(weight[None, :, None].expand(1, -1, n_win), canvas, (ph, pw), stride=s)
        image = num / den.clamp_min(1e-12)
        top, left = (pad_y + 1) * s, (pad_x + 1) * s
        image = image[:, :, top : top + height, left : left + width]
        lo = image.amin(dim=(1, 2, 3), keepdim=True)
        hi = image.amax(dim=(1, 2, 3), keepdim=True)
        return ((image - lo) / (hi - lo).clamp_min(1e-12)).clamp(0.0, 1.0)


def _literal(text: str) -> Any:
    """Parse a ``repr`` of a JSON-like scalar written by :meth:`HoggleModel.save`."""
    return ast.literal_eval(text)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------
def _pairs_from_image(
    gray255: Tensor, cell_size: int, window_cells: tuple[int, int], count: int, rng: np.random.Generator
) -> tuple[Tensor, Tensor] | None:
    """Up to ``count`` random (gray patch, HOG window) pairs of one ``(1, 1, H, W)`` image.

    Returns ``(gray (P, m), hog (D, m))`` unnormalized, or ``None`` if the image is too small.
    """
    s = cell_size
    wy, wx = window_cells
    ph, pw = (wy + 2) * s, (wx + 2) * s
    height, width = gray255.shape[-2:]
    if height < ph or width < pw:
        return None
    code = hog(gray255, cell_size=s)  # (1, 31, Hc, Wc)
    # patch m (top-left pixel m s) <-> window at cell m + 1; both grids are cut to the patches
    # that lie inside the image.
    my = (height - ph) // s + 1
    mx = (width - pw) // s + 1
    windows = F.unfold(code[:, :, 1 : 1 + my + wy - 1, 1 : 1 + mx + wx - 1], (wy, wx))[0]  # (D, my mx)
    take = rng.permutation(my * mx)[: min(count, my * mx)]
    idx = torch.from_numpy(np.sort(take))
    ys, xs = idx // mx, idx % mx
    image = gray255[0, 0]
    patches = torch.stack(
        [image[y * s : y * s + ph, x * s : x * s + pw].reshape(-1) for y, x in zip(ys.tolist(), xs.tolist())], 1
    )
    return patches / 255.0, windows[:, idx]


@contextlib.contextmanager
def _single_thread() -> Iterator[None]:
    """Run torch single-threaded inside the block (restored after).

    The atom-by-atom updates below are thousands of small memory-bound ops: threads do not
    speed them up and, on a busy machine, OpenMP spinning slows them down tenfold.
    """
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _update_dictionary(dictionary: Tensor, stat_a: Tensor, stat_b: Tensor, data: Tensor, gen: torch.Generator) -> None:
    """One sweep of block coordinate descent on the atoms (Mairal et al. 2009, algorithm 2), in place.

    Minimizes ``0.5 tr(D^T D A) - tr(D^T B)`` over each atom ``d_j`` in turn, under
    ``||d_j|| <= 1``, keeping the residual ``R = B - D A`` up to date.  An atom no code uses
    (``A_jj ~ 0``) is restarted from a random training pair.
    """
    n = data.shape[1]
    with _single_thread():
        residual = (stat_b - dictionary @ stat_a).T.contiguous()  # (K, d): rows contiguous
        atoms = dictionary.T.contiguous()
        diag = torch.diagonal(stat_a).clone()
        for j in range(atoms.shape[0]):
            old = atoms[j].clone()
            if diag[j] < 1e-6:
                new = data[:, int(torch.randint(0, n, (1,), generator=gen))].clone()
            else:
                new = old + residual[j] / diag[j]
            new /= new.norm().clamp_min(1.0)
            atoms[j] = new
            residual.addr_(stat_a[j], new - old, alpha=-1.0)
        dictionary.copy_(atoms.T)


def _learn_dictionary(
    data: Tensor,
    n_atoms: int,
    alpha: float,
    n_batches: int,
    batch_size: int,
    coding_iter: int,
    gen: torch.Generator,
    progress: Callable[[int], None] | None,
) -> Tensor:
    """Online dictionary learning (Mairal et al. 2009) with non-negative codes.

    Args:
        data: ``(d, n)`` training pairs (columns).
        n_atoms: ``K``.
        alpha: l1 weight.
        n_batches: number of minibatches.
        batch_size: columns per minibatch.
        coding_iter: FISTA iterations per minibatch.
        gen: random generator (initialization, batches, atom replacement).
        progress: called with the number of finished minibatches.

    Returns:
        ``(d, K)`` dictionary with atoms of norm at most 1.
    """
    d, n = data.shape
    init = torch.randperm(n, generator=gen)[:n_atoms]
    if init.numel() < n_atoms:  # fewer pairs than atoms: repeat with a little noise
        extra = torch.randint(0, n, (n_atoms - init.numel(),), generator=gen)
        init = torch.cat([init, extra])
    dictionary = data[:, init].clone()
    dictionary += 1e-3 * torch.randn(dictionary.shape, generator=gen)
    dictionary /= dictionary.norm(dim=0, keepdim=True).clamp_min(1.0)
    stat_a = torch.zeros(n_atoms, n_atoms)
    stat_b = torch.zeros(d, n_atoms)
    order = torch.randperm(n, generator=gen)
    pos = 0
    for t in range(n_batches):
        if pos + batch_size > n:
            order = torch.randperm(n, generator=gen)
            pos = 0
        batch = data[:, order[pos : pos + batch_size]]
        pos += batch_size
        codes = _nonneg_lasso(dictionary, batch, alpha, coding_iter)
        # forgetting factor of scikit-learn's MiniBatchDictionaryLearning (Mairal et al., 3.4.2)
        bs = batch.shape[1]
        theta = float((t + 1) * bs if t + 1 < bs else bs * bs + t + 1 - bs)
        beta = (theta + 1.0 - bs) / (theta + 1.0)
        stat_a.mul_(beta).add_(codes @ codes.T)
        stat_b.mul_(beta).add_(batch @ codes.T)
        _update_dictionary(dictionary, stat_a, stat_b, data, gen)
        if progress is not None:
            progress(t + 1)
    return dictionary


def train_hoggle(
    image_paths: Sequence[Path],
    *,
    cell_size: int = 8,
    window_cells: tuple[int, int] = (5, 5),
    n_atoms: int = 512,
    n_patches: int = 40000,
    alpha: float = 0.02,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    image_size: int | None = 160,
    n_batches: int = 100,
    batch_size: int = 1024,
    coding_iter: int = 60,
) -> HoggleModel:
    """Learn a HOGgle paired dictionary from photos (Vondrick et al. 2013, ihog's ``learnpairdict``).

    Each image is read as gray ``0 .. 255`` (with ``image_size``: shorter side resized to it and
    centre-cropped, the Table 4 protocol, so that training and test share one scale); its HOG
    is computed once; about ``n_patches / len(image_paths)`` random windows of
    ``window_cells`` cells are cut from it with their gray patches (one extra cell on each
    side); both halves are normalized to zero mean and unit norm; the joint dictionary is
    learned by online dictionary learning with non-negative sparse codes (see the module
    docstring).

    Args:
        image_paths: training images (any format :func:`preimage.io.read_image` reads).
        cell_size: HOG cell size in pixels.
        window_cells: ``(wy, wx)`` HOG window in cells (ihog: 5 x 5).
        n_atoms: dictionary size ``K`` (ihog: 1024; 512 trains in a few minutes on two cores).
        n_patches: number of training pairs (at most; fewer if the images do not have that many
            windows).
        alpha: l1 weight of the sparse coding (SPAMS' ``lambda``; ihog: 0.02).
        seed: seed of the patch sampling and of the learning.
        progress: called as ``progress(done, total)`` after each image read and each minibatch
            (``total = len(image_paths) + n_batches``).
        image_size: shorter side the images are resized to (then centre-cropped square); ``None``
            keeps them as they are.
        n_batches: minibatches of online learning (ihog: 1000 of 400).
        batch_size: pairs per minibatch.
        coding_iter: FISTA iterations of the sparse coding of a minibatch.

    Returns:
        The trained :class:`HoggleModel`; ``model.info`` holds the training metadata.

    Raises:
        ValueError: if no image is given, one cannot be read (:class:`preimage.io.ImageError`),
            or no image is large enough for one window.
    """
    t0 = time.perf_counter()
    paths = [Path(p) for p in image_paths]
    if not paths:
        raise ValueError("train_hoggle: no training images")
    if n_atoms < 1 or n_patches < 1 or n_batches < 1 or batch_size < 1:
        raise ValueError("train_hoggle: n_atoms, n_patches, n_batches and batch_size must be positive")
    window_cells = (int(window_cells[0]), int(window_cells[1]))
    total = len(paths) + n_batches
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    per_image = max(1, math.ceil(n_patches / len(paths)))
    grays: list[Tensor] = []
    hogs: list[Tensor] = []
    used = 0
    with torch.no_grad():
        for i, path in enumerate(paths):
            img = read_image(path, size=image_size, gray=True)  # ImageError (a ValueError) if unreadable
            pairs = _pairs_from_image(img.unsqueeze(0) * 255.0, cell_size, window_cells, per_image, rng)
            if pairs is not None:
                grays.append(pairs[0])
                hogs.append(pairs[1])
                used += 1
            if progress is not None:
                progress(i + 1, total)
        if not grays:
            raise ValueError(
                f"train_hoggle: no image is large enough for a {window_cells} window of {cell_size}-pixel cells"
            )
        gray = torch.cat(grays, 1)
        code = torch.cat(hogs, 1)
        del grays, hogs
        if gray.shape[1] > n_patches:
            keep = torch.from_numpy(np.sort(rng.permutation(gray.shape[1])[:n_patches]))
            gray, code = gray[:, keep], code[:, keep]
        data = torch.cat([_normalize_columns(gray), _normalize_columns(code)], 0).contiguous()
        n_pairs = data.shape[1]
        n_gray = gray.shape[0]
        del gray, code
        t_data = time.perf_counter() - t0

        def step(done: int) -> None:
            if progress is not None:
                progress(len(paths) + done, total)

        dictionary = _learn_dictionary(
            data, n_atoms, alpha, n_batches, min(batch_size, n_pairs), coding_iter, gen, step
        )
    info = {
        "n_images": len(paths),
        "n_images_used": used,
        "n_pairs": int(n_pairs),
        "image_size": image_size,
        "n_batches": n_batches,
        "batch_size": batch_size,
        "coding_iter": coding_iter,
        "seed": seed,
        "data_seconds": round(t_data, 3),
        "train_seconds": round(time.perf_counter() - t0, 3),
        "torch_threads": torch.get_num_threads(),
    }
    return HoggleModel(
        gray_dict=dictionary[:n_gray].numpy(),
        hog_dict=dictionary[n_gray:].numpy(),
        cell_size=cell_size,
        window_cells=window_cells,
        alpha=alpha,
        pad_cells=5,
        sigma=9.0 * cell_size / 8.0,
        info=info,
    )


# --------------------------------------------------------------------------------------------
# Evaluation helper
# --------------------------------------------------------------------------------------------
def invert_images(model: HoggleModel, photos: Tensor) -> tuple[Tensor, Tensor]:
    """HOGgle reconstructions of gray photos and their normalized HOG errors (Table 4).

    Args:
        model: a trained :class:`HoggleModel`.
        photos: ``(N, 1, H, W)`` gray images in ``[0, 1]``.

    Returns:
        ``(recons, errors)``: ``(N, 1, H, W)`` reconstructions in ``[0, 1]`` and ``(N,)`` errors
        ``||HOG(x*) - HOG(x0)|| / ||HOG(x0)||``, HOG being :func:`preimage.representations.hog.hog`
        (UoCTTI, the model's cell size) of the images scaled to ``0 .. 255``.

    Raises:
        ValueError: if ``photos`` is not ``(N, 1, H, W)``.
    """
    if photos.dim() != 4 or photos.shape[1] != 1:
        raise ValueError(f"invert_images: expected gray photos of shape (N, 1, H, W), got {tuple(photos.shape)}")
    with torch.no_grad():
        x0 = photos.to(torch.float32) * 255.0
        code = hog(x0, cell_size=model.cell_size)
        recons = model.invert(code, (photos.shape[-2], photos.shape[-1]))
        rec_code = hog(recons * 255.0, cell_size=model.cell_size)
        a, b = rec_code.flatten(1), code.flatten(1)
        errors = (a - b).norm(dim=1) / b.norm(dim=1).clamp_min(1e-12)
    return recons, errors
