"""Every constant of the paper, derived in one place (section 3.3).

The paper fixes ``alpha = 6``, ``beta = 2``, ``B = 80`` and derives the rest from them:
``B+ = 2B`` (eq. 6), ``V = B / 6.5`` (section 3.2.2) and the initial learning rate
``eta0 = 0.01 * B^2 / alpha`` (section 3.4).  The authors' code (aravindhm/nnpreimage,
``get_defaults.m`` and ``nnpreimage.m``) adds two things that this package also does by default:

* a second stage of 50 iterations at ``eta0 / 10`` without jitter after the 300 main ones
  (used for inversion; momentum is reset when the rate changes), and
* a noise initialization scaled so that its 95th percentile equals ``B / sqrt(3)``.

The regularizers are normalized by the image area ``H*W`` (eqs. 5 and TV^beta) while the
paper's derivation of ``eta0`` (``0 = B - eta * alpha / B``) is for the un-normalized term;
as in the authors' code the step actually used is ``H * W * eta0``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class Settings:
    """The hyper-parameters of energy (1) and Algorithm 1.

    Only ``B``, ``alpha`` and ``beta`` are free in the paper; the other fields default to
    ``None`` and are derived from them by the properties below (set them to override).
    """

    C: float = 1.0  # loss weight in eq. (1)
    alpha: float = 6.0  # exponent of the bounded-range regularizer N_alpha (eq. 5)
    beta: float = 2.0  # exponent of TV^beta (section 3.2.2)
    B: float = 80.0  # typical L2 norm of a pixel's colour vector (eq. 5)
    B_plus_: float | None = None  # hard bound on each pixel's colour norm (eq. 6); 2B
    V_: float | None = None  # typical gradient norm in TV^beta; B / 6.5
    eta0_: float | None = None  # initial learning rate; 0.01 B^2 / alpha (section 3.4)
    lr_fraction: float = 0.01  # the 0.01 in eta0 = 0.01 B^2/alpha (the authors' code: 0.05)
    momentum: float = 0.9  # rho in Algorithm 1
    iterations: int = 300  # T in Algorithm 1
    fine_iterations: int = 50  # second stage at eta0/10 without jitter (authors' code); 0: off
    jitter: int | None = None  # T of eq. (7); None: max(1, round(stride/4)); 1: no jitter
    init_percentile_scale: bool = True  # noise scaled so its 95th percentile is B/sqrt(3)
    lambda_alpha: float = 1.0  # weight of N_alpha (the paper: 1)
    lambda_tv: float = 1.0  # weight of TV^beta (the paper: 1)
    extra: dict[str, Any] = field(default_factory=dict)  # free-form, recorded in sidecars

    @property
    def B_plus(self) -> float:
        return 2.0 * self.B if self.B_plus_ is None else self.B_plus_

    @property
    def V(self) -> float:
        return self.B / 6.5 if self.V_ is None else self.V_

    @property
    def eta0(self) -> float:
        return self.lr_fraction * self.B**2 / self.alpha if self.eta0_ is None else self.eta0_

    @property
    def init_scale(self) -> float:
        """Target 95th percentile of the initial noise: ``B / sqrt(3)`` (authors' code)."""
        return self.B / math.sqrt(3.0)

    def replace(self, **changes: Any) -> "Settings":
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """All settings, derived values included, for JSON sidecars."""
        d = asdict(self)
        for k in ("B_plus_", "V_", "eta0_"):
            d.pop(k)
        d.update(B_plus=self.B_plus, V=self.V, eta0=self.eta0)
        return d


PAPER = Settings()
"""The paper's defaults (section 3.3)."""
