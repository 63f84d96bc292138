"""The operator library: the fused Conv2d+ReLU+MaxPool2d op for PyTorch.

This subpackage is self-contained: it imports only torch and itself, never
the Fashion-MNIST application around it (fmnist_ext/*.py), so it can be read,
tested and reused on its own. Its files:

- ``_library.py``  loads the compiled kernels (``_C.so``) or says why the
  reference runs instead; the kernels' status.
- ``functional.py`` the op as a function; ``modules.py`` as an nn.Module.
- ``_args.py``     argument checks and output shapes (mirror csrc/checks.h).
- ``_fake.py``, ``_autograd.py`` (+ ``winners.py``), ``_autocast.py``: what
  torch.library wants from Python -- fake kernels, the Autograd kernels
  (backward, double backward, forward AD), the Autocast kernels;
  ``_dispatch.py`` what the ops' Autograd kernels share (does a call need
  autodiff; the redispatch below Autograd).
- ``reference.py`` the pure-PyTorch definition, and the fallback.
- ``moments.py``   a second, smaller op: per-channel batch moments
  (``channel_moments``), what the FashionCNN's training-mode BatchNorm fold
  needs; its fake and Autograd kernels are registered here too.
"""

from . import _library
from ._library import ReferenceFallbackWarning, kernels_status
from .functional import conv_relu_maxpool2d, uses_compiled_kernels
from .modules import FusedConvReLUMaxPool2d

if _library.LOADED:
    from . import _autocast, _autograd, _fake, moments

    _fake.register()
    _autograd.register()  # backward, double backward, forward-mode AD (_autograd.py)
    _autocast.register()  # mixed precision under torch.autocast (_autocast.py)
    moments.register()  # channel_moments' fake and Autograd kernels (moments.py)

__all__ = [
    "FusedConvReLUMaxPool2d",
    "ReferenceFallbackWarning",
    "conv_relu_maxpool2d",
    "kernels_status",
    "uses_compiled_kernels",
]
