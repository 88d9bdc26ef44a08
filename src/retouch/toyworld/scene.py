"""ToyWorld scenes: the vocabulary, scene specs, random scenes and their canonical captions.

Caption grammar (stable word order, so that a single-attribute edit changes a single word):

    object  := "a" [size] [colour] [style] shape ["on the" position]
    caption := object ["and" object] ["on a" background "background"]

e.g. ``a small red circle on the left and a big blue square on the right on a gray background``.
Objects are listed left to right (then top to bottom). Every bracketed word may be omitted, and
the model then picks that attribute itself. Style is global (all objects share the scene's fill
style) and written in each object's clause. Canonical captions write ``solid`` only when asked
(``say_solid=True``): a caption without a style word is true of a solid scene, it is what the
core vocabulary (whose scenes are solid) says, and it keeps ToyBench's prompts as they were
measured. To have the fill scored, say it: ``bench toyworld`` does for extended models.

Models trained before ``--free-style`` (the shipped UNet model among them) learnt an older
reading: a caption without a style word meant ``solid``, and they draw solid fills for it, which
the current reading (any style) also accepts.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field

__all__ = [
    "SHAPES",
    "RESERVED_SHAPES",
    "COLORS",
    "SIZES",
    "POSITIONS",
    "BACKGROUNDS",
    "STYLES",
    "VOCABULARY",
    "ObjectSpec",
    "Scene",
    "Caption",
    "random_scene",
    "caption",
    "parse_caption",
]

SHAPES = ("circle", "square", "triangle")
# Never in the base training data: personalization teaches them from a few images.
RESERVED_SHAPES = ("star", "heart")
# sRGB values, chosen far apart from each other and from the backgrounds.
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 210, 40),
    "purple": (150, 60, 200),
    "orange": (250, 140, 20),
}
# Object "radius" (half the bounding-box extent) as a fraction of the image side.
SIZES = {"small": 0.11, "big": 0.19}
# Region centres as fractions of (width, height).
POSITIONS = {
    "left": (0.26, 0.5),
    "right": (0.74, 0.5),
    "center": (0.5, 0.5),
    "top": (0.5, 0.27),
    "bottom": (0.5, 0.73),
}
CORE_POSITIONS = ("left", "right", "center")
BACKGROUNDS = {"white": (255, 255, 255), "gray": (128, 128, 128), "black": (0, 0, 0)}
STYLES = ("solid", "outlined", "striped")

_GRAMMAR_WORDS = ("a", "on", "the", "and", "background")
VOCABULARY = tuple(
    sorted(
        set(_GRAMMAR_WORDS)
        | set(SHAPES + RESERVED_SHAPES)
        | set(COLORS)
        | set(SIZES)
        | set(POSITIONS)
        | set(BACKGROUNDS)
        | set(STYLES)
    )
)

JITTER_POSITION = 0.035  # max centre offset, fraction of the image side
JITTER_SIZE = 0.08  # max relative radius change


@dataclass(frozen=True)
class ObjectSpec:
    """One object: attribute words plus continuous jitter (fractions of the image side)."""

    shape: str
    color: str
    size: str
    position: str
    dx: float = 0.0  # centre offset from the region centre
    dy: float = 0.0
    scale: float = 1.0  # radius multiplier

    def __post_init__(self):
        _check("shape", self.shape, SHAPES + RESERVED_SHAPES)
        _check("color", self.color, tuple(COLORS))
        _check("size", self.size, tuple(SIZES))
        _check("position", self.position, tuple(POSITIONS))

    @property
    def center(self) -> tuple[float, float]:
        cx, cy = POSITIONS[self.position]
        return cx + self.dx, cy + self.dy

    @property
    def radius(self) -> float:
        return SIZES[self.size] * self.scale


@dataclass(frozen=True)
class Scene:
    """A ToyWorld scene: 1-3 objects on a uniform background, with one global fill style."""

    objects: tuple[ObjectSpec, ...]
    background: str = "white"
    style: str = "solid"

    def __post_init__(self):
        if not 1 <= len(self.objects) <= 3:
            raise ValueError(f"a scene has 1 to 3 objects, got {len(self.objects)}")
        _check("background", self.background, tuple(BACKGROUNDS))
        _check("style", self.style, STYLES)
        positions = [o.position for o in self.objects]
        if len(set(positions)) != len(positions):
            raise ValueError(f"two objects share a position: {positions}")

    def replace(self, index: int | None = None, **changes) -> Scene:
        """A copy with scene attributes changed, or object ``index``'s attributes changed."""
        if index is None:
            return dataclasses.replace(self, **changes)
        objects = list(self.objects)
        objects[index] = dataclasses.replace(objects[index], **changes)
        return dataclasses.replace(self, objects=tuple(objects))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        objects = tuple(ObjectSpec(**o) for o in d["objects"])
        return cls(objects=objects, background=d["background"], style=d["style"])


def _check(what: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(valid)}")


def random_scene(
    rng: random.Random,
    *,
    shapes: tuple[str, ...] = SHAPES,
    colors: tuple[str, ...] = tuple(COLORS),
    backgrounds: tuple[str, ...] = tuple(BACKGROUNDS),
    styles: tuple[str, ...] = ("solid",),
    positions: tuple[str, ...] = CORE_POSITIONS,
    two_object_fraction: float = 0.6,
    jitter: bool = True,
) -> Scene:
    """Draw a scene: one object anywhere in ``positions`` or two objects left and right."""
    if rng.random() < two_object_fraction:
        slots = ["left", "right"]
        if "top" in positions and rng.random() < 0.5:
            slots = ["top", "bottom"]
    else:
        slots = [rng.choice(positions)]
    objects = []
    for slot in slots:
        j = JITTER_POSITION if jitter else 0.0
        objects.append(
            ObjectSpec(
                shape=rng.choice(shapes),
                color=rng.choice(colors),
                size=rng.choice(tuple(SIZES)),
                position=slot,
                dx=rng.uniform(-j, j),
                dy=rng.uniform(-j, j),
                scale=1.0 + (rng.uniform(-JITTER_SIZE, JITTER_SIZE) if jitter else 0.0),
            )
        )
    bg = rng.choice(backgrounds)
    # Keep every object visible against the background (no black-on-black).
    return Scene(objects=tuple(objects), background=bg, style=rng.choice(styles))


@dataclass(frozen=True)
class Caption:
    """A caption and, for every word, which scene part it names (for grounding and editing).

    ``roles[i]`` is ``(object_index, attribute)`` for attribute words, ``(-1, "background")``
    for the background colour and noun, and ``None`` for grammar words.
    """

    text: str
    words: tuple[str, ...]
    roles: tuple[tuple[int, str] | None, ...] = field(default=())


def caption(
    scene: Scene,
    *,
    drop: dict[str, float] | None = None,
    say_solid: bool = False,
    rng: random.Random | None = None,
) -> Caption:
    """The canonical caption of ``scene``; ``drop`` gives per-attribute omission probabilities.

    Attributes: ``size``, ``color``, ``style``, ``position``, ``background``. Shapes are never
    dropped. With ``drop`` set, ``rng`` must be given. ``solid`` is written only with
    ``say_solid`` (then it may be dropped like any other style word).
    """
    drop = drop or {}
    if drop and rng is None:
        raise ValueError("caption(drop=...) needs rng")

    def keep(attr: str) -> bool:
        p = drop.get(attr, 0.0)
        return p <= 0.0 or rng.random() >= p

    words: list[str] = []
    roles: list[tuple[int, str] | None] = []

    def put(word: str, role: tuple[int, str] | None) -> None:
        words.append(word)
        roles.append(role)

    style_kept = (say_solid or scene.style != "solid") and keep("style")
    for k, obj in enumerate(scene.objects):
        if k:
            put("and", None)
        put("a", None)
        if keep("size"):
            put(obj.size, (k, "size"))
        if keep("color"):
            put(obj.color, (k, "color"))
        if style_kept:
            put(scene.style, (k, "style"))
        put(obj.shape, (k, "shape"))
        if keep("position"):
            put("on", None)
            put("the", None)
            put(obj.position, (k, "position"))
    if keep("background"):
        put("on", None)
        put("a", None)
        put(scene.background, (-1, "background"))
        put("background", (-1, "background"))
    return Caption(text=" ".join(words), words=tuple(words), roles=tuple(roles))


def parse_caption(text: str) -> dict:
    """Read a canonical caption back into attribute words: ``{"objects": [...], ...}``.

    Raises ValueError naming unknown words. Attributes absent from the caption, the style
    among them, are absent from the result (the model picks them).
    """
    words = text.lower().replace(",", " ").split()
    unknown = sorted({w for w in words if w not in VOCABULARY})
    if unknown:
        raise ValueError(
            f"words outside the ToyWorld vocabulary: {', '.join(unknown)}; "
            f"vocabulary: {' '.join(VOCABULARY)}"
        )
    objects: list[dict] = []
    out: dict = {"objects": objects}
    current: dict | None = None
    for w in words:
        if w in SHAPES + RESERVED_SHAPES:
            objects.append({**(current or {}), "shape": w})
            current = None
        elif w in COLORS or w in SIZES:
            current = current or {}
            current["color" if w in COLORS else "size"] = w
        elif w in STYLES:
            out["style"] = w
        elif w in POSITIONS and objects:
            objects[-1]["position"] = w
        elif w in BACKGROUNDS:
            out["background"] = w
    return out
