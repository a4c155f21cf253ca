"""Algorithm 1 step by step against a hand computation."""

import numpy as np
import pytest
import torch

from preimage.objectives import BoundedRange
from preimage.optim import PreimageSGD


def algorithm1_reference(x0, grad_fn, eta0, rho, steps, bound=None):
    x, G, mu = x0.copy(), np.zeros_like(x0), np.zeros_like(x0)
    for _ in range(steps):
        g = grad_fn(x)
        G = rho * G + g * g  # line 5
        eta = 1.0 / (1.0 / eta0 + np.sqrt(G))  # line 6
        mu = rho * mu - eta * g  # line 7
        x = x + mu  # line 8
        if bound is not None:  # projection of each pixel's colour vector (axis 1)
            n = np.sqrt((x**2).sum(1, keepdims=True))
            x = x * np.minimum(bound / np.maximum(n, 1e-12), 1.0)
    return x


def test_steps_match_hand_computed_algorithm1():
    rng = np.random.default_rng(0)
    x0 = rng.normal(size=(2, 3, 4, 4)) * 50
    target = rng.normal(size=x0.shape) * 50
    grad = lambda x: 2 * (x - target) + 0.1 * x**3 / 1e3  # a non-quadratic energy
    x = torch.tensor(x0, requires_grad=True)
    proj = BoundedRange(6, 80, B_plus=100).project
    opt = PreimageSGD([x], lr=3.0, momentum=0.9, projection=proj)
    for _ in range(7):
        opt.zero_grad()
        e = ((x - torch.tensor(target)) ** 2).sum() + 0.1 * (x**4).sum() / 4e3
        e.backward()
        opt.step()
    want = algorithm1_reference(x0, grad, 3.0, 0.9, 7, bound=100)
    np.testing.assert_allclose(x.detach().numpy(), want, rtol=1e-10, atol=1e-10)
    assert np.sqrt((x.detach().numpy() ** 2).sum(1)).max() <= 100 + 1e-9


def test_first_step_is_about_eta0_times_gradient_for_small_gradients():
    x = torch.zeros(5, requires_grad=True)
    opt = PreimageSGD([x], lr=0.5)
    x.grad = torch.full((5,), 1e-4)
    opt.step()
    # eta_1 = 1/(1/eta0 + |g|) ~ eta0: the first move is -eta0 * g
    np.testing.assert_allclose(x.detach().numpy(), -0.5e-4, rtol=1e-3)


def test_set_lr_resets_momentum_only_when_the_rate_changes():
    x = torch.zeros(3, requires_grad=True)
    opt = PreimageSGD([x], lr=1.0)
    x.grad = torch.ones(3)
    opt.step()
    mu = opt.state[x]["mu"].clone()
    assert mu.abs().sum() > 0
    opt.set_lr(1.0)
    torch.testing.assert_close(opt.state[x]["mu"], mu)
    opt.set_lr(0.1)
    assert opt.state[x]["mu"].abs().sum() == 0
    assert opt.state[x]["G"].abs().sum() > 0  # the accumulated G stays, as in the authors' code


def test_rejects_bad_hyperparameters():
    x = torch.zeros(1, requires_grad=True)
    with pytest.raises(ValueError):
        PreimageSGD([x], lr=0)
    with pytest.raises(ValueError):
        PreimageSGD([x], lr=1, momentum=1.0)
