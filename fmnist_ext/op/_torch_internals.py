"""Every private torch API fmnist_ext uses, and nowhere else (a test greps the
package for `torch._`-style names outside this file).

Each entry is here because no public API does its job on every supported torch
(2.11 and newer); its comment names the public API that would replace it. A
torch release that moves one of them breaks this file only.
"""

from __future__ import annotations

import contextlib

import torch
import torch.autograd.forward_ad as fwAD

# --- Forward-mode AD for a custom op -------------------------------------------
# torch.library.register_autograd is reverse mode only (up to 2.15): under
# forward-mode AD or torch.func.jvp/jacfwd an op registered that way drops the
# tangent. So the ops register their own Autograd kernel, an
# autograd.Function with backward and jvp, and need to read the AD state that
# the public API does not expose. A public forward-mode registration in
# torch.library would replace all of this section.


def functorch_active() -> bool:
    """Whether a torch.func transform (grad, vmap, jvp, ...) is active."""
    return torch._C._are_functorch_transforms_active()


def fwd_grad_enabled() -> bool:
    return torch._C._is_fwd_grad_enabled()


def set_fwd_grad_enabled(mode: bool):
    """Context manager (the forward-mode twin of torch.set_grad_enabled)."""
    return fwAD._set_fwd_grad_enabled(mode)


def in_dual_level() -> bool:
    """Whether some forward-AD level (forward_ad.dual_level, torch.func.jvp)
    is open: outside one no tensor has a tangent."""
    return fwAD._current_level >= 0


# The ops' Autograd kernels run after torch.func has unwrapped the tensors for
# its current level, so their autograd.Function must be applied for that level
# alone. That is torch.func's own "single-level" Function, the base class of
# torch.autograd.Function. From torch 2.14, applying any torch.autograd.Function
# subclass under a transform goes back through torch.func (custom_function_call),
# which has no Autograd-key kernel and fails; a direct subclass of the base
# class is applied as it is (torch.func's own generated Functions are such
# subclasses), on every supported torch.
SingleLevelFunction = torch.autograd.function._SingleLevelFunction


def apply_single_level(fn: type, *args):
    """fn.apply(*args) for a SingleLevelFunction subclass, also under torch.func."""
    if not functorch_active():
        return fn.apply(*args)
    from torch._functorch.utils import enable_single_level_autograd_function

    with enable_single_level_autograd_function():
        return fn.apply(*args)


# --- Global module hooks ------------------------------------------------------------
# nn.modules.module.register_module_forward_hook and its siblings register
# hooks for every module; torch has no public way to ask whether any is
# registered. The training-mode BatchNorm fold (bn_fold.py) bypasses the
# modules' calls, so it must know, and runs the layers when there are any.


def global_module_hooks() -> bool:
    """Whether any global module hook (forward, forward pre, backward,
    backward pre) is registered."""
    from torch.nn.modules import module

    names = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks")
    names += ("_global_backward_pre_hooks",)
    return any(getattr(module, name, True) for name in names)  # unknown: assume hooks (the layers run)


# --- Redispatch below Autograd --------------------------------------------------
# An Autograd kernel registered with with_keyset=True calls the next kernel
# down (CPU, CUDA, Fake, Functionalize...) without recording a graph. The
# public route, torch.library.register_autograd, does this internally but is
# reverse mode only (see above).


def below_autograd(op, keyset, *args):
    """Run `op` on the dispatch keys after Autograd (no graph recorded)."""
    with torch._C._AutoDispatchBelowAutograd():
        return op.redispatch(keyset & torch._C._after_autograd_keyset, *args)


def without_autograd(op, *args):
    """Call `op` with the Autograd keys excluded (its Autograd kernel skipped, no
    graph recorded; every other key, Python modes included, as usual)."""
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


# --- Autocast -------------------------------------------------------------------
# The op returns the autocast dtype like the stock conv2d it replaces. The
# public torch.library.register_autocast casts inputs but returns float32, so
# the op keeps its own Autocast kernel, which must step past its own key.


def autocast_key(device_type: str) -> str:
    """The Autocast dispatch key name for a device type ("AutocastCPU")."""
    return "Autocast" + torch._C._dispatch_key_for_device(device_type)


def excluding_key(key: str):
    """Context manager: dispatch skips `key` (the Autocast kernel's own)."""
    return torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key)))


# --- torch.compile caches (benchmark) ------------------------------------------
# A cold compile time needs inductor's FX-graph cache and AOTAutograd's cache
# off. Their public switches are environment variables read once at import
# (TORCHINDUCTOR_FX_GRAPH_CACHE, TORCHINDUCTOR_AUTOGRAD_CACHE): too late once
# torch._inductor is imported, so the config modules are set directly.


def disable_compile_caches() -> dict:
    """Turn the two caches off; returns the settings changed."""
    settings = {}
    with contextlib.suppress(ImportError):
        import torch._functorch.config as functorch_config
        import torch._inductor.config as inductor_config

        for mod, name in ((inductor_config, "fx_graph_cache"), (functorch_config, "enable_autograd_cache")):
            if hasattr(mod, name):
                setattr(mod, name, False)
                settings[name] = False
    return settings


def default_inductor_cache_dir() -> str | None:
    """Inductor's default cache folder (importing torch._dynamo sets
    TORCHINDUCTOR_CACHE_DIR to it), or None where this torch hides it."""
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        return default_cache_dir()
    except Exception:
        return None
