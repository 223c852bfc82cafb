#!/usr/bin/env bash
# The multi-GPU paths on a real machine, on the embedded sample: alexpipe-train under
# torchrun with N >= 2 GPUs (NCCL), then alexpipe-eval (center and ten-crop) on 1 and on N
# GPUs with a batch that divides neither the val set nor N; the two must count every val
# image once and agree on the errors.
#   bash tools/check_ddp.sh [N] [DIR]        (default N: all visible GPUs, DIR: ddp-check/)
set -euo pipefail
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-32}  # the loader's CUDA streams beside the model's
n=${1:-$(python3 -c "import torch; print(torch.cuda.device_count())")}
dir=${2:-ddp-check}
if [ "$n" -lt 2 ]; then echo "check_ddp: needs N >= 2 GPUs, got $n" >&2; exit 2; fi
if [ -e "$dir" ] && [ ! -f "$dir/out/manifest.json" ]; then
    echo "check_ddp: $dir exists and is not an earlier check's directory; pass another DIR" >&2; exit 2
fi
rm -rf "$dir"
set -x
alexpipe-sample "$dir/src" --names shape --val-per-class 37
alexpipe-prepare "$dir/src" "$dir/out" --shard-size 64
alexpipe-pca "$dir/out"
torchrun --standalone --nproc_per_node "$n" -m alexpipe.train "$dir/out" --arch torchvision --epochs 10 \
    --batch-size 32 --lr 0.1 --warmup-epochs 2 --log-every 5 --run-dir "$dir/run"
alexpipe-eval "$dir/run/checkpoint.pt" "$dir/out" --crops both --batch-size 30 --json "$dir/eval-1gpu.json"
torchrun --standalone --nproc_per_node "$n" -m alexpipe.eval "$dir/run/checkpoint.pt" "$dir/out" --crops both \
    --batch-size 30 --json "$dir/eval-${n}gpu.json"
python3 - "$dir/eval-1gpu.json" "$dir/eval-${n}gpu.json" <<'PY'
import json, sys
a, b = (json.load(open(p))["results"] for p in sys.argv[1:])
for mode in a:
    print(f"{mode}: 1 GPU {a[mode]['count']} images, top-1 err {a[mode]['top1_err']:.4f}; "
          f"N GPUs {b[mode]['count']} images, top-1 err {b[mode]['top1_err']:.4f}")
    assert a[mode]["count"] == b[mode]["count"], "counts differ"
    assert abs(a[mode]["top1_err"] - b[mode]["top1_err"]) < 1e-9 and abs(a[mode]["top5_err"] - b[mode]["top5_err"]) < 1e-9
print("same counts and errors on 1 and N GPUs")
PY
