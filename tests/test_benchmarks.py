"""The benchmark suite runs end to end (a smoke run; speed itself is never asserted in tests)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
