"""alexpipe: AlexNet's 2012 ImageNet recipe, end to end, without being data-bound.

Stages, one module each: prepare (ImageNet -> 256-px WebDataset shards), pca (RGB
statistics for normalization and "fancy PCA" lighting), pipeline + loader (DALI graphs on
the GPU and the PyTorch-facing iterators), model + train (AlexNet and the paper's recipe,
DDP), eval (ten-crop evaluation and prediction).
"""

__version__ = "0.2.0"
