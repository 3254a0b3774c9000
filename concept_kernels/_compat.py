"""The one place for the torchvision import trap; import timm through :func:`import_timm`.

Why: the pinned PyPI ``torchvision==0.28.0`` is a CUDA build. Next to a CPU torch its ``_C.so`` cannot
load (it links libtorch_cuda / libcudart), torchvision then still runs
``@torch.library.register_fake("torchvision::nms")`` and dies with
``RuntimeError: operator torchvision::nms does not exist``. timm imports torchvision at import time,
so ``import timm`` fails the same way. Defining the two schemas ourselves, before torchvision is
imported, lets the import succeed; ``torchvision.ops.nms`` then raises when called, which image
classification never does. Where the real extension loads (any matching torch/torchvision pair)
nothing is registered.

Not called at package import: only code that needs timm/torchvision (the training module, tests)
calls it.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import threading

__all__ = ["ensure_torchvision_importable", "import_timm"]

# The FRAGMENT library must stay alive for the whole process: when a torch.library.Library object is
# garbage-collected, its definitions are removed again and the import error comes back.
_TORCHVISION_SHIM = None
_done = False
_lock = threading.Lock()


def ensure_torchvision_importable() -> bool:
    """Make ``import torchvision`` / ``import timm`` work next to a CPU-only torch (idempotent).

    Call it before the first ``import torchvision`` or ``import timm``. It first loads
    torchvision's own ``_C`` (without importing the torchvision package, whose failed import would
    leave half-registered fakes behind); only when that fails does it define stand-in schemas for
    ``torchvision::nms`` and ``torchvision::qnms``. Returns True when it registered the stand-ins.
    """
    global _TORCHVISION_SHIM, _done
    with _lock:
        if _done:
            return False
        _done = True
        if sys.modules.get("torchvision") is not None or _has_op("nms"):
            return False  # already imported (then it worked), or the real ops are registered
        if _load_torchvision_c():
            return False
        import torch

        lib = torch.library.Library("torchvision", "FRAGMENT")
        for name in ("nms", "qnms"):
            if not _has_op(name):
                lib.define(f"{name}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _TORCHVISION_SHIM = lib
        return True


def _load_torchvision_c() -> bool:
    """Load torchvision/_C like torchvision.extension does.

    True when no stand-in is needed (real ops now registered, or torchvision not installed).
    """
    import torch

    spec = importlib.util.find_spec("torchvision")  # locates the package without executing it
    if spec is None or not spec.submodule_search_locations:
        return True  # torchvision not installed: nothing to fix, `import timm` reports it
    for folder in spec.submodule_search_locations:
        finder = importlib.machinery.FileFinder(
            folder, (importlib.machinery.ExtensionFileLoader, importlib.machinery.EXTENSION_SUFFIXES))
        c_spec = finder.find_spec("_C")
        if c_spec is not None:
            try:
                torch.ops.load_library(c_spec.origin)  # torchvision later loads the same file: no-op
            except OSError:
                return False  # e.g. CUDA torchvision next to a CPU torch
            return _has_op("nms")
    return False


def _has_op(name: str) -> bool:
    import torch

    try:
        getattr(torch.ops.torchvision, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def import_timm():
    """Return the ``timm`` module, after :func:`ensure_torchvision_importable`."""
    ensure_torchvision_importable()
    import timm

    return timm
