"""packdit: kernels and modules for diffusion transformers on packed batches of images and videos.

Public API:
    pack, unpack, pack_like, PackedSeqs   -- the packed layout (packdit.layout)
    checks, use_deterministic              -- input validation switch, bitwise-reproducible backward
    packdit.reference                      -- pure-PyTorch oracles every kernel is tested against
"""

from packdit._validate import checks
from packdit.determinism import use_deterministic
from packdit.layout import PackedSeqs, pack, pack_like, unpack

__version__ = "0.1.0"

__all__ = ["PackedSeqs", "pack", "pack_like", "unpack", "checks", "use_deterministic", "__version__"]
