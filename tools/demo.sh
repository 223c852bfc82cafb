#!/usr/bin/env bash
# The main job end to end on the embedded synthetic sample, on CPU or GPU:
#   bash tools/demo.sh [DIR]          (default DIR: demo/)
# Each stage is the console script a user runs on real ImageNet; only sizes differ.
set -euo pipefail
dir=${1:-demo}
rm -rf "$dir"
set -x
alexpipe-sample "$dir/src"
alexpipe-prepare "$dir/src" "$dir/out" --shard-size 64
alexpipe-prepare --verify "$dir/out"
