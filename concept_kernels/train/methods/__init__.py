"""Fine-tuning methods, one small file each, registered by name (``base.register``); ``METHODS`` lists them
in registration order (the CLI's ``--method`` choices, the accuracy harness's methods). The interface:
:class:`base.Method`."""
from __future__ import annotations

# isort: off  (import order = registration order = METHODS order; the accuracy harness sorts by it)
from . import concept, vanilla, linear, bituning, surgical  # noqa: F401
from . import l2sp, bss, stochnorm, wiseft  # noqa: F401
from . import counterfactual, levi  # noqa: F401
from . import feature_distill, l1sp, aft  # noqa: F401
from . import lpft, autorgn  # noqa: F401
from . import delta, cotuning  # noqa: F401
# isort: on
from .base import REGISTRY, Method, create_method, register

METHODS = tuple(REGISTRY)

__all__ = ["METHODS", "REGISTRY", "Method", "create_method", "register"]
