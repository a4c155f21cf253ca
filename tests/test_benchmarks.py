"""The benchmark suite runs end to end (a smoke run; speed itself is never asserted in tests)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_smoke_run_writes_complete_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--only", "hog", "--out",
                        str(out)], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["complete"] is True
    case = data["cases"][0]
    assert case["engine_s_per_img_iter"] > 0 and case["bare_s_per_img_iter"] > 0
    assert case["peak_memory_mb"] > 0
    assert data["peak_gflops"]["fp32"] > 0 and data["peak_gflops"]["bf16"] > 0
    assert len(data["targets"]) == 5
