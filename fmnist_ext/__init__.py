"""fmnist_ext: fused Conv2d+ReLU+MaxPool2d kernels for PyTorch, and a
Fashion-MNIST training tool built on them.

    import fmnist_ext
    y = fmnist_ext.conv_relu_maxpool2d(x, weight, bias, padding=0, pool=2)
    block = fmnist_ext.FusedConvReLUMaxPool2d(1, 6, 5)

`python -m fmnist_ext.info` tells which kernels are active.
"""
__version__ = "0.1.0"

from . import _library  # noqa: E402  (needs __version__)
from ._library import ReferenceFallbackWarning
from .modules import FusedConvReLUMaxPool2d
from .ops import conv_output_size, conv_relu_maxpool2d, uses_compiled_kernels

__all__ = [
    "FusedConvReLUMaxPool2d",
    "ReferenceFallbackWarning",
    "conv_output_size",
    "conv_relu_maxpool2d",
    "uses_compiled_kernels",
    "kernels_status",
]


def kernels_status() -> dict:
    """What runs where: compiled kernels per device type, torch versions."""
    import torch

    return {
        "compiled_library_loaded": _library.LOADED,
        "not_loaded_reason": _library.NOT_LOADED_REASON,
        "cpu": "compiled" if "cpu" in _library.COMPILED_DEVICE_TYPES else "reference",
        "cuda": "compiled" if "cuda" in _library.COMPILED_DEVICE_TYPES else "reference",
        "cpu_isa": _library.cpu_isa(),
        "built_against_torch": _library.built_torch_version(),
        "running_torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
    }
