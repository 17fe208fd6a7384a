#!/usr/bin/env bash
# The GPU check of `winnow bench throughput` (issue 15): on a machine with an NVIDIA GPU and
# the project's packages importable, the camera case on the CUDA provider at 640x480 and
# 1920x1080, scorer processes 1, 4 and 8, batches 32 and 64 (after the tests marked gpu),
# then the 640x480 case again with an fp16 model (WINNOW_TRAINER_PRECISION=fp16), 1 and 4
# processes at batch 64, and with JPEGs decoded on the GPU by DALI (--decoder dali), 1 and 4.
# JSON and logs go to the folder given (default ./gpu-check). On a 16-core host with one H200
# the 640x480 part took 5 minutes with 12,000 frames; the check took about 12 minutes before
# the DALI run (not yet timed) was added.
#
#   bash scripts/gpu-check.sh [OUT_DIR]
#
# WINNOW_PYTHON picks the interpreter (default: .venv/bin/python, else python3);
# WINNOW_GPU_CHECK_FRAMES="8000 3000" sets the frames per run at the two sizes.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu-check}
mkdir -p "$out"
python=${WINNOW_PYTHON:-}
if [ -z "$python" ]; then
  if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
fi
read -r small large <<<"${WINNOW_GPU_CHECK_FRAMES:-8000 3000}"
if ! command -v nvidia-smi >/dev/null; then
  echo "gpu-check: nvidia-smi not found; this check needs an NVIDIA GPU" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
winnow() { "$python" -c 'import sys; from winnow.cli import main; sys.exit(main(sys.argv[1:]))' "$@"; }
status=0
# the tests that need a GPU (skipped everywhere else): ONNX Runtime on CUDA, and exports
# of a model the trainer keeps on the GPU
"$python" -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$out/gpu-tests.log" \
  || status=1
winnow bench throughput --cases camera --device cuda --frame-size 640x480 \
  --frames "$small" --batch-size 64 --batch-sizes 32,64 --workers 1,4,8 --no-naive \
  --json "$out/throughput-640x480.json" 2>&1 | tee "$out/throughput-640x480.log" || status=1
winnow bench throughput --cases camera --device cuda --frame-size 1920x1080 \
  --frames "$large" --batch-size 64 --batch-sizes 64 --workers 1,4,8 --no-naive \
  --json "$out/throughput-1920x1080.json" 2>&1 | tee "$out/throughput-1920x1080.log" || status=1
winnow bench throughput --cases camera --device cuda --frame-size 640x480 --precision fp16 \
  --frames "$small" --batch-size 64 --batch-sizes 64 --workers 1,4 --no-naive \
  --json "$out/throughput-640x480-fp16.json" 2>&1 | tee "$out/throughput-640x480-fp16.log" || status=1
# the same 640x480 case with JPEG batches decoded on the GPU by NVIDIA DALI
# (WINNOW_SCORER_DECODER=dali; needs winnow-stream[dali])
winnow bench throughput --cases camera --device cuda --frame-size 640x480 --decoder dali \
  --frames "$small" --batch-size 64 --batch-sizes 64 --workers 1,4 --no-naive \
  --json "$out/throughput-640x480-dali.json" 2>&1 | tee "$out/throughput-640x480-dali.log" || status=1
exit $status
