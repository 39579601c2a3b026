"""The initialisation official DiT's ``initialize_weights`` guarantees (facebookresearch/DiT ``models.py``),
asserted as properties of the weights, so that a gap shared by ``official_init`` and a transcription of it
cannot hide:

* every Linear: xavier-uniform weight, zero bias (``_basic_init``), except
* the timestep MLP's two weights: N(0, 0.02); the label table: N(0, 0.02);
* the adaLN modulation Linears of every block and of the final layer, and the final Linear: all zero;
* the patch embedding: xavier-uniform of the conv weight flattened to ``(D, C*prod(patch))``, zero bias;
* ``pos_embed``: the fixed 2-D sin-cos table.

Width 256 with 4 channels and 2x2 patches makes the patch conv's xavier bound (0.149) far from PyTorch's
default conv bound (0.25), so a conv left at its default init fails the bound check.
"""

import math

import pytest
import torch

import packdit
from packdit import reference
from packdit.official import grid_pos_embed

WIDE = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=256, depth=2, num_heads=4, num_classes=300)


def _assert_xavier_uniform(weight: torch.Tensor, name: str) -> None:
    matrix = weight.detach().flatten(1)
    bound = math.sqrt(6.0 / (matrix.shape[0] + matrix.shape[1]))
    peak, std = matrix.abs().max().item(), matrix.std().item()
    assert 0.9 * bound <= peak <= bound, f"{name}: max |w| {peak:.4f}, xavier-uniform bound {bound:.4f}"
    assert abs(std - bound / math.sqrt(3)) <= 0.1 * bound / math.sqrt(3), f"{name}: std {std:.4f} not uniform"


def _assert_normal(weight: torch.Tensor, std: float, name: str) -> None:
    values = weight.detach()
    assert abs(values.std().item() - std) <= 0.1 * std and abs(values.mean().item()) <= 0.1 * std, name


@pytest.mark.parametrize("build", [
    lambda: reference.DiT(**WIDE),
    lambda: packdit.DiT(**WIDE),
    lambda: packdit.DiT(**{**WIDE, "patch_size": (1, 2, 2)}),
    lambda: packdit.DiT(**{**WIDE, "patch_size": (1, 2, 2), "cond": "text", "text_dim": 32,
                           "pos_embed": "rope3d"}),
], ids=["reference", "packdit", "packdit-conv3d", "packdit-text-rope"])
def test_initialisation_has_the_official_properties(build):
    torch.manual_seed(0)
    model = build()
    zeroed = {id(layer) for block in model.blocks for layer in [block.adaLN_modulation[-1]]}
    zeroed |= {id(model.final_layer.adaLN_modulation[-1]), id(model.final_layer.linear)}
    timestep = {id(model.t_embedder.mlp[0]), id(model.t_embedder.mlp[2])}
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) > 4 * len(model.blocks)
    for name, linear in linears:
        if id(linear) in zeroed:
            assert not linear.weight.any(), name
        elif id(linear) in timestep:
            _assert_normal(linear.weight, 0.02, name)
        else:
            _assert_xavier_uniform(linear.weight, name)
        assert linear.bias is None or not linear.bias.any(), f"{name}.bias"
    proj = model.x_embedder.proj
    _assert_xavier_uniform(proj.weight, "x_embedder.proj.weight")
    assert not proj.bias.any(), "x_embedder.proj.bias: the official init zeroes it"
    if hasattr(model, "y_embedder"):
        _assert_normal(model.y_embedder.embedding_table.weight, 0.02, "y_embedder.embedding_table")
    if hasattr(model, "pos_embed"):
        table = grid_pos_embed(WIDE["hidden_size"], *model.x_embedder.grid_size)
        assert (model.pos_embed[0].double() - table).abs().max() <= 1e-7
