"""Figure analogues: how a parameter changes an inversion (the paper's Figure 2).

:func:`sweep` inverts the same photo once per value of one :class:`~preimage.defaults.Settings`
field (``C``, ``beta``, ``alpha``, ``B``, ``iterations``, ...) and returns a labelled row of
images: the original first, then one reconstruction per value.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import fields

import torch
from torch import Tensor

from .defaults import Settings
from .io import grid
from .representations.base import Representation
from .visualizations import invert

SWEEPABLE = tuple(f.name for f in fields(Settings) if f.name not in ("extra",))


def sweep(
    representation: Representation,
    photo: Tensor,
    parameter: str,
    values: Sequence[float],
    settings: Settings,
    seed: int = 0,
    device: torch.device | str | None = None,
    callback: Callable[[int, int, dict[str, float]], None] | None = None,
) -> tuple[Tensor, list[float]]:
    """Invert ``photo`` ``(3 or 1, H, W)`` once per value of ``parameter``.

    Returns the row ``[original, x*(v1), x*(v2), ...]`` as one ``(3, H', W')`` image and the
    reconstruction errors.  Figure 2 of the paper: ``parameter="C", values=(1, 20, 100, 300)``
    and ``parameter="beta", values=(1, 1.5, 2)``.
    """
    if parameter not in SWEEPABLE:
        raise ValueError(f"cannot sweep {parameter!r}; choose one of {', '.join(SWEEPABLE)}")
    tiles: list[Tensor] = []
    errors: list[float] = []
    with torch.no_grad():
        original = representation.deprocess(representation.preprocess(photo[None].float()))[0]
    tiles.append(original)
    for v in values:
        value = int(v) if parameter in ("iterations", "fine_iterations", "jitter") else float(v)
        r = invert(representation, photo[None], seeds=[seed], settings=settings.replace(**{parameter: value}),
                   device=device, callback=callback)
        tiles.append(r.images[0])
        errors.append(float(r.error[0]))
    return grid(tiles, columns=len(tiles)), errors
