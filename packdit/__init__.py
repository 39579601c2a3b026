"""packdit: kernels and modules for diffusion transformers on packed batches of images and videos.

Public API:
    pack, unpack, pack_like, PackedSeqs   -- the packed layout (packdit.layout)
    checks, use_deterministic              -- input validation switch, bitwise-reproducible backward
    varlen_attention, RoPE3D               -- packed (full / spatial / temporal) attention with 3-D RoPE
    modulated_norm, gated_residual,        -- fused adaLN kernels: norm + per-segment modulate, gated
    fused_mlp                                 residual, MLP with GEMM epilogues (modules in packdit.nn)
    DiT, DiT_models                        -- the packed DiT (official-checkpoint compatible, video options)
    packdit.packing, packdit.data          -- load-balancing planner, per-rank sampler
    packdit.diffusion, packdit.train       -- flow matching / DDPM objectives and samplers, DDP training
    packdit.reference                      -- pure-PyTorch oracles every kernel is tested against
"""

from packdit._validate import checks
from packdit.determinism import use_deterministic
from packdit.layout import PackedSeqs, pack, pack_like, unpack
from packdit.models import DiT, DiT_models
from packdit.reference.rope import RoPE3D

__version__ = "0.1.0"

# Triton-backed ops, imported on first use so that ``import packdit`` does not import triton.
_LAZY_OPS = {"modulated_norm": "packdit.ops.modulate", "gated_residual": "packdit.ops.gated_residual",
             "fused_mlp": "packdit.ops.mlp", "varlen_attention": "packdit.ops.attention"}


def __getattr__(name: str):
    if name in _LAZY_OPS:
        import importlib

        return getattr(importlib.import_module(_LAZY_OPS[name]), name)
    raise AttributeError(f"module 'packdit' has no attribute {name!r}")


__all__ = ["PackedSeqs", "pack", "pack_like", "unpack", "checks", "use_deterministic", "varlen_attention", "RoPE3D",
           "modulated_norm", "gated_residual", "fused_mlp", "DiT", "DiT_models", "__version__"]
