"""alexpipe: AlexNet's 2012 ImageNet recipe, end to end, without being data-bound.

Stages, one module each: prepare (ImageNet -> 256-px WebDataset shards), pca (RGB statistics
for normalization and "fancy PCA" lighting), pipeline + loader (DALI graphs on the GPU and the
PyTorch-facing iterators), model + train (AlexNet and the paper's recipe, DDP), eval (ten-crop
evaluation and prediction), neighbors (the paper's Figure 4, right). dataset.py reads what
prepare wrote; runtime.py says where a process runs. docs/design.md has the map.

    from alexpipe import LoaderOptions, train_loader, eval_loader, Prepared, Runtime
"""

__version__ = "0.2.6"
_LAZY = {"LoaderOptions": "loader", "train_loader": "loader", "eval_loader": "loader", "Prepared": "dataset",
         "Runtime": "runtime"}


def __getattr__(name):  # the loader imports DALI: only on first use, so `import alexpipe` stays light
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'alexpipe' has no attribute {name!r}")
