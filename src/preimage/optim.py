"""Algorithm 1 of the paper: AdaGrad-like scaling with momentum, then a projection.

For every component ``x`` (line numbers of Algorithm 1)::

    5: G_t   = rho * G_{t-1} + g_t^2
    6: eta_t = 1 / (1/eta_0 + sqrt(G_t))
    7: mu_t  = rho * mu_{t-1} - eta_t * g_t
    8: x_t+1 = Pi_{B+}(x_t + mu_t)

The projection ``Pi_{B+}`` is a callable applied in place after each step (for images:
:meth:`preimage.objectives.BoundedRange.project`, each pixel's colour vector into the ball of
radius ``B+``).  Changing the learning rate with :meth:`PreimageSGD.set_lr` resets the
momentum, as the authors' code does between its two stages.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer


class PreimageSGD(Optimizer):
    """Algorithm 1 as a :class:`torch.optim.Optimizer`.

    Args:
        params: the image tensors being optimized (leaf tensors with ``requires_grad``).
        lr: ``eta_0`` in Algorithm 1 (per-component initial learning rate).
        momentum: ``rho`` (0.9 in the paper), used for both ``G`` and ``mu``.
        projection: in-place projection onto the feasible set, or ``None``.
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        lr: float,
        momentum: float = 0.9,
        projection: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        if lr <= 0:
            raise ValueError(f"learning rate must be positive, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        super().__init__(params, dict(lr=lr, momentum=momentum))
        self.projection = projection

    def set_lr(self, lr: float) -> None:
        """Switch to a new ``eta_0``; resets the momentum ``mu`` (not ``G``) if it changed."""
        for group in self.param_groups:
            if group["lr"] != lr:
                group["lr"] = lr
                for p in group["params"]:
                    st = self.state.get(p)
                    if st:
                        st["mu"].zero_()

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            rho, inv_eta0 = group["momentum"], 1.0 / group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                st = self.state[p]
                if not st:
                    st["G"] = torch.zeros_like(p)
                    st["mu"] = torch.zeros_like(p)
                G, mu = st["G"], st["mu"]
                G.mul_(rho).addcmul_(g, g)  # line 5
                denom = G.sqrt().add_(inv_eta0)  # line 6: eta = 1 / denom
                mu.mul_(rho).addcdiv_(g, denom, value=-1.0)  # line 7
                p.add_(mu)  # line 8
                if self.projection is not None:
                    self.projection(p)
        return loss
