"""Models built from packdit's modules: the packed DiT family."""

from packdit.models.dit import DiT, DiT_models

__all__ = ["DiT", "DiT_models"]
