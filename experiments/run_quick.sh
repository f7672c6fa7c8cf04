#!/usr/bin/env bash
# The main job on a fresh machine: install, then run the quick search (a few minutes on 2 CPU
# cores) with the quarter-width ResNet18 shipped in pretrained/cpu_resnet18: by default the
# solver (search.py:quick_solver, in workdirs/search_quick_solver). Re-running resumes where it
# stopped, or prints the finished result.
#   bash experiments/run_quick.sh [--ga | --defended] [--retrain] [extra flags for experiments.search]
# --ga runs the paper's GA instead (search.py:quick, 32 fine-tuned candidates) in
# workdirs/search_quick.
# --defended runs the defended quick search instead (search.py:quick_defended, about 20 min:
# the search with a defense stack's costs, then its finalist fine-tuned with the defenses and
# attacked by a retrained decoder) in workdirs/search_quick_defended.
# --retrain pre-trains the model again first (~25-50 min on 2 CPU cores) into
# workdirs/cpu_resnet18 and searches with that one (in workdirs/search_quick_retrained).
set -euo pipefail
cd "$(dirname "$0")/.."
variant=quick_solver model=() workdir=workdirs/search_quick_solver
if [ "${1:-}" = "--ga" ]; then
  shift
  variant=quick workdir=workdirs/search_quick
elif [ "${1:-}" = "--defended" ]; then
  shift
  variant=quick_defended workdir=workdirs/search_quick_defended
fi
if [ "${1:-}" = "--retrain" ]; then
  shift
  model=(--config.model_dir=workdirs/cpu_resnet18/model) workdir=${workdir}_retrained
fi
python3 -m venv .venv
if [ -z "${MAXPART_DATA_DIR:-}" ] && [ -d ../shared/data/cifar100 ]; then
  export MAXPART_DATA_DIR="$(cd ../shared/data/cifar100 && pwd)"   # offline copy of CIFAR-100
fi
if [ -n "${MAXPART_DATA_DIR:-}" ]; then
  .venv/bin/pip install -q -c constraints.txt -e .   # the versions of results/ (README)
else
  # TensorFlow prepares CIFAR-100 with tfds once; it pins its own numpy, so the versions in
  # constraints.txt are not forced here.
  .venv/bin/pip install -q -e '.[tfds]'
fi
.venv/bin/python -m experiments.search --config=experiments/configs/search.py:$variant \
  --workdir="$workdir" "${model[@]}" "$@"
