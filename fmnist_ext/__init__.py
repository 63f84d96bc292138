"""fmnist_ext: fused Conv2d+ReLU+MaxPool2d kernels for PyTorch, and a
Fashion-MNIST training tool built on them.

    import fmnist_ext
    y = fmnist_ext.conv_relu_maxpool2d(x, weight, bias, padding=0, pool=2)
    block = fmnist_ext.FusedConvReLUMaxPool2d(1, 6, 5)

Two layers: ``fmnist_ext.op`` is the operator library (it never imports the
app); the other modules here are the Fashion-MNIST application (data, model,
training, evaluation, benchmark, CLIs). `python -m fmnist_ext.info` tells
which kernels are active.
"""

__version__ = "0.1.0"  # the one place; pyproject.toml reads it from here

from .op import (
    FusedConvReLUMaxPool2d,
    ReferenceFallbackWarning,
    conv_relu_maxpool2d,
    kernels_status,
    uses_compiled_kernels,
)

__all__ = [
    "FusedConvReLUMaxPool2d",
    "ReferenceFallbackWarning",
    "conv_relu_maxpool2d",
    "kernels_status",
    "uses_compiled_kernels",
]
