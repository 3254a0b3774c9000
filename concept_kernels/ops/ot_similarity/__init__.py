from .api import ot_similarity  # noqa: F401
