#!/usr/bin/env bash
# The main job end to end on the embedded synthetic sample, on a GPU if there is one:
#   bash tools/demo.sh [DIR]          (default DIR: demo/)
# Each stage is the console script a user runs on real ImageNet; only sizes differ. The
# sample's classes are named by shape (4 labels), so a CPU learns them in ~2 minutes.
set -euo pipefail
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-32}  # the loader's CUDA streams beside the model's
dir=${1:-demo}
rm -rf "$dir"
set -x
alexpipe-sample "$dir/src" --names shape
alexpipe-prepare "$dir/src" "$dir/out" --shard-size 64
alexpipe-prepare --verify "$dir/out"
alexpipe-pca "$dir/out"
alexpipe-preview "$dir/out" --png "$dir/preview.png"
alexpipe-train "$dir/out" --arch torchvision --epochs 10 --batch-size 32 --lr 0.1 --warmup-epochs 2 \
    --log-every 5 --run-dir "$dir/run"
alexpipe-eval "$dir/run/checkpoint.pt" "$dir/out" --json "$dir/run/eval.json"
alexpipe-predict "$dir/run/checkpoint.pt" "$dir/src/val/disk_020/"*.JPEG
alexpipe-neighbors "$dir/run/checkpoint.pt" "$dir/out" --query val --pool train --k 5
