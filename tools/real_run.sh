#!/usr/bin/env bash
# A short real training run on real ImageNet images: the torchvision AlexNet memorises them.
#   bash tools/real_run.sh JPEG_DIR WORK [REPEAT] [EPOCHS] [alexpipe-train options...]
# JPEG_DIR holds files named <wnid>_*.JPEG (as the optional real-image sample, one per
# class). The train split holds every image REPEAT times (each copy gets its own random
# crops), val each image once, in wnid class folders, so val top-1 is the train accuracy.
# PREPARE="--center-crop --tile 4" prepares the train split in tiles (the same run on them).
set -euo pipefail
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-32}  # the loader's CUDA streams beside the model's
src=$1; work=$2; repeat=${3:-40}; epochs=${4:-25}; shift $(($# < 4 ? $# : 4))
rm -rf "$work"
python3 - "$src" "$work/src" "$repeat" <<'PY'
import os, sys
from pathlib import Path
src, dst, repeat = Path(sys.argv[1]).resolve(), Path(sys.argv[2]), int(sys.argv[3])
for p in sorted(src.glob("*.JPEG")):
    wnid = p.name.split("_")[0]
    for split, copies in (("train", repeat), ("val", 1)):
        (dst / split / wnid).mkdir(parents=True, exist_ok=True)
        for r in range(copies):
            os.symlink(p, dst / split / wnid / f"{p.stem}_r{r}.JPEG")
PY
set -x
alexpipe-prepare "$work/src" "$work/out" --shard-size 2000 ${PREPARE:-}
alexpipe-pca "$work/out"
alexpipe-preview "$work/out" --png "$work/preview.png"
alexpipe-train "$work/out" --arch torchvision --epochs "$epochs" --batch-size 256 --run-dir "$work/run" "$@"
alexpipe-eval "$work/run/checkpoint.pt" "$work/out" --json "$work/run/eval.json"
# the paper's Figure 4, right: each val image, itself (distance 0), then its nearest others
alexpipe-neighbors "$work/run/checkpoint.pt" "$work/out" --query val --pool val
