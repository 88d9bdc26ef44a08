"""Growing a trained UNet deeper without changing what it computes.

A diffusers ``BasicTransformerBlock`` is three residual branches (self-attention,
cross-attention, feed-forward); with the last linear layer of each zeroed it is the identity.
So a UNet with more transformer layers per attention block (``transformer_layers_per_block``)
starts as exactly the shallower model when it takes that model's weights and its extra blocks
start with zeroed outputs: training then adds capacity where words bind to image regions,
from where the shallower run stopped.
"""

from __future__ import annotations

import re

import torch

__all__ = ["load_grown"]

# transformer_blocks.K of an attention block, and the residual outputs of such a block
_BLOCK = re.compile(r"^(.*\.transformer_blocks\.)(\d+)\.")
_OUTPUTS = ("attn1.to_out.0", "attn2.to_out.0", "ff.net.2")


def load_grown(unet: torch.nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Load ``state`` (a UNet's state dict) into ``unet``, which may have more transformer
    layers per attention block than ``state``'s model; returns the prefixes of the blocks that
    ``state`` lacked, which start as identities. Any other mismatch is refused."""
    own = unet.state_dict()
    clash = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if clash:
        raise ValueError(f"{clash[0]} is {tuple(state[clash[0]].shape)} in the source UNet and "
                         f"{tuple(own[clash[0]].shape)} here: the two UNets differ in more "
                         "than depth; use the source's --unet-width")
    result = unet.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"the source UNet has weights this one lacks "
                         f"({result.unexpected_keys[0]}, ...): only more transformer layers "
                         "per block can be grown; use the source's --unet-width")
    new = sorted({m.group(1) + m.group(2) for k in result.missing_keys
                  if (m := _BLOCK.match(k)) and int(m.group(2)) > 0})
    unexplained = [k for k in result.missing_keys if not any(k.startswith(b + ".") for b in new)]
    if unexplained:
        raise ValueError(f"the source UNet lacks {unexplained[0]}, which is not a new "
                         "transformer layer: the two UNets differ in more than depth")
    modules = dict(unet.named_modules())
    with torch.no_grad():
        for block in new:
            for name in _OUTPUTS:
                linear = modules[f"{block}.{name}"]
                linear.weight.zero_()
                if linear.bias is not None:
                    linear.bias.zero_()
    return new
