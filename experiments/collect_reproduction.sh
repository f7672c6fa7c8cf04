#!/usr/bin/env bash
# Copies the small outputs of a reproduction run (reports, figures, search history; no
# checkpoints or search state) into results/reproduction/<name>/.
#   bash experiments/collect_reproduction.sh workdirs/reproduce_cpu_resnet18 cpu_resnet18
set -euo pipefail
src=$1; name=$2; dst=results/reproduction/$name
mkdir -p "$dst"
cp "$src"/report.md "$src"/report.json "$src"/baselines.json "$src"/*.png "$dst"/
cp "$src"/search/best.json "$src"/search/history.csv "$dst"/
echo "copied $(ls "$dst" | wc -l) files to $dst"
