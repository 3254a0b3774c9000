from .api import position_attention  # noqa: F401
