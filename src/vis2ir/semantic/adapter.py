"""The semantic cross-attention adapter (docs/design.md §4.2–4.3, §5): image tokens attend to semantic tokens.

One layer computes `x + scale · out(softmax(Q Kᵀ / √d) V)` with `Q = q(LN(x))`,
`K = k(LN(s))`, `V = v(LN(s))` — the original specification's formula when `position="none"`.
With `position="rope"`, Q and K are rotated per head by a 2-D rotary embedding of the FLUX token
ids `(0, row, col)`, so that a token can find the semantic token at its own place.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from vis2ir.config import ConfigError, SemanticConfig

Position = Literal["rope", "none"]

DEFAULT_ROPE_MIN_WAVELENGTH = SemanticConfig.rope_min_wavelength
DEFAULT_ROPE_MAX_WAVELENGTH = SemanticConfig.rope_max_wavelength


def rope_wavelengths(count: int, min_wavelength: float, max_wavelength: float) -> torch.Tensor:
    """`count` wavelengths (in tokens) spaced geometrically from `min_wavelength` to `max_wavelength`.

    One wavelength alone is their geometric mean.
    """
    if not 0 < min_wavelength <= max_wavelength:
        raise ConfigError(
            "model.semantic.rope_min_wavelength: expected 0 < rope_min_wavelength <= rope_max_wavelength, "
            f"got {min_wavelength} and {max_wavelength}")
    lo, hi = math.log(min_wavelength), math.log(max_wavelength)
    if count == 1:
        return torch.tensor([math.exp((lo + hi) / 2)], dtype=torch.float64)
    return torch.exp(torch.linspace(lo, hi, count, dtype=torch.float64))


def rope_angles(ids: torch.Tensor, head_dim: int, min_wavelength: float, max_wavelength: float) -> torch.Tensor:
    """Rotation angles `[N, head_dim / 2]` for ids `[N, 3]`: the first half of the pairs follow the
    row (`ids[:, 1]`), the second half the column (`ids[:, 2]`)."""
    wavelengths = rope_wavelengths(head_dim // 4, min_wavelength, max_wavelength).to(ids.device)
    freqs = 2 * math.pi / wavelengths
    pos = ids.to(torch.float64)
    return torch.cat([pos[:, 1:2] * freqs, pos[:, 2:3] * freqs], dim=-1)


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs `(x[2i], x[2i+1])` of `x [B, H, N, D]` by `angles [N, D/2]`."""
    cos = angles.cos().to(x.dtype)
    sin = angles.sin().to(x.dtype)
    x0, x1 = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)


def _check_ids(ids: torch.Tensor | None, count: int, name: str) -> torch.Tensor:
    if ids is None:
        raise ValueError(f"position='rope' needs `{name}` [{count}, 3] (FLUX ids (0, row, col))")
    if ids.ndim != 2 or ids.shape != (count, 3):
        raise ValueError(f"`{name}` must have shape [{count}, 3] (FLUX ids (0, row, col)), got {list(ids.shape)}")
    return ids


class SemanticCrossAttention(nn.Module):
    """One residual cross-attention layer from image tokens `x` to semantic tokens `s`.

    The scale starts at `scale_init` (0 by default: the layer starts as the identity). Dropout acts
    on the attention weights in training only.
    """

    def __init__(self, dim: int, num_heads: int = 8, dropout: float = 0.0, position: Position = "rope",
                 scale_init: float = 0.0, rope_min_wavelength: float = DEFAULT_ROPE_MIN_WAVELENGTH,
                 rope_max_wavelength: float = DEFAULT_ROPE_MAX_WAVELENGTH):
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"model.semantic.num_heads: expected a divisor of the token width {dim}, "
                              f"got {num_heads}")
        if position not in ("rope", "none"):
            raise ConfigError(f"model.semantic.position: expected 'rope' or 'none', got {position!r}")
        head_dim = dim // num_heads
        if position == "rope" and head_dim % 4:
            raise ConfigError(
                f"model.semantic.num_heads: position 'rope' needs a head dimension divisible by 4, but "
                f"token width {dim} / {num_heads} heads = {head_dim}; choose fewer heads or position 'none'")
        if position == "rope":
            rope_wavelengths(1, rope_min_wavelength, rope_max_wavelength)  # validates the pair
        self.dim, self.num_heads, self.head_dim = dim, num_heads, head_dim
        self.dropout, self.position = dropout, position
        self.rope_min_wavelength, self.rope_max_wavelength = rope_min_wavelength, rope_max_wavelength
        self.norm_x = nn.LayerNorm(dim)
        self.norm_s = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.Linear(dim, dim)
        self.scale = nn.Parameter(torch.tensor(float(scale_init)))

    def extra_repr(self) -> str:
        rope = (f", wavelengths {self.rope_min_wavelength:g}–{self.rope_max_wavelength:g}"
                if self.position == "rope" else "")
        return f"dim={self.dim}, heads={self.num_heads}, position={self.position}{rope}"

    def angles(self, x: torch.Tensor, semantic: torch.Tensor, ids: torch.Tensor | None,
               semantic_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The RoPE angles of the queries and of the keys (one tensor twice when they share ids)."""
        ids = _check_ids(ids, x.shape[1], "ids")
        semantic_ids = _check_ids(ids if semantic_ids is None else semantic_ids, semantic.shape[1], "semantic_ids")
        q_angles = rope_angles(ids, self.head_dim, self.rope_min_wavelength, self.rope_max_wavelength)
        if semantic_ids is ids:
            return q_angles, q_angles
        return q_angles, rope_angles(semantic_ids, self.head_dim, self.rope_min_wavelength, self.rope_max_wavelength)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def forward(self, x: torch.Tensor, semantic: torch.Tensor, ids: torch.Tensor | None = None,
                semantic_ids: torch.Tensor | None = None, return_attention: bool = False, angles=None):
        """`x [B, N, dim]`, `semantic [B, M, dim]`, ids `[N, 3]` / `[M, 3]` (`semantic_ids`
        defaults to `ids`) → `[B, N, dim]`, and the attention `[B, heads, N, M]` (before dropout)
        when `return_attention`. `angles`: the (query, key) RoPE angles of `self.angles`, when the
        caller already has them."""
        q = self._heads(self.to_q(self.norm_x(x)))
        s = self.norm_s(semantic)
        k, v = self._heads(self.to_k(s)), self._heads(self.to_v(s))
        if self.position == "rope":
            q_angles, k_angles = angles or self.angles(x, semantic, ids, semantic_ids)
            q, k = apply_rope(q, q_angles), apply_rope(k, k_angles)
        p = self.dropout if self.training else 0.0
        if return_attention:
            attn = torch.softmax((q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim), dim=-1)
            out = F.dropout(attn, p, training=self.training) @ v
        else:
            attn = None
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        out = x + self.scale * self.to_out(out.transpose(1, 2).flatten(-2))
        return (out, attn) if return_attention else out


class SemanticConditioningAdapter(nn.Module):
    """`num_layers` SemanticCrossAttention layers applied in sequence, all reading the same semantic tokens."""

    def __init__(self, dim: int, num_layers: int = 1, num_heads: int = 8, dropout: float = 0.0,
                 position: Position = "rope", scale_init: float = 0.0,
                 rope_min_wavelength: float = DEFAULT_ROPE_MIN_WAVELENGTH,
                 rope_max_wavelength: float = DEFAULT_ROPE_MAX_WAVELENGTH):
        super().__init__()
        if num_layers < 1:
            raise ConfigError(f"model.semantic.num_layers: expected an integer >= 1, got {num_layers}")
        self.layers = nn.ModuleList(
            SemanticCrossAttention(dim, num_heads, dropout, position, scale_init, rope_min_wavelength,
                                   rope_max_wavelength)
            for _ in range(num_layers))

    @property
    def num_parameters(self) -> int:
        """Number of trainable parameters (16,897 per layer at dim 64)."""
        return sum(p.numel() for p in self.parameters())

    def scales(self) -> list[float]:
        """Each layer's residual scale, for logging."""
        return [float(layer.scale.detach()) for layer in self.layers]

    def forward(self, x: torch.Tensor, semantic: torch.Tensor, ids: torch.Tensor | None = None,
                semantic_ids: torch.Tensor | None = None, return_attention: bool = False):
        """As `SemanticCrossAttention.forward`; with `return_attention`, a list of one attention per layer.
        Every layer has the same ids, head size and wavelengths: their RoPE angles are computed once."""
        first = self.layers[0]
        angles = first.angles(x, semantic, ids, semantic_ids) if first.position == "rope" else None
        maps = []
        for layer in self.layers:
            if return_attention:
                x, attn = layer(x, semantic, ids, semantic_ids, return_attention=True, angles=angles)
                maps.append(attn)
            else:
                x = layer(x, semantic, ids, semantic_ids, angles=angles)
        return (x, maps) if return_attention else x
