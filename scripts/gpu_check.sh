#!/usr/bin/env bash
# The GPU checks and benchmarks, in one call (run on a lent GPU machine from the repo root):
#   bash scripts/gpu_check.sh [engine] [engine-warmup] [ssl] [ssl-memory]
# The machine has torch but not sam2 & co.: they travel as wheels in .whl/ (see README, "GPU check").
# Results are copied to $OUT (when set) and left in benchmarks/results/.
set -uo pipefail
parts=("${@:-engine}")
configs="${SSS_GPU_CONFIGS:-tiny512,tiny1024,large1024}"  # the engine parts' models
export PYTHONUNBUFFERED=1 SSS_HOME=/tmp/sss_home
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, sam2; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
status=0
started=$(mktemp)
python3 -m pytest -q -p no:cacheprovider tests/test_device.py || status=1
for part in "${parts[@]}"; do
  case "$part" in
    engine) python3 benchmarks/bench_engine.py --device cuda --configs "$configs" || status=1 ;;
    engine-warmup)
      # each process first runs what `serve --preload` runs (CUDA start-up, graph captures)
      python3 benchmarks/bench_engine.py --device cuda --configs "$configs" --warm-up \
        --name engine_cuda_warmup || status=1 ;;
    ssl)
      # today's defaults; every part semi-supervised training takes (memory path, weak views, DFE to
      # the decoder); supervised with the memory path and the encoder's last blocks (LoRA)
      python3 benchmarks/bench_ssl_gpu.py || status=1
      python3 benchmarks/bench_ssl_gpu.py --all-parts --name ssl_cuda_all_parts || status=1
      python3 benchmarks/bench_ssl_gpu.py --supervised --memory-path --encoder-blocks 2 --encoder-lora-rank 4 \
        --name ssl_cuda_supervised_encoder || status=1 ;;
    ssl-memory)
      # one short SSL run with every part, the memory-path pseudo-labels tracked through CUDA graphs
      python3 benchmarks/bench_ssl_gpu.py --all-parts --name ssl_cuda_all_parts || status=1 ;;
    *) echo "unknown part $part"; status=1 ;;
  esac
done
# only what this call wrote
if [ -n "${OUT:-}" ]; then find benchmarks/results -name '*cuda*.json' -newer "$started" -exec cp {} "$OUT"/ \; ; fi
exit $status
