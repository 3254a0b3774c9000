"""The fused ops. Each op lives in ``ops/<op>/`` with the same files: reference.py (the spec),
api.py (docs, validation, dispatch) and, as they land, the backends' implementations."""
from .channel_attention import channel_attention
from .ot_similarity import ot_similarity
from .position_attention import position_attention

__all__ = ["channel_attention", "ot_similarity", "position_attention"]
