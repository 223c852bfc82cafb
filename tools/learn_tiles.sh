#!/usr/bin/env bash
# Does a net learn from tiles as it does from the squares they hold? The package's shape
# sample prepared with --center-crop and with --center-crop --tile 4, torchvision's AlexNet
# trained the same way on each (on a GPU if one is visible, else the CPU), then both val errors.
#   bash tools/learn_tiles.sh WORK [EPOCHS] [alexpipe-train options...]
set -euo pipefail
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-32}  # the loader's CUDA streams beside the model's
work=$1; epochs=${2:-10}; shift $(($# < 2 ? $# : 2))
rm -rf "$work"
alexpipe-sample "$work/src" --names shape --classes 6 --train-per-class 80 --val-per-class 20
for tile in 1 4; do
    alexpipe-prepare "$work/src" "$work/tile$tile" --center-crop --tile $tile --shard-size 32
    alexpipe-pca "$work/tile$tile"
    alexpipe-train "$work/tile$tile" --arch torchvision --epochs "$epochs" --batch-size 16 --lr 0.05 \
        --warmup-epochs 2 --run-dir "$work/run$tile" "$@"
    alexpipe-eval "$work/run$tile/checkpoint.pt" "$work/tile$tile" --crops center --json "$work/run$tile/eval.json"
done
python3 - "$work" <<'PY'
import json, sys
from pathlib import Path
for tile in (1, 4):
    r = json.loads((Path(sys.argv[1]) / f"run{tile}" / "eval.json").read_text())["results"]["center"]
    print(f"tiles of {tile}: val top-1 error {r['top1_err']:.3f} over {r['count']} images")
PY
