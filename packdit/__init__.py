"""packdit: kernels and modules for diffusion transformers on packed batches of images and videos.

Public API:
    pack, unpack, pack_like, PackedSeqs   -- the packed layout (packdit.layout, packdit.patches)
    checks, use_deterministic              -- input validation switch, bitwise-reproducible backward
    varlen_attention, RoPE3D               -- packed (full / spatial / temporal) attention with 3-D RoPE
    modulated_norm, gated_residual,        -- fused adaLN kernels: norm + per-segment modulate, gated
    fused_mlp                                 residual, MLP with GEMM epilogues (modules in packdit.nn)
    DiT, DiTConfig, DiT_models             -- the packed DiT (official-checkpoint compatible, video options),
    DIT_CONFIGS                               its checked configuration and the named configurations
    packdit.packing, packdit.data          -- load-balancing planner, per-rank sampler
    packdit.diffusion, packdit.train       -- flow matching / DDPM objectives and samplers, DDP training
    packdit.reference                      -- pure-PyTorch oracles every kernel is tested against

The ops are those of the dispatcher :mod:`packdit.nn.functional`: each runs its Triton/CUDA kernel where
it can and its PyTorch reference elsewhere (``backend=`` forces one). docs/architecture.md maps the layers.
"""

from packdit._validate import checks
from packdit.determinism import use_deterministic
from packdit.layout import PackedSeqs
from packdit.models import DIT_CONFIGS, DiT, DiT_models, DiTConfig
from packdit.nn.functional import fused_mlp, gated_residual, modulated_norm, varlen_attention
from packdit.patches import pack, pack_like, unpack
from packdit.rope import RoPE3D

__version__ = "0.1.0"

__all__ = ["PackedSeqs", "pack", "pack_like", "unpack", "checks", "use_deterministic", "varlen_attention", "RoPE3D",
           "modulated_norm", "gated_residual", "fused_mlp", "DiT", "DiTConfig", "DiT_models", "DIT_CONFIGS",
           "__version__"]
