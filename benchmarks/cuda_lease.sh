#!/usr/bin/env bash
# What one GPU lease runs (issue 5): the CUDA tests, the first-convolution comparison and the
# benchmark suite, with the machine's own python3 (torch with CUDA) and this checkout on the path.
# Usage: bash benchmarks/cuda_lease.sh OUTDIR PART   (PART: tests | a | b | throughput | graphs)
set -u
out=${1:?output folder}; part=${2:?part}
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
case $part in
tests)
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'python', sys.version.split()[0])"
  python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_engine.py -k "cuda or record" -rs 2>&1 | tee "$out/pytest-cuda.log"
  python3 benchmarks/first_conv.py --device cuda --batch 16,128 --json > "$out/first_conv-cuda.jsonl" ;;
a) python3 benchmarks/run.py --device cuda --compile --full --in-process --only hog,hogb,dsift,squeezenet,alexnet \
     --out "$out/cuda-a.json" ;;
b) python3 benchmarks/run.py --device cuda --compile --full --in-process --only vgg-m,vgg-vd-16 --out "$out/cuda-b.json" ;;
throughput)
  python3 benchmarks/run.py --device cuda --compile --full --in-process --only squeezenet,alexnet,vgg-vd-16 \
     --precision bf16 --batch 128 --out "$out/cuda-throughput.json" ;;
graphs)  # the CUDA-graph step (preimage.graphs) against Python launching every step, bf16, batch 1 and 16
  for g in graph no-graph; do
    python3 benchmarks/run.py --device cuda --compile --full --in-process --$g --precision bf16 --batch 1,16 \
      --only ${ONLY:-hog,hogb,dsift,squeezenet,alexnet,vgg-vd-16} --sizes 160 --out "$out/cuda-$g.json"
  done ;;
esac
