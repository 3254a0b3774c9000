from .api import channel_attention  # noqa: F401
