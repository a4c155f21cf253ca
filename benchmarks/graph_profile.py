"""Where a recorded CUDA-graph step spends its GPU time, against the eager step (issue 5; GPU only).

At batch 128 in bf16 the recorded step (preimage.graphs) was 8-22 % slower than the eager one on
first layers (benchmarks/README.md, "GPU, second lease").  This runs one case's engine twice,
recorded and eager, profiles ``--iters`` steady-state steps of each with torch.profiler (CUDA
kernels, replays included) and prints the kernels' GPU time per step side by side, with the
step's wall time per step (CUDA events) and the engine's own timing.

    python3 benchmarks/graph_profile.py --case "alexnet/conv1@227:bf16:b128" [--iters 10] [--json OUT]

Without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import Case, case_problem  # noqa: E402

from preimage.engine import Stage, optimize  # noqa: E402
from preimage.defaults import PAPER  # noqa: E402


def profile_case(case: Case, graph: bool, warmup: int, iters: int) -> dict:
    """Kernel GPU time per step (name -> ms) and wall ms per step of ``iters`` steps after ``warmup``."""
    device = torch.device("cuda")
    rep, _, _, loss = case_problem(case, device)
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                              torch.profiler.ProfilerActivity.CPU])
    events: dict[str, torch.cuda.Event] = {}

    def at(t: int, _total: int, _energies: dict) -> None:
        if t == warmup:
            torch.cuda.synchronize()
            events["start"] = torch.cuda.Event(enable_timing=True)
            events["start"].record()
            prof.start()
        elif t == warmup + iters:
            events["end"] = torch.cuda.Event(enable_timing=True)
            events["end"].record()
            torch.cuda.synchronize()
            prof.stop()

    trace = optimize(rep, loss, (case.size, case.size), list(range(case.batch)), PAPER,
                     [Stage(warmup + iters + 1)], device=device, callback=at, callback_every=1,
                     batch_size=case.batch, compile=True, graph=graph)
    kernels: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            kernels[ev.name] += ev.device_time / 1000 / iters  # us -> ms, per step
            counts[ev.name] += 1
    return {"graphed": trace.graphed, "compiled": trace.compiled,
            "step_ms": events["start"].elapsed_time(events["end"]) / iters,
            "kernel_ms": dict(kernels), "kernel_calls": {k: v / iters for k, v in counts.items()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", action="append", required=True, help="case id, as benchmarks/run.py names them")
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--json", type=Path)
    opts = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("graph_profile: no CUDA device; nothing to profile")
        return 0
    results = {}
    for text in opts.case:
        case = Case.parse(text)
        runs = {name: profile_case(case, graph, opts.warmup, opts.iters)
                for name, graph in (("eager", False), ("recorded", True), ("eager2", False))}
        results[text] = runs
        print(f"\n== {text}: step wall ms  eager {runs['eager']['step_ms']:.3f} / {runs['eager2']['step_ms']:.3f}"
              f"  recorded {runs['recorded']['step_ms']:.3f} (graphed {runs['recorded']['graphed']})")
        names = sorted(set(runs["eager"]["kernel_ms"]) | set(runs["recorded"]["kernel_ms"]),
                       key=lambda k: -max(runs["eager"]["kernel_ms"].get(k, 0), runs["recorded"]["kernel_ms"].get(k, 0)))
        total = {k: sum(r["kernel_ms"].values()) for k, r in runs.items()}
        print(f"   kernel sum ms: eager {total['eager']:.3f}  recorded {total['recorded']:.3f}")
        print(f"   {'eager ms':>9} {'calls':>5} {'recorded':>9} {'calls':>5}  kernel")
        for k in names[:25]:
            e, r = runs["eager"], runs["recorded"]
            print(f"   {e['kernel_ms'].get(k, 0):9.4f} {e['kernel_calls'].get(k, 0):5.1f} "
                  f"{r['kernel_ms'].get(k, 0):9.4f} {r['kernel_calls'].get(k, 0):5.1f}  {k[:110]}")
    if opts.json:
        opts.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
