"""Where an attention call happens (its *site*) and which batch rows play which role.

A :class:`Site` is derived once, at installation, from the name diffusers gives the processor
(``unet.attn_processors`` keys such as ``up_blocks.1.attentions.0.transformer_blocks.0.attn1``)
and from structural attributes of the UNet (``downsamplers`` / ``upsamplers``, the module's
``is_cross_attention``), never from class names or by counting calls.

A :class:`BatchLayout` says what the rows of a model call are: the latent rows' roles
(``("source", "target")``) repeated once per classifier-free-guidance half, unconditional half
first (the order of :class:`~retouch.guidance.CFGDenoiser`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import torch

from retouch.denoiser import halves_of
from retouch.samplers.state import Window, check_window, in_window  # step windows (re-exported)

__all__ = [
    "Site",
    "BatchLayout",
    "find_sites",
    "site_views",
    "controller_sites",
    "guidance_halves",
    "coarse_resolution",
    "describe_sites",
    "in_window",
    "check_window",
    "Window",
]

#: Forward order of the UNet's three parts.
PLACES = ("down", "mid", "up")
_PLACE_OF = {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up"}



@dataclass(frozen=True)
class Site:
    """One attention module of the UNet, as controllers see it."""

    name: str  # module path, e.g. "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    kind: str  # "self", "cross" or "joint" (MMDiT: both at once, see site_views)
    place: str  # "down", "mid" or "up"
    block: int | None  # index in down_blocks / up_blocks (None for mid); a transformer's block
    factor: int  # spatial downsampling factor of the latent at this site (1, 2, 4, ...)
    resolution: int  # side of the attention grid at the config's sample_size (latent // factor)
    layer: int  # index among sites of the same kind in forward order (MasaCtrl's "layer")
    place_layer: int  # index among sites of the same kind and place in forward order

    def grid(self, latent_hw: Sequence[int]) -> tuple[int, int]:
        """(h, w) of this site's query grid for a latent of spatial size ``latent_hw``."""
        return _reduce(int(latent_hw[0]), self.factor), _reduce(int(latent_hw[1]), self.factor)

    def grid_of(self, queries: int, latent_hw: Sequence[int] | None = None) -> tuple[int, int]:
        """(h, w) of a call with ``queries`` queries: the latent's grid at this site when it has
        that many cells, else a square, else one row (a token sequence)."""
        if latent_hw is not None:
            hw = self.grid(latent_hw)
            if hw[0] * hw[1] == queries:
                return hw
        side = math.isqrt(queries)
        return (side, side) if side * side == queries else (1, queries)


def _reduce(n: int, factor: int) -> int:
    """Side after ``log2(factor)`` stride-2 convolutions with padding 1 (ceil(n / 2) each)."""
    while factor > 1:
        n, factor = (n + 1) // 2, factor // 2
    return n


@dataclass(frozen=True)
class BatchLayout:
    """Roles of the rows of one model call: ``halves x roles``, half-major.

    ``roles`` are the latent rows the sampler holds (e.g. ``("source", "target")``);
    ``halves`` are the guidance halves the denoiser stacks them into (``("uncond", "cond")``
    for batched CFG, ``("cond",)`` without guidance).
    """

    roles: tuple[str, ...]  # role of each latent row
    halves: tuple[str, ...] = ("uncond", "cond")  # CFG halves in batch order

    def __post_init__(self):
        if not self.roles:
            raise ValueError("a batch layout needs at least one row")
        if not self.halves or len(set(self.halves)) != len(self.halves):
            raise ValueError(f"halves must be distinct and non-empty, got {self.halves}")

    @property
    def size(self) -> int:
        """Rows of one model call."""
        return len(self.roles) * len(self.halves)

    def latent_rows(self, role: str) -> list[int]:
        """Indices of ``role`` among the sampler's latent rows."""
        rows = [i for i, r in enumerate(self.roles) if r == role]
        if not rows:
            raise ValueError(f"no row has role {role!r}; roles are {self.roles}")
        return rows

    def rows(self, role: str, half: str) -> list[int]:
        """Indices of ``role`` rows in the ``half`` of a model call."""
        if half not in self.halves:
            raise ValueError(f"no {half!r} half in this layout; halves are {self.halves}")
        offset = self.halves.index(half) * len(self.roles)
        return [offset + i for i in self.latent_rows(role)]

    def half_rows(self, half: str) -> list[int]:
        """Model rows of ``half``, in latent-row order."""
        if half not in self.halves:
            raise ValueError(f"no {half!r} half in this layout; halves are {self.halves}")
        offset = self.halves.index(half) * len(self.roles)
        return list(range(offset, offset + len(self.roles)))

    def pairs(self, source: str, target: str, halves: Iterable[str]) -> tuple[list[int], list[int]]:
        """Model rows ``(src, tgt)`` pairing the ``target`` rows of each requested half present
        in the layout with its ``source`` rows: one to one when there are as many (the frames of
        a clip edit, each with its own source), else each with the first source row."""
        src, tgt = [], []
        for half in halves:
            if half not in self.halves:
                continue
            ss, ts = self.rows(source, half), self.rows(target, half)
            if len(ss) not in (1, len(ts)):
                raise ValueError(f"{len(ss)} {source!r} rows for {len(ts)} {target!r} rows: give "
                                 f"one source row, or one per target row")
            src += ss if len(ss) == len(ts) else [ss[0]] * len(ts)
            tgt += ts
        return src, tgt


def guidance_halves(denoiser) -> tuple[str, ...]:
    """The guidance halves a denoiser stacks its rows into (see :class:`BatchLayout`): what its
    ``halves`` attribute says (:func:`retouch.denoiser.halves_of`)."""
    return halves_of(denoiser)


def _downsample_counts(unet: torch.nn.Module) -> tuple[list[int], int, list[int]]:
    """Downsampling level before each down block, at the mid block, and before each up block."""
    down, level = [], 0
    for block in unet.down_blocks:
        down.append(level)
        level += getattr(block, "downsamplers", None) is not None
    up, up_level = [], level
    for block in unet.up_blocks:
        up.append(up_level)
        up_level -= getattr(block, "upsamplers", None) is not None
    return down, level, up


def _sample_size(unet: torch.nn.Module) -> int:
    size = getattr(unet.config, "sample_size", None)
    if isinstance(size, list | tuple):
        size = size[0]
    if size is None:
        raise ValueError("the UNet config has no sample_size; cannot name site resolutions")
    return int(size)


def find_sites(unet: torch.nn.Module) -> dict[str, Site]:
    """Sites of every attention processor of a ``UNet2DConditionModel`` (or the joint attention
    of an MMDiT transformer, :func:`transformer_sites`), keyed by processor name.

    Raises ValueError for processors outside ``down_blocks`` / ``mid_block`` / ``up_blocks``
    (not a UNet this layer knows how to place).
    """
    if not hasattr(unet, "down_blocks") and hasattr(unet, "transformer_blocks"):
        return transformer_sites(unet)
    down, mid, up = _downsample_counts(unet)
    size = _sample_size(unet)
    found = []
    for key in unet.attn_processors:
        name = key.removesuffix(".processor")
        head, *rest = name.split(".")
        if head not in _PLACE_OF:
            raise ValueError(f"attention module {name!r} is outside down/mid/up blocks")
        place = _PLACE_OF[head]
        block = int(rest[0]) if place != "mid" else None
        level = mid if place == "mid" else (down if place == "down" else up)[block]
        module = unet.get_submodule(name)
        kind = "cross" if module.is_cross_attention else "self"
        order = (PLACES.index(place), *map(int, re.findall(r"\.(\d+)(?=\.|$)", name)))
        found.append((order, key, name, kind, place, block, 2**level))
    found.sort()
    sites, counts = {}, {}
    for _, key, name, kind, place, block, factor in found:
        layer = counts.get(kind, 0)
        place_layer = counts.get((kind, place), 0)
        counts[kind], counts[(kind, place)] = layer + 1, place_layer + 1
        res = _reduce(size, factor)
        sites[key] = Site(name, kind, place, block, factor, res, layer, place_layer)
    return sites


#: Latent side Flux's sites are named at (FluxPipeline's default: 1024 px, 128 latent pixels).
FLUX_LATENT_SIZE = 128


def transformer_sites(transformer: torch.nn.Module) -> dict[str, Site]:
    """Sites of the joint attention of an MMDiT transformer (SD3, Flux), keyed by processor name.

    Every ``transformer_blocks.i.attn`` with a text stream (image and text tokens in one
    attention) and every Flux ``single_transformer_blocks.j.attn`` (both streams in one) is a
    ``"joint"`` site at the token grid (SD3: ``sample_size / patch_size``; Flux: its 2x2 packed
    latent, named at a 128-pixel latent). A transformer has no bottleneck: its first half of
    blocks (in forward order) counts as ``"down"``, a middle block (odd count) as ``"mid"``, the
    second half as ``"up"``, so controllers that pick decoder layers pick the later blocks.
    Attention without a text stream (SD3.5's ``attn2``) is not a site.
    """
    flux = hasattr(transformer, "single_transformer_blocks")
    patch = 2 if flux else int(transformer.config.patch_size)  # latent pixels per token side
    size = FLUX_LATENT_SIZE if flux else _sample_size(transformer)
    singles = len(transformer.single_transformer_blocks) if flux else 0
    blocks = len(transformer.transformer_blocks) + singles
    sites, per_place = {}, {}
    for key in transformer.attn_processors:
        name = key.removesuffix(".processor")
        parts = name.split(".")
        module = transformer.get_submodule(name)
        single = parts[0] == "single_transformer_blocks"
        if parts[-1] != "attn" or not (single or (
                parts[0] == "transformer_blocks"
                and getattr(module, "add_q_proj", None) is not None)):
            continue
        i = int(parts[1]) + (len(transformer.transformer_blocks) if single else 0)
        place = "down" if 2 * i + 1 < blocks else "up" if 2 * i + 1 > blocks else "mid"
        place_layer = per_place[place] = per_place.get(place, -1) + 1
        sites[key] = Site(name, "joint", place, i, patch, _reduce(size, patch), i, place_layer)
    if not sites:
        raise ValueError("this transformer has no joint attention this layer can place")
    return sites


def site_views(site: Site) -> list[Site]:
    """The sites controllers see at ``site``: itself, or a joint site's image ``"self"`` and
    ``"cross"`` (image-to-text) views (:mod:`retouch.attention.joint`)."""
    if site.kind != "joint":
        return [site]
    return [replace(site, kind="self"), replace(site, kind="cross")]


def controller_sites(network: torch.nn.Module) -> list[Site]:
    """Every site of ``network`` as controllers see it (a joint site's two views)."""
    return [v for s in find_sites(network).values() for v in site_views(s)]


def coarse_resolution(sites: Iterable[Site], kind: str = "cross") -> int:
    """The coarsest resolution of ``kind`` sites in the down/up blocks (SD1.x: 16 of 64).

    Prompt-to-Prompt reads its blend maps and injects self-attention at this level and below.
    """
    res = [s.resolution for s in sites if s.kind == kind and s.place in ("down", "up")]
    if not res:
        raise ValueError(f"this model has no {kind}-attention in its down or up blocks")
    return min(res)


def describe_sites(sites: Iterable[Site]) -> str:
    """'cross-attention at resolutions 8, 4 (...); self-attention at ...' for error messages."""
    sites = [v for s in sites for v in site_views(s)]
    parts = []
    for kind in ("cross", "self"):
        res = sorted({s.resolution for s in sites if s.kind == kind}, reverse=True)
        n = sum(s.kind == kind for s in sites)
        if res:
            parts.append(
                f"{kind}-attention at resolutions {', '.join(map(str, res))} ({n} layers)"
            )
    return "; ".join(parts) or "no attention layers"
