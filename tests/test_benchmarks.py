"""The benchmark suite runs end to end (a smoke run; speed itself is never asserted in tests)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import benchmark_module

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("where", [[], ["--in-process"]], ids=["subprocess", "in-process"])
def test_benchmark_smoke_run_writes_complete_json(tmp_path: Path, where: list[str]) -> None:
    out = tmp_path / "bench.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--only", "hog", "--out",
                        str(out), *where], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["complete"] is True
    case = data["cases"][0]
    assert case["engine_s_per_img_iter"] > 0 and case["bare_s_per_img_iter"] > 0
    assert case["peak_memory_mb"] > 0
    assert case["quadratic"] is False  # HOG is not affine: the engine ran Φ
    assert case["memory_measure"] == ("ru_maxrss_process" if where else "ru_maxrss")
    assert case["inversions_per_s"] == pytest.approx(1 / case["full_inversion_s_per_img"])
    assert data["peak_gflops"]["fp32"] > 0 and data["peak_gflops"]["bf16"] > 0
    for precision, figures in data["peak_kernels"].items():  # the peak is the better kernel's
        assert set(figures) == {"matmul", "conv3x3"} and data["peak_gflops"][precision] == max(figures.values())
    assert len(data["targets"]) == 5


def _round(engine: float, bare: float, ratio: float, full: float = 1.0) -> dict:
    return {"id": "alexnet/conv3@227:fp32:b16", "precision": "fp32", "estimated": True, "gflop_per_img_iter": 2.0,
            "engine_s_per_img_iter": engine, "bare_s_per_img_iter": bare, "ratio_engine_bare": ratio,
            "full_inversion_s_per_img": full, "peak_memory_mb": 100.0 + engine, "wall_s": 1.0}


def test_rounds_merge_into_medians() -> None:
    """--rounds: the engine and bare times are the medians over the rounds that did not fail,
    the ratio the median of each round's own ratio, derived figures recomputed from the medians;
    a case that failed in every round keeps its error."""
    bench = benchmark_module()
    failed = {"id": "alexnet/conv3@227:fp32:b16", "precision": "fp32", "error": "killed"}
    rounds = [_round(3.0, 2.0, 1.5), failed, _round(1.0, 4.0, 0.25), _round(2.0, 1.0, 2.0)]
    merged = bench.merge_rounds(rounds)
    assert (merged["engine_s_per_img_iter"], merged["bare_s_per_img_iter"]) == (2.0, 2.0)
    assert merged["ratio_engine_bare"] == 1.5  # not median engine / median bare (1.0)
    assert merged["full_inversion_s_per_img"] == bench.FULL_ITERATIONS * 2.0  # estimated from the step
    assert merged["inversions_per_s"] == pytest.approx(1 / (bench.FULL_ITERATIONS * 2.0))
    assert (merged["gflops_engine"], merged["gflops_bare"]) == (1.0, 1.0)
    assert merged["peak_memory_mb"] == 103.0 and merged["wall_s"] == 3.0
    assert [r["engine_s_per_img_iter"] for r in merged["rounds"]] == [3.0, 1.0, 2.0]
    assert merged["rounds_failed"] == 1 and "error" not in merged
    measured = [dict(r, estimated=False, full_inversion_s_per_img=f) for r, f in zip(rounds[::2], (5.0, 7.0))]
    assert bench.merge_rounds(measured)["full_inversion_s_per_img"] == 6.0  # measured: the median
    assert bench.merge_rounds([failed, failed]) == {**failed, "rounds_failed": 2}


def test_benchmark_rounds_report_every_round(tmp_path: Path) -> None:
    """A two-round run: every case keeps both rounds, and each target its verdict per round."""
    out = tmp_path / "bench.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--only", "hog", "--rounds",
                        "2", "--in-process", "--peak-size", "256", "--out", str(out)],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["complete"] is True and data["rounds_done"] == 2
    for case in data["cases"]:
        assert len(case["rounds"]) == 2 and case["rounds_failed"] == 0
        assert min(x["engine_s_per_img_iter"] for x in case["rounds"]) <= case["engine_s_per_img_iter"] \
            <= max(x["engine_s_per_img_iter"] for x in case["rounds"])
    assert [[t["id"] for t in round_] for round_ in data["targets_by_round"]] == [[t["id"] for t in data["targets"]]] * 2
    assert "medians of 2 rounds" in r.stdout
