#!/usr/bin/env bash
# The main job on a fresh machine: install, pre-train the small ResNet18 if needed (~25 min on
# 2 CPU cores), then run the quick search (minutes). Re-running resumes where it stopped.
#   bash experiments/run_quick.sh [extra flags for experiments.search]
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
if [ -z "${MAXPART_DATA_DIR:-}" ] && [ -d ../shared/data/cifar100 ]; then
  export MAXPART_DATA_DIR="$(cd ../shared/data/cifar100 && pwd)"   # offline copy of CIFAR-100
fi
if [ -n "${MAXPART_DATA_DIR:-}" ]; then
  .venv/bin/pip install -q -e .
else
  .venv/bin/pip install -q -e '.[tfds]'   # TensorFlow prepares CIFAR-100 with tfds once
fi
.venv/bin/python -m experiments.search --config=experiments/configs/search.py:quick \
  --workdir=workdirs/search_quick "$@"
