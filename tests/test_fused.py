"""The compiled engine step (preimage.fused), the lean regularizer gradients, the allocator
setting and DSIFT's plain-arithmetic optimization variant (issue 5)."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from preimage import allocator, fused, native
from preimage.defaults import PAPER
from preimage.engine import Stage, optimize
from preimage.objectives import BoundedRange, L2Loss, TotalVariation
from preimage.optim import PreimageSGD
from preimage.representations import make_representation
from preimage.representations.dsift import DSIFT

CONSTANTS = dict(alpha=6.0, B=80.0, B_plus=160.0, V=80 / 6.5, lambda_alpha=1.0, lambda_tv=1.0, rho=0.9)


def eager_steps(x0: torch.Tensor, grads: list[torch.Tensor], lr: float, alpha: float = 6.0) -> tuple[torch.Tensor, list]:
    x = x0.clone().requires_grad_(True)
    bounded, tv = BoundedRange(alpha, 80.0, 160.0), TotalVariation(2.0, 80 / 6.5)
    opt = PreimageSGD([x], lr=lr, momentum=0.9, projection=bounded.project)
    values = []
    for g in grads:
        x.grad = g.clone()
        with torch.no_grad():
            e1, _ = bounded.value_and_grad(x, into=x.grad)
            e2, _ = tv.value_and_grad(x, into=x.grad)
        opt.step()
        values.append((e1, e2))
    return x.detach(), values


@pytest.mark.parametrize("alpha", [6.0, 4.0])
def test_fused_update_is_the_eager_step(alpha: float) -> None:
    """Regularizers + Algorithm 1 + projection written as one function give the eager result."""
    torch.manual_seed(0)
    x0 = torch.randn(2, 3, 17, 21) * 90  # some pixels beyond B+ = 160: the projection acts
    grads = [torch.randn_like(x0) for _ in range(4)]
    ref, ref_values = eager_steps(x0, grads, lr=5.0, alpha=alpha)
    x, G, mu = x0.clone(), torch.zeros_like(x0), torch.zeros_like(x0)
    for g, (e1, e2) in zip(grads, ref_values):
        f1, f2 = fused.fused_update(x, g.clone(), G, mu, lr=torch.tensor(5.0), **(CONSTANTS | {"alpha": alpha}))
        torch.testing.assert_close(f1, e1, rtol=1e-5, atol=0)
        torch.testing.assert_close(f2, e2, rtol=1e-5, atol=0)
    # atol: on this VM one of the two cores sometimes rounds float32 square roots differently
    # (one ulp, every element it computes, in some processes), which 4 steps at lr 5 grow to ~1e-3
    torch.testing.assert_close(x, ref, rtol=1e-5, atol=3e-3)
    assert (x.square().sum(1).sqrt() <= 160 * (1 + 1e-5)).all()


def test_regularizer_gradients_accumulate_in_place() -> None:
    torch.manual_seed(1)
    x = torch.randn(3, 3, 9, 11) * 50
    base = torch.randn_like(x)
    for reg in (BoundedRange(6, 80), TotalVariation(2, 12.0), TotalVariation(1.5, 12.0)):
        values, grad = reg.value_and_grad(x)
        into = base.clone()
        values2, out = reg.value_and_grad(x, into=into, weight=0.25)
        assert out is into
        torch.testing.assert_close(values2, values)
        torch.testing.assert_close(into, base + 0.25 * grad)
        xx = x.clone().requires_grad_(True)
        (ref,) = torch.autograd.grad(reg(xx).sum(), xx)
        torch.testing.assert_close(grad, ref, rtol=1e-4, atol=1e-9)


def _hog_problem() -> tuple[torch.nn.Module, L2Loss]:
    rep = make_representation("hog")
    torch.manual_seed(0)
    x0 = torch.rand(2, 1, 48, 48) * 255 - 128
    with torch.no_grad():
        return rep, L2Loss(rep(x0))


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="torch.compile on CPU needs a C++ compiler")
@pytest.mark.parametrize("kernels", ["native", "inductor"])
def test_engine_compiled_step_matches_eager(kernels: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The compiled kernel really runs (no fallback) and follows the eager trajectory; the
    trajectories drift apart by float rounding only, so compare the first iterations.  On the
    CPU, preimage's C kernels run unless PREIMAGE_NATIVE=0, then torch.compile's."""
    monkeypatch.setenv("PREIMAGE_NATIVE", "1" if kernels == "native" else "0")
    rep, loss = _hog_problem()
    stages = [Stage(4), Stage(2, lr_factor=0.1, jitter=False)]  # a second stage: new lr, no recompilation
    eager = optimize(rep, loss, (48, 48), [0, 1], PAPER, stages, compile=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a compilation failure would warn: fail instead
        compiled = optimize(rep, loss, (48, 48), [0, 1], PAPER, stages, compile=True)
    assert compiled.compiled and not eager.compiled
    assert fused.active()
    for term in ("loss", "bounded_range", "tv", "total"):
        torch.testing.assert_close(compiled.energy[term], eager.energy[term], rtol=2e-3, atol=1e-6)
    torch.testing.assert_close(compiled.x, eager.x, rtol=0, atol=0.5)


def test_compile_failure_falls_back_to_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    """A compiler error costs one warning, never the run: the same result as eager."""
    monkeypatch.setenv("PREIMAGE_NATIVE", "0")  # torch.compile's path (the C kernels' own: test_native.py)
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("no compiler here\nlong traceback")

    monkeypatch.setattr(fused, "_kernels", {fused.fused_update: broken, fused.squared_distance: broken})
    monkeypatch.setattr(fused, "_broken", None)
    rep, loss = _hog_problem()
    eager = optimize(rep, loss, (48, 48), [0, 1], PAPER, [Stage(3)], compile=False)
    with pytest.warns(RuntimeWarning, match="torch.compile failed, running eagerly: RuntimeError: no compiler here$"):
        fallback = optimize(rep, loss, (48, 48), [0, 1], PAPER, [Stage(3)], compile=True)
    assert not fallback.compiled and not fused.active()
    torch.testing.assert_close(fallback.x, eager.x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # once per process only
        optimize(rep, loss, (48, 48), [0, 1], PAPER, [Stage(1)], compile=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format], ids=["channels_last", "nchw"])
@pytest.mark.parametrize("kernels", ["native", "inductor"])
def test_compiled_loss_kernel_is_the_eager_loss(dtype: torch.dtype, layout: torch.memory_format, kernels: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The one-pass loss kernel gives L2Loss.value_and_grad's values and gradient, in the code's
    dtype and memory layout; compiled and uncompiled, C kernel and torch.compile's."""
    monkeypatch.setenv("PREIMAGE_NATIVE", "1" if kernels == "native" else "0")
    torch.manual_seed(3)
    target = torch.randn(3, 16, 9, 7).to(dtype)
    loss = L2Loss(target)
    code = torch.randn(3, 16, 9, 7).to(dtype).contiguous(memory_format=layout)
    eager_values, eager_grad = loss.value_and_grad(code, weight=20.0)
    plain = fused.squared_distance(code, loss._target_like(code), 20.0 / loss.norm2.float())
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no silent fallback
        compiled = loss.value_and_grad(code, weight=20.0, compiled=True)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-3)
    for values, grad in (plain, compiled):
        assert values.dtype == torch.float32 and grad.dtype == dtype
        assert grad.is_contiguous(memory_format=layout) and grad.shape == code.shape
        torch.testing.assert_close(values, eager_values, **tol)
        torch.testing.assert_close(grad.float(), eager_grad.float(), **tol)


def test_engine_takes_any_callable_loss() -> None:
    """A loss without ``value_and_grad`` (a plain function) goes through autograd and gives the
    closed-form path's trajectory."""
    rep, loss = _hog_problem()
    closed = optimize(rep, loss, (48, 48), [0, 1], PAPER, [Stage(5)], compile=False)
    plain = optimize(rep, lambda code: loss(code), (48, 48), [0, 1], PAPER, [Stage(5)], compile=False)
    torch.testing.assert_close(plain.energy["loss"], closed.energy["loss"], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(plain.x, closed.x, rtol=1e-4, atol=1e-3)


def test_process_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fused, "_default", False)
    assert fused.wanted(None) is False and fused.wanted(True) is True
    fused.set_default(True)
    assert fused.wanted(None) is True and fused.wanted(False) is False
    # nothing said: on for the CPU where the C kernels are there, never torch.compile unasked
    monkeypatch.setattr(fused, "_default", None)
    monkeypatch.delenv("PREIMAGE_COMPILE", raising=False)
    assert fused.wanted(None, "cpu") is (native.library(quiet=True) is not None)
    assert fused.wanted(None, "cuda") is False and fused.wanted(None) is False
    monkeypatch.setenv("PREIMAGE_COMPILE", "0")
    assert fused.wanted(None, "cpu") is False
    monkeypatch.setenv("PREIMAGE_COMPILE", "0")
    monkeypatch.setenv("PREIMAGE_COMPILE", "")
    monkeypatch.setenv("PREIMAGE_NATIVE", "0")
    assert fused.wanted(None, "cpu") is False


def test_dsift_optimizes_in_plain_arithmetic() -> None:
    """The engine differentiates DSIFT without VLFeat's rounding: within 1e-2 of 255 of it."""
    rep = DSIFT()
    plain = rep.for_optimization()
    assert plain is not rep and plain.vlfeat_rounding is False and rep.vlfeat_rounding is None
    assert plain.for_optimization() is plain
    torch.manual_seed(0)
    x = torch.rand(2, 1, 40, 40) * 255 - 128
    with torch.no_grad():
        exact, fast = rep(x), plain(x)
    assert 0 < (exact - fast).abs().max().item() < 1e-2
    hog = make_representation("hog")
    assert hog.for_optimization() is hog


def test_allocator_setting_is_applied_once(monkeypatch: pytest.MonkeyPatch) -> None:
    first = allocator.keep_freed_memory()
    assert allocator.keep_freed_memory() is first  # idempotent
    monkeypatch.setattr(allocator, "_done", None)
    monkeypatch.setenv("PREIMAGE_KEEP_MALLOC", "1")
    assert allocator.keep_freed_memory() is False  # the user opted out
    monkeypatch.setattr(allocator, "_done", None)
    monkeypatch.delenv("PREIMAGE_KEEP_MALLOC")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000")
    assert allocator.keep_freed_memory() is False  # the user's own settings win


def test_large_buffers_are_reused_without_page_faults() -> None:
    """With the allocator setting, a 64 MB tensor freed and allocated again reuses the same
    pages (glibc would otherwise map and unmap it every time: 16384 page faults)."""
    import resource

    if not allocator.keep_freed_memory():
        pytest.skip("glibc's mallopt is not available here (or MALLOC_* / PREIMAGE_KEEP_MALLOC is set)")

    def touch() -> None:
        torch.empty(64 << 20, dtype=torch.uint8).fill_(1)

    faults = []
    for _ in range(24):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        touch()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    # the heap settles within the first few reuses: while something allocated after a freed block
    # keeps it from the heap's top, the next block (a little larger, for its alignment) is taken
    # above it, until freed neighbours merge (on this VM 1-7 cycles of 16384 faults, depending on
    # what the process allocated before), then none; without the setting every cycle faults all
    # 16384 pages
    assert max(faults[-8:]) < 2000, faults


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="torch.compile on CPU needs a C++ compiler")
def test_cli_compile_flag(images, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--compile`` reaches the engine (recorded in the sidecar); without it the run is eager."""
    from click.testing import CliRunner

    from preimage.cli import main

    monkeypatch.delenv("PREIMAGE_COMPILE", raising=False)
    default = native.library(quiet=True) is not None  # the CPU default: the C kernels where they build
    for k, (flag, expected) in enumerate([([], default), (["--compile"], True), (["--no-compile"], False)]):
        monkeypatch.setattr(fused, "_default", None)  # as in a fresh process without PREIMAGE_COMPILE
        out = tmp_path / f"out{k}"
        r = CliRunner().invoke(main, ["invert", str(images / "coffee.png"), "--rep", "hog", "--size", "48",
                                      "--iterations", "3", "--fine-iterations", "1", "--out", str(out), *flag],
                               catch_exceptions=False)
        assert r.exit_code == 0, r.output
        side = json.loads((out / "coffee.hog.invert.seed0.json").read_text())
        assert side["config"]["compiled"] is expected


def test_long_commands_compile_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """table4 / table5 / figures turn the compiled step on everywhere unless --no-compile or
    PREIMAGE_COMPILE=0 says otherwise; the short commands leave the engine's default (on for the
    CPU where the C kernels build, off on a GPU)."""
    from preimage import cli

    commands = {name: cli.main.commands[name] for name in ("table4", "table5", "figures", "invert")}
    for name in ("table4", "table5", "figures"):
        assert any("--no-compile" in p.secondary_opts for p in commands[name].params), name
    assert any("--no-compile" in p.secondary_opts for p in commands["invert"].params)
    for env, flag, expected in ((None, None, True), ("0", None, False), ("1", None, True),
                                (None, False, False), ("0", True, True)):
        monkeypatch.setattr(fused, "_default", None)
        if env is None:
            monkeypatch.delenv("PREIMAGE_COMPILE", raising=False)
        else:
            monkeypatch.setenv("PREIMAGE_COMPILE", env)
        assert cli._set_compile_long(None, None, flag) is expected  # type: ignore[arg-type]
        assert fused.wanted(None) is expected and fused.wanted(None, "cuda") is expected
    monkeypatch.setattr(fused, "_default", None)
    monkeypatch.setenv("PREIMAGE_COMPILE", "0")
    assert fused.wanted(None) is False
