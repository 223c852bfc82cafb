#!/usr/bin/env bash
# (session helper, not committed) make alexpipe's console scripts work on the GPU machine
export PYTHONPATH=/root/site
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/tmp/pipe.log 2>&1 || {
  echo "pip install failed: $(tail -2 /tmp/pipe.log); using wrappers"
  for m in sample prepare pca train eval; do printf '#!/bin/sh\nexec python3 -m alexpipe.%s "$@"\n' $m > /usr/local/bin/alexpipe-$m; done
  printf '#!/bin/sh\nexec python3 -m alexpipe.loader "$@"\n' > /usr/local/bin/alexpipe-preview
  printf '#!/bin/sh\nexec python3 -c "from alexpipe.eval import predict_main; raise SystemExit(predict_main())" "$@"\n' > /usr/local/bin/alexpipe-predict
  chmod +x /usr/local/bin/alexpipe-*
}
which alexpipe-train; python3 -c "import alexpipe, nvidia.dali, webdataset, tqdm, matplotlib, torch, torchvision; print('imports ok', nvidia.dali.__version__, torch.__version__, torchvision.__version__)"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; nproc
