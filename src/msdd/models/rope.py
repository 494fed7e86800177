"""Rotary position embedding (RoPE) of the MMDiT's joint sequence: 2D for image tokens, a choice of layouts for the
context tokens (SPEC 4), tables cached per grid, and the rotation itself."""

from __future__ import annotations

import torch


def _angles(pos: torch.Tensor, n_freq: int, base: float) -> torch.Tensor:
    """(N,) positions -> (N, n_freq) rotation angles pos * base^(-j/n_freq)."""
    freqs = base ** (-torch.arange(n_freq, dtype=torch.float64) / n_freq)
    return pos.double()[:, None] * freqs[None, :]


def rope_angles(
    grid: int, full_grid: int, num_context: int, head_dim: int, context_pos: str
) -> torch.Tensor:
    """Rotation angles for the joint sequence [image tokens (grid x grid, row-major), context tokens].

    Image tokens use 2D RoPE (half of the rotated pairs for rows, half for columns, base 10000) on the
    positions of the centred `grid` x `grid` crop of the `full_grid` x `full_grid` final-stage grid.
    Context tokens: "none" -> no rotation; "1d" -> token index over all pairs; "cross" -> the position
    (row = grid, column = i) with base 10000 * L / grid on the column axis (SPEC 4); "cross_both" -> the
    same position with that base on both axes (the paper's reference code).
    Returns float64 angles of shape (grid*grid + num_context, head_dim // 2).
    """
    half = head_dim // 2  # rotated pairs
    quarter = half // 2
    offset = (full_grid - grid) / 2
    coords = torch.arange(grid, dtype=torch.float64) + offset
    rows = coords.repeat_interleave(grid)  # (grid*grid,)
    cols = coords.repeat(grid)
    img = torch.cat([_angles(rows, quarter, 10000.0), _angles(cols, quarter, 10000.0)], dim=-1)
    idx = torch.arange(num_context, dtype=torch.float64)
    if context_pos == "none":
        ctx = torch.zeros(num_context, half, dtype=torch.float64)
    elif context_pos == "1d":
        ctx = _angles(idx, half, 10000.0)
    elif context_pos in ("cross", "cross_both"):
        row = torch.full((num_context,), float(grid), dtype=torch.float64)
        col_base = 10000.0 * num_context / grid
        row_base = col_base if context_pos == "cross_both" else 10000.0
        ctx = torch.cat([_angles(row, quarter, row_base), _angles(idx, quarter, col_base)], dim=-1)
    else:
        raise ValueError(f"unknown context_pos {context_pos!r}; expected one of ['none', '1d', 'cross', 'cross_both']")
    return torch.cat([img, ctx], dim=0)


class RopeCache:
    """float32 cos/sin tables per (grid, device), each (N, head_dim) in the rotate-half layout."""

    def __init__(self, full_grid: int, num_context: int, head_dim: int, context_pos: str) -> None:
        self.full_grid, self.num_context = full_grid, num_context
        self.head_dim, self.context_pos = head_dim, context_pos
        self._tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, grid: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.compiler.is_compiling():  # computed in the graph: a table added to the dict while tracing made every
            return self._table(grid, device)  # graph guard on the dict's size, and the next decode recompile them all
        key = (grid, device)
        if key not in self._tables:
            self._tables[key] = self._table(grid, device)
        return self._tables[key]

    def _table(self, grid: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        ang = rope_angles(grid, self.full_grid, self.num_context, self.head_dim, self.context_pos)
        ang = torch.cat([ang, ang], dim=-1)  # (N, head_dim): pair (i, i + head_dim/2) shares an angle
        return ang.cos().float().to(device), ang.sin().float().to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, heads, N, D) by per-token angles; dims i and i + D/2 form a rotated pair."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat([-x2, x1], dim=-1) * sin.to(x.dtype)
