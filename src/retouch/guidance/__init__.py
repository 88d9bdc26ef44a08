"""Guidance: denoisers that wrap a conditional denoiser and combine its branches.

CFG (:class:`CFGDenoiser`), per-step unconditional embeddings (:class:`NullTextGuidance`),
two-condition guidance (:class:`DualGuidance`, InstructPix2Pix), :class:`CFGPlusPlus` (renoises
with the unconditional noise: returns a :class:`~retouch.denoiser.Prediction`) and
:class:`LossGuidance` (the gradient of an energy on the model's estimate). Each says the row
blocks of its model call in ``halves``, which attention control reads as the batch layout.
"""

from retouch.guidance.cfg import (
    CFGDenoiser,
    DualGuidance,
    NullTextGuidance,
    as_kwargs,
    batch_tree,
    combine,
    expand_tree,
)
from retouch.guidance.cfgpp import CFGPlusPlus
from retouch.guidance.loss import LossGuidance

__all__ = ["CFGDenoiser", "NullTextGuidance", "DualGuidance", "CFGPlusPlus", "LossGuidance",
           "combine", "batch_tree", "expand_tree", "as_kwargs"]
