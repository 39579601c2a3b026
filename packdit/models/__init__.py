"""Models built from packdit's modules: the packed DiT family, its configuration and the named configurations."""

from packdit.models.config import DIT_CONFIGS, DiTConfig
from packdit.models.dit import DiT, DiT_models

__all__ = ["DiT", "DiT_models", "DiTConfig", "DIT_CONFIGS"]
