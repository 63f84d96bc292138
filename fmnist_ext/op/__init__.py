"""The operator library: the fused Conv2d+ReLU+MaxPool2d op for PyTorch.

This subpackage is self-contained: it imports only torch and itself, never
the Fashion-MNIST application around it (fmnist_ext/*.py), so it can be read,
tested and reused on its own. One file per operator, holding everything
Python adds to it (the function, its fake, Autograd and Autocast kernels):

- ``fused_conv.py`` the fused Conv2d+ReLU+MaxPool2d op (``conv_relu_maxpool2d``);
  ``modules.py`` the same as an nn.Module; ``winners.py`` the gradient
  formulas through the pool winners (jvp, double backward);
  ``reference.py`` its pure-PyTorch definition, and the fallback.
- ``moments.py`` a second, smaller op: per-channel batch moments
  (``channel_moments``), what the FashionCNN's training-mode BatchNorm fold
  needs.

What the ops share: ``_library.py`` loads the compiled kernels (``_C.so``)
or says why the reference runs instead; ``_args.py`` argument checks and
output shapes (mirror csrc/checks.h); ``_dispatch.py`` does a call need
autodiff, the redispatch below Autograd; ``_torch_internals.py`` every
private torch API used; ``_elfcheck.py`` reads the compiled library's
needs for the mismatch diagnosis.
"""

from . import _library
from ._library import ReferenceFallbackWarning, kernels_status
from .fused_conv import conv_relu_maxpool2d, uses_compiled_kernels
from .modules import FusedConvReLUMaxPool2d

if _library.LOADED:
    from . import fused_conv, moments

    fused_conv.register()  # fake, Autograd (backward, double backward, forward AD), Autocast
    moments.register()  # channel_moments' fake and Autograd kernels

__all__ = [
    "FusedConvReLUMaxPool2d",
    "ReferenceFallbackWarning",
    "conv_relu_maxpool2d",
    "kernels_status",
    "uses_compiled_kernels",
]
