"""Inversion: find the start latents (and per-step corrections) that reproduce a given image.

``inv = invert(model, image_or_latent, prompt, method=..., steps=..., cfg=...)`` returns an
:class:`Inversion`; ``reconstruct(inv, model)`` runs the matching sampler and returns the
latent; ``reconstruct(inv, model, target=...)`` also runs a target branch for editing.

=======================  ==========  ======================  ====================================
method                   exact       network calls (invert)  stores
=======================  ==========  ======================  ====================================
``ddim``                 no          N                       trajectory
``null_text``            no          3N + Adam iterations    per-step ∅_k
``negative_prompt``      no          N                       ∅ := source prompt
``edict``                yes         2N                      coupled y_0, mixing p
``bdia``                 yes         N                       coupled x_1, gamma
``direct``               source row  N                       pivot trajectory x*_k
``ddpm_edit_friendly``   yes         N                       per-step noise maps z_k
``renoise``              no          N (1 + K)               trajectory
``rf_solver``            no          2N                      trajectory (2nd-order midpoint)
``fireflow``             no          N + 1                   trajectory (2nd order, reused v)
``rf_inversion``         no          N                       trajectory; pulls to y1 / the image
=======================  ==========  ======================  ====================================

Reconstruction costs N calls (EDICT 2N, BDIA N - 1, RF-Solver 2N, FireFlow N + 1); with CFG
the unconditional and conditional rows go through the network as one batched call, counted
once.
Every method but ``edict`` runs on rectified-flow models too (tested on a tiny SD3 and Flux;
``rf_solver`` and ``fireflow`` are written in the flow view and serve VP models as well);
``edict``'s eps-held steps need alpha > 0, which a flow grid's pure-noise start lacks, so it is
refused there before any work.
In an edit (:func:`reconstruct` with a target) BDIA's target rows take the source row's
backward correction (:class:`BDIAStep`): with their own, a target that leaves the inverted
trajectory runs a leapfrog scheme that never damps the change and diverges.
See :mod:`retouch.inversion.core` for the time and index conventions.
"""

from retouch.inversion.api import (
    METHODS,
    as_factory,
    fingerprint_of,
    invert,
    method_config,
    reconstruct,
)
from retouch.inversion.core import DenoiserFactory, default_grid, model_fingerprint
from retouch.inversion.ddim import DDIMConfig, DirectConfig, NegativePromptConfig, ReNoiseConfig
from retouch.inversion.exact import BDIAConfig, BDIAStep, EDICTConfig, EditFriendlyConfig
from retouch.inversion.flow import FireFlowConfig, RFSolverConfig
from retouch.inversion.null_text import NullTextConfig
from retouch.inversion.result import Inversion, load_inversion
from retouch.inversion.rf_inversion import RFInversionConfig

__all__ = [
    "METHODS",
    "Inversion",
    "DenoiserFactory",
    "invert",
    "reconstruct",
    "load_inversion",
    "as_factory",
    "fingerprint_of",
    "method_config",
    "model_fingerprint",
    "default_grid",
    "DDIMConfig",
    "NullTextConfig",
    "NegativePromptConfig",
    "EDICTConfig",
    "BDIAConfig",
    "BDIAStep",
    "DirectConfig",
    "EditFriendlyConfig",
    "ReNoiseConfig",
    "RFSolverConfig",
    "FireFlowConfig",
    "RFInversionConfig",
]
