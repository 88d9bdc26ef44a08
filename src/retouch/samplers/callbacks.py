"""Per-step callbacks the recipes share (each ``callback(ctx) -> new x or None``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor

from retouch.samplers.state import StepContext

__all__ = ["pin_row"]


def pin_row(trajectory: Sequence[Tensor] | Tensor, row: int = 0) -> Callable[[StepContext], Tensor]:
    """After step ``i``, row ``row`` of the latents is ``trajectory[i + 1]`` (a latent per grid
    time): a generated source kept on its own path, or a real image on its inversion."""

    def pin(ctx: StepContext) -> Tensor:
        x = ctx.x.clone()
        x[row] = trajectory[ctx.i + 1].reshape(x.shape[1:]).to(x)
        return x

    return pin
