"""Self-guidance: move, resize and restyle objects by guiding the model's own attention.

An edit runs two rows, as every edit in :mod:`.edit` does: the source (the generation, or an
inverted image's reconstruction) and the target, guided. At each guided step the target row's
properties (:mod:`retouch.attention.properties`, read by a
:class:`~retouch.attention.properties.PropertyRecorder` in the same model call as the source's)
are pulled towards the source's, edited, by the gradient of an energy ``g``:

    ``g = w_centroid |centroid(k) - (centroid_src(k) + d)|_1``            (move k by d)
    ``  + w_size |size(k) - f^2 size_src(k)|``                          (resize k by f)
    ``  + w_shape mean_i |T(shape_i,src(k)) - shape_i(k)|_1``             (T: the move / resize)
    ``  + w_keep mean_{o held} mean_i |shape_i,src(o) - shape_i(o)|_1``   (others stay put)
    ``  + w_appearance mean_o |appearance_src(o') - appearance(o)|_1``   (o' = o, or the object
                                                                         whose look o takes)

An object may also take its look from another image (``transfer``, the paper's appearance
transfer from real images): the donor image is inverted and reconstructed once beforehand with
the same inversion and steps, and its object's appearance at each step is the target then.

``i`` runs over the cross-attention sites; ``|.|_1`` is the sum over (x, y) for the centroid
and a mean over cells or channels elsewhere; a word both moved and resized has one ``T``
(scaled about its source centroid, then moved). The
guided estimate is Epstein et al.'s ``eps~ = eps_cfg + v sigma_t grad g`` (a
:class:`~retouch.guidance.LossGuidance` around whatever guidance the edit uses, moving the
target row only), within a window of the steps. Any editor (Prompt-to-Prompt for a caption
change in the same edit), any inversion and any sampler run with it: it is an
:class:`~retouch.recipes.edit.EditPlugin`.

References: Epstein et al. 2023 (Diffusion Self-Guidance: the guided noise estimate, the
properties and the combined edit that moves one object while holding the others' shapes and
every appearance).
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from ..attention import BatchLayout, coarse_resolution, in_window
from ..attention.properties import (
    PropertyRecorder,
    appearance,
    centroid,
    shape,
    size,
    transform,
)
from ..attention.sites import Window, check_window, controller_sites, describe_sites
from ..attention.tokens import segments, token_ids, word_positions
from ..checks import finite
from ..denoiser import halves_of
from ..guidance import LossGuidance
from ..samplers import step_at
from .edit import ROLES, EditResult, edit, edit_generated

__all__ = ["GuideWeights", "SelfGuidance", "guide", "guide_generated", "donor_looks",
           "DEFAULT_STEPS"]

#: Fraction of the steps self-guidance acts in (the layout is decided early; late steps refine).
DEFAULT_STEPS: Window = (0.0, 0.6)


@dataclass(frozen=True)
class GuideWeights:
    """Weights of the energy's terms (see the module doc); 0 switches a term off.

    The defaults were chosen on ToyWorld (ToyBench moves and resizes of another seed than the
    benchmark's, among 1/3x and 3x of them); the paper's weights (for Imagen) are not in
    this repository. Other models may want other weights: too high breaks the image.
    """

    centroid: float = 300.0  # moved object's centroid to its target (image fractions)
    size: float = 300.0  # resized object's size to factor^2 x the source's
    shape: float = 100.0  # edited object's shape to the source's, moved or scaled
    keep: float = 100.0  # every other named object's shape held to the source's
    appearance: float = 30.0  # every named object's appearance held (or taken from another)

    def __post_init__(self):
        for f in fields(self):
            finite(f"the self-guidance weight {f.name}", getattr(self, f.name), low=0.0)

    @property
    def zero(self) -> bool:
        """Whether every term is off (the edit is then exactly the unguided one)."""
        return all(getattr(self, f.name) == 0 for f in fields(self))


def check_words(prompt: str, words: Sequence[str]) -> None:
    """Refuse a word the prompt does not hold (naming the prompt's words), or holds more than
    once (it would name two objects)."""
    have = _words(prompt)
    tokens = _tokens(prompt)
    for w in words:
        if not set(_words(w)) <= have or not _words(w):
            raise ValueError(f"self-guidance names {w!r}, which is not a word of the prompt "
                             f"{prompt!r}; name one of: {', '.join(sorted(have))}")
        if tokens.count(w.lower()) > 1:
            raise ValueError(f"self-guidance names {w!r}, which occurs "
                             f"{tokens.count(w.lower())} times in {prompt!r}: name the "
                             "object by a word or phrase that occurs once (e.g. its colour)")


def _tokens(prompt: str) -> list[str]:
    """The prompt's words, lower case, in order."""
    return re.findall(r"[\w'-]+", prompt.lower())


def _words(prompt: str) -> set[str]:
    return set(_tokens(prompt))


class SelfGuidance:
    """A self-guidance edit: which objects move, resize or take another's look, which are held.

    ``move``: word -> (dx, dy) in image fractions (x right, y down), each in (-1, 1);
    ``resize``: word -> factor f > 0 (the object's side times f, its size times f^2);
    ``restyle``: word -> another word whose source appearance it takes; ``transfer``: word ->
    a word of a donor image's prompt whose look it takes (``guide(..., donor=...)``);
    ``keep``: words of objects whose shape and appearance are held. ``steps``: the window
    (fractions of the steps) in which it guides; ``resolutions``: the cross-attention sites
    read (default: the coarsest down/up level, Prompt-to-Prompt's: 16 x 16 on SD1.x, 8 x 8 on
    ToyWorld, where the finer maps let the gradient move the attention without moving the
    object); ``feature_module``:
    the module whose activations make ``appearance`` (default: the UNet's last decoder block;
    a transformer's ``norm_out``, its image tokens before the output projection).
    All is checked here, before any model is loaded.
    """

    def __init__(
        self,
        *,
        move: Mapping[str, tuple[float, float]] | None = None,
        resize: Mapping[str, float] | None = None,
        restyle: Mapping[str, str] | None = None,
        transfer: Mapping[str, str] | None = None,
        keep: Sequence[str] = (),
        weights: GuideWeights | None = None,
        steps: Window = DEFAULT_STEPS,
        resolutions: Collection[int] | None = None,
        feature_module: str | None = None,
    ):
        self.move = {w: _offset(w, d) for w, d in (move or {}).items()}
        self.resize = {w: finite(f"the resize factor of {w!r}", f) for w, f in
                       (resize or {}).items()}
        for w, f in self.resize.items():
            if f <= 0:
                raise ValueError(f"the resize factor of {w!r} must be > 0 (1 keeps its size), "
                                 f"got {f:g}")
        self.restyle = dict(restyle or {})
        self.transfer = dict(transfer or {})
        both = sorted(set(self.restyle) & set(self.transfer))
        if both:
            raise ValueError(f"self-guidance takes the look of {both[0]!r} both from this image "
                             "(restyle) and from a donor (transfer): name it in one of them")
        self.keep = [w for w in dict.fromkeys(keep) if w not in self.edited]
        self.weights = weights or GuideWeights()
        self.steps = check_window(steps, "the self-guidance step window")
        if self.steps[0] >= self.steps[1]:
            raise ValueError(f"the self-guidance step window {steps!r} holds no step: give "
                             "(start, end) with start < end, e.g. (0, 0.6)")
        self.resolutions = None if resolutions is None else set(resolutions)
        self.feature_module = feature_module
        if not self.edited and not self.keep:
            raise ValueError("self-guidance needs something to do: name a word to move, "
                             "resize, restyle or transfer a look to (or to keep)")
        if (self.restyle or self.transfer) and not self.weights.appearance:
            raise ValueError("restyle and transfer act through the appearance term, which "
                             "weights.appearance=0 turns off: give appearance > 0")

    @property
    def edited(self) -> list[str]:
        """Words of the objects this edit changes, in a stable order."""
        return list(dict.fromkeys([*self.move, *self.resize, *self.restyle, *self.transfer]))

    @property
    def words(self) -> list[str]:
        """Every word of this image's prompt this edit names (edited, looks taken from, held;
        not the donor's words of ``transfer``)."""
        return list(dict.fromkeys([*self.edited, *self.restyle.values(), *self.keep]))

    def check_prompt(self, prompt: str) -> None:
        """Refuse a word of :attr:`words` that ``prompt`` lacks or repeats
        (:func:`check_words`)."""
        check_words(prompt, self.words)

    def bind(self, model, source: str, target: str,
             donor_looks: Mapping[int, Mapping[str, Tensor]] | None = None) -> BoundGuidance:
        """The :class:`~retouch.recipes.edit.EditPlugin` of this edit on ``model``;
        ``donor_looks`` (step -> donor word -> look, :func:`donor_looks`) serve ``transfer``."""
        self.check_prompt(source)
        if self.transfer and donor_looks is None:
            raise ValueError(f"self-guidance transfers looks from a donor image "
                             f"({self.transfer}): pass donor_looks= (from donor_looks(), or "
                             "guide(..., donor=(image, prompt)))")
        return BoundGuidance(self, model, source, target, donor_looks)


def _offset(word: str, d) -> tuple[float, float]:
    if not isinstance(d, tuple | list) or len(d) != 2:
        raise ValueError(f"the move of {word!r} must be (dx, dy) in image fractions, got {d!r}")
    dx, dy = (finite(f"the move of {word!r}", v) for v in d)
    if not (-1 < dx < 1 and -1 < dy < 1):
        raise ValueError(f"the move of {word!r} ({dx:g}, {dy:g}) leaves the image: dx and dy "
                         "are fractions of the image side, each in (-1, 1)")
    return dx, dy


def _positions(tokenizer, prompt: str, word: str) -> list[int]:
    """Encoder positions of ``word`` in ``prompt``, refused if it occurs more than once (it
    would name two objects)."""
    pos = word_positions(tokenizer, prompt, word)
    n = len(tokenizer(word, add_special_tokens=False).input_ids)  # the word's own tokens
    if len(pos) > n:
        raise ValueError(f"self-guidance names {word!r}, which occurs {len(pos) // n} times in "
                         f"{prompt!r}: name the object by a word or phrase that occurs once "
                         "(e.g. its colour)")
    return pos


def _occurs(tokenizer, prompt: str, word: str) -> bool:
    try:
        word_positions(tokenizer, prompt, word)
    except ValueError:
        return False
    return True


def _occurs_once(tokenizer, prompt: str, word: str) -> bool:
    try:
        pos = word_positions(tokenizer, prompt, word)
    except ValueError:
        return False
    return len(pos) == len(tokenizer(word, add_special_tokens=False).input_ids)


class BoundGuidance:
    """Self-guidance bound to a model and the edit's two prompts (an
    :class:`~retouch.recipes.edit.EditPlugin`)."""

    def __init__(self, spec: SelfGuidance, model, source: str, target: str,
                 donor_looks: Mapping[int, Mapping[str, Tensor]] | None = None):
        self.spec = spec
        self.donor_looks = donor_looks or {}
        self.recorder = _recorder(spec, model.network, looks=bool(spec.weights.appearance))
        tok = _tokenizer(model)
        same_length = len(token_ids(tok, source)) == len(token_ids(tok, target))
        self.positions = {}  # word -> (source positions, target positions)
        for w in spec.words:
            src = _positions(tok, source, w)
            # A word the target lacks (swapped for one of as many tokens) or repeats (as a
            # recoloured object's colour may be) keeps its aligned positions.
            if _occurs_once(tok, target, w):
                tgt = _positions(tok, target, w)
            elif same_length:
                tgt = src
            else:
                how = "repeats" if _occurs(tok, target, w) else "lacks"
                raise ValueError(
                    f"self-guidance names {w!r}, which the target prompt {target!r} {how}, and "
                    "the two prompts have different token counts, so its aligned place is "
                    "unknown: keep the word, once, in the target prompt")
            self.positions[w] = (src, tgt)
        self.controllers = [] if spec.weights.zero else [self.recorder]
        self.terms: dict[str, float] = {}  # the last guided call's energy terms
        self.step: int | None = None  # the last guided call's step

    def wrap(self, denoiser, times: Tensor):
        """``denoiser`` (for rows [source, target]) in a LossGuidance that moves the target
        row by this energy's gradient at the window's steps of ``times``."""
        if self.spec.weights.zero:
            return denoiser
        grid = [float(t) for t in times]
        n = len(times) - 1
        if not any(in_window(i, n, self.spec.steps) for i in range(n)):
            raise ValueError(f"the self-guidance window {self.spec.steps} holds none of the "
                             f"{n} steps: widen it")

        def scale(t: float) -> float:
            self.step = step_at(grid, t)  # midpoint calls (rf_solver) count as their step
            if self.step is None:
                raise ValueError(f"time {t} is not on the edit's grid of {n} steps")
            return 1.0 if in_window(self.step, n, self.spec.steps) else 0.0

        target = BatchLayout(ROLES).latent_rows("target")
        return LossGuidance(denoiser, self.energy, scale=scale, rows=target)

    def energy(self, x0: Tensor, x: Tensor, t: float) -> Tensor:
        """``g`` of the module doc (a scalar) from the maps and activations the model call
        just recorded: (R, h, w, T) per site and (R, C, H, W), rows [source, target]."""
        maps, feats = self.recorder.take()
        if not maps:
            raise RuntimeError("self-guidance recorded no attention maps: the model did not "
                               "run through the edit's attention control")
        src, tgt = (BatchLayout(ROLES).latent_rows(r)[0] for r in ROLES)
        spec, w = self.spec, self.spec.weights

        def word_maps(word: str) -> tuple[list[Tensor], list[Tensor]]:
            ps, pt = self.positions[word]
            return ([m[src, ..., ps].sum(-1).detach() for m in maps],
                    [m[tgt, ..., pt].sum(-1) for m in maps])

        terms: dict[str, Tensor] = {}

        def add(name: str, weight: float, value: Tensor) -> None:
            if weight:
                terms[name] = terms.get(name, 0) + weight * value

        for word in dict.fromkeys([*spec.move, *spec.resize]):
            d, f = spec.move.get(word, (0.0, 0.0)), spec.resize.get(word, 1.0)
            a_src, a_tgt = word_maps(word)
            if word in spec.move:  # |.|_1 of the (x, y) difference
                add("centroid", w.centroid, _mean([
                    (centroid(b) - centroid(a) - torch.tensor(d).to(a)).abs().sum()
                    for a, b in zip(a_src, a_tgt)]))
            if word in spec.resize:
                add("size", w.size, _mean([(size(b) - f * f * size(a)).abs()
                                           for a, b in zip(a_src, a_tgt)]))
            # T: scaled about the source centroid, then moved; applied to the source's map
            # before thresholding, so cells entering the grid read as background.
            add("shape", w.shape, _mean([
                (shape(transform(a, offset=d, factor=f, center=tuple(centroid(a).tolist())))
                 - shape(b)).abs().mean() for a, b in zip(a_src, a_tgt)]))
        if spec.keep:
            add("keep", w.keep, _mean([
                _mean([(shape(a) - shape(b)).abs().mean() for a, b in zip(*word_maps(o))])
                for o in spec.keep]))
        if w.appearance:
            if feats is None:
                raise RuntimeError("self-guidance recorded no activations for appearance")
            feats = _feature_grid(feats, maps)
            looks = []
            for o in [*spec.edited, *spec.keep]:
                _, a_tgt = word_maps(o)
                have = appearance(_site_shape(a_tgt, feats)[None], feats[tgt:tgt + 1])
                if o in spec.transfer:
                    want = self._donor_look(spec.transfer[o]).to(have)
                else:
                    a_src, _ = word_maps(spec.restyle.get(o, o))
                    want = appearance(_site_shape(a_src, feats)[None],
                                      feats[src:src + 1].detach())
                looks.append((want - have).abs().mean())
            add("appearance", w.appearance, _mean(looks))
        self.terms = {k: float(v.detach()) for k, v in terms.items()}
        total = sum(terms.values()) if terms else x.sum() * 0.0
        if not math.isfinite(float(total.detach())):
            raise FloatingPointError(
                f"self-guidance energy is not finite at step {self.step} (terms "
                f"{self.terms}): lower the weights or check the prompt's words")
        return total

    def _donor_look(self, word: str) -> Tensor:
        looks = self.donor_looks.get(self.step)
        if looks is None or word not in looks:
            raise RuntimeError(f"the donor image's look of {word!r} was not recorded at step "
                               f"{self.step}: record it with donor_looks() on the same steps")
        return looks[word]


def _recorder(spec: SelfGuidance, network, *, looks: bool, always: bool = False
              ) -> PropertyRecorder:
    """The recorder of ``spec``'s maps (and, if ``looks``, activations) on ``network``
    (``always``: in every call, not only guided ones)."""
    sites = controller_sites(network)
    have = {s.resolution for s in sites if s.kind == "cross"}
    resolutions = {coarse_resolution(sites)} if spec.resolutions is None else spec.resolutions
    if not resolutions or not resolutions <= have:
        raise ValueError(f"self-guidance reads cross-attention at resolutions "
                         f"{sorted(resolutions)}; this model has {describe_sites(sites)}")
    module = (spec.feature_module or _default_feature_module(network)) if looks else None
    return PropertyRecorder(resolutions=resolutions, feature_module=module, always=always)


def _tokenizer(model):
    """The tokenizer of the words' positions: the first text segment's (SD3: CLIP's; Flux:
    T5's)."""
    return segments(model.text_tokens)[0][0]


class _LookRecording:
    """An :class:`~retouch.recipes.edit.EditPlugin` that records, at each step of ``window``
    in an edit's source row, the look of some words (their :func:`appearance`), changing
    nothing (its recorder reads without gradients)."""

    def __init__(self, spec: SelfGuidance, model, prompt: str, words: Sequence[str]):
        tok = _tokenizer(model)
        self.positions = {w: _positions(tok, prompt, w) for w in words}
        self.recorder = _recorder(spec, model.network, looks=True, always=True)
        self.controllers = [self.recorder]
        self.window = spec.steps
        self.looks: dict[int, dict[str, Tensor]] = {}

    def wrap(self, denoiser, times: Tensor):
        grid = [float(t) for t in times]
        n = len(grid) - 1
        plugin = self

        class Recording:  # the denoiser, reading the looks its call recorded
            schedule = denoiser.schedule
            halves = halves_of(denoiser)

            def __call__(self, x: Tensor, t: float):
                pred = denoiser(x, t)
                maps, feats = plugin.recorder.take()
                step = step_at(grid, t)
                if (step is not None and step not in plugin.looks and t == grid[step]
                        and in_window(step, n, plugin.window)):
                    plugin.looks[step] = plugin._looks(maps, feats)
                return pred

        return Recording()

    def _looks(self, maps: list[Tensor], feats: Tensor | None) -> dict[str, Tensor]:
        if not maps or feats is None:
            raise RuntimeError("the donor's reconstruction recorded no attention maps or "
                               "activations: it did not run through attention control")
        feats = _feature_grid(feats, maps)
        src = BatchLayout(ROLES).latent_rows("source")[0]
        return {w: appearance(_site_shape([m[src, ..., p].sum(-1) for m in maps], feats)[None],
                              feats[src:src + 1])[0] for w, p in self.positions.items()}


def donor_looks(
    model,
    image,
    prompt: str,
    words: Sequence[str],
    guidance: SelfGuidance,
    *,
    inversion: str = "ddpm_edit_friendly",
    steps: int = 25,
    cfg: float = 5.0,
    seed: int = 0,
    inversion_options: Mapping | None = None,
    progress: bool = False,
) -> dict[int, dict[str, Tensor]]:
    """The look (:func:`~retouch.attention.properties.appearance`) of ``words`` of a donor
    ``image`` captioned ``prompt`` at each step (``{step: {word: (C,)}}``), read from its
    reconstruction after ``inversion`` on ``steps`` steps with ``guidance``'s sites and
    feature module. Costs one inversion and one reconstruction of the donor."""
    model.check_prompt(prompt)
    check_words(prompt, words)
    recording = _LookRecording(guidance, model, prompt, words)
    edit(model, image, prompt, prompt, inversion=inversion, editor="none", steps=steps, cfg=cfg,
         seed=seed, inversion_options=inversion_options, plugin=recording, progress=progress)
    return recording.looks


def _default_feature_module(network) -> str:
    """The activations ``appearance`` reads by default: a UNet's last decoder block (the
    paper's), a transformer's image tokens entering its output projection (``norm_out``)."""
    if hasattr(network.config, "up_block_types"):
        return f"up_blocks.{len(network.config.up_block_types) - 1}"
    if hasattr(network, "norm_out"):
        return "norm_out"
    raise ValueError(f"self-guidance's appearance term knows no feature module of a "
                     f"{type(network).__name__}: give feature_module= (a module whose output "
                     f"is the image's features) or weights with appearance=0")


def _feature_grid(feats: Tensor, maps: list[Tensor]) -> Tensor:
    """Activations as (R, C, H, W): a transformer's image tokens (R, N, C) laid on the token
    grid of its attention maps (R, h, w, T), row-major as its patches are."""
    if feats.dim() == 4:
        return feats
    h, w = maps[0].shape[1:3]
    if feats.shape[1] != h * w:
        raise RuntimeError(f"the feature module gave {feats.shape[1]} tokens; the attention "
                           f"maps are {h}x{w}: choose a module of the image tokens alone")
    return feats.transpose(1, 2).reshape(feats.shape[0], feats.shape[2], h, w)


def _mean(values: Sequence[Tensor]) -> Tensor:
    return torch.stack(list(values)).mean()


def _site_shape(maps: list[Tensor], feats: Tensor) -> Tensor:
    """The mean over sites of the shapes, resized to the activations' grid: (H, W)."""
    hw = feats.shape[-2:]
    resized = [torch.nn.functional.interpolate(shape(m)[None, None], size=hw, mode="bilinear",
                                               align_corners=False)[0, 0] for m in maps]
    return torch.stack(resized).mean(0)


def guide_generated(
    model,
    prompt: str,
    guidance: SelfGuidance,
    *,
    target_prompt: str | None = None,
    editor: str = "none",
    steps: int = 25,
    cfg: float = 5.0,
    seed: int = 0,
    sampler: str = "ddim",
    progress: bool = False,
    **editor_options,
) -> EditResult:
    """Generate ``prompt``'s image (``result.source``) and its self-guided edit
    (``result.edited``) from the same noise; ``target_prompt`` and ``editor`` (any of
    :data:`retouch.recipes.edit.EDITORS`) compose a caption edit into the same run."""
    target = prompt if target_prompt is None else target_prompt
    model.check_prompt(prompt)
    plugin = guidance.bind(model, prompt, target)
    return edit_generated(model, prompt, target, editor=editor, steps=steps, cfg=cfg,
                          seed=seed, sampler=sampler, plugin=plugin, progress=progress,
                          **editor_options)


def guide(
    model,
    image,
    prompt: str,
    guidance: SelfGuidance,
    *,
    target_prompt: str | None = None,
    inversion: str = "ddpm_edit_friendly",
    editor: str = "none",
    steps: int = 25,
    cfg: float = 5.0,
    seed: int = 0,
    inversion_options: Mapping | None = None,
    donor: tuple | None = None,
    progress: bool = False,
    **editor_options,
) -> EditResult:
    """Self-guided edit of a real ``image`` captioned ``prompt``: inverted with ``inversion``
    (any of :data:`retouch.inversion.METHODS`), its reconstruction the source row, the target
    row guided (see the module doc); ``target_prompt`` / ``editor`` as in
    :func:`guide_generated`. ``donor``: ``(image, prompt)`` of the image ``guidance.transfer``
    takes looks from (inverted the same way)."""
    target = prompt if target_prompt is None else target_prompt
    model.check_prompt(prompt)
    if guidance.transfer and donor is None:
        raise ValueError(f"self-guidance transfers looks from a donor image "
                         f"({guidance.transfer}): give donor=(image, prompt)")
    plugin = guidance.bind(model, prompt, target, {} if guidance.transfer else None)
    if guidance.transfer:  # after the guidance's own checks: the donor costs a run
        plugin.donor_looks = donor_looks(
            model, donor[0], donor[1], list(guidance.transfer.values()), guidance,
            inversion=inversion, steps=steps, cfg=cfg, seed=seed,
            inversion_options=inversion_options, progress=progress)
    return edit(model, image, prompt, target, inversion=inversion, editor=editor, steps=steps,
                cfg=cfg, seed=seed, inversion_options=inversion_options, plugin=plugin,
                progress=progress, **editor_options)
