"""Seeded image tasks for the embedded CLIP benchmark: 8 classification tasks and a captioned mix.

Everything is drawn with numpy on a small RGB canvas from a ``numpy.random.Generator``, except
``digits``, which uses the 8x8 handwritten digits scikit-learn ships. Each task names its classes
and prompt templates so FusionBench's CLIP task pool can build zero-shot heads.

Task images carry nuisance factors the captioned pretraining mix does not (distractor objects,
clutter, tints), so the pretrained model's zero-shot accuracy is honest but limited and
fine-tuning has something to learn.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import numpy as np

Image = np.ndarray  # (H, W, 3) uint8

COLORS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 80, 235),
    "yellow": (230, 220, 40),
    "purple": (160, 60, 210),
    "cyan": (40, 210, 210),
}
SHAPES = ("circle", "square", "triangle", "cross")
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
SIZES = ("small", "medium", "large")
SIZE_RADII = {"small": (1.6, 2.3), "medium": (3.0, 3.7), "large": (4.8, 5.8)}
COUNTS = ("one", "two", "three", "four")
ORIENTATIONS = ("horizontal", "vertical", "rising diagonal", "falling diagonal")
ORIENTATION_ANGLES = {"horizontal": 0.0, "vertical": 90.0, "rising diagonal": 45.0,
                      "falling diagonal": 135.0}
TEXTURES = ("dotted", "striped", "checkered", "speckled")
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass(frozen=True)
class VisionTask:
    classnames: Tuple[str, ...]
    templates: Tuple[str, ...]
    """Prompt templates with one ``{}`` for the class name."""
    draw: Callable[[np.random.Generator, int, int], Image]
    """``draw(rng, label, size) -> image``."""


# --- drawing primitives ---------------------------------------------------------------------------


def _grid(size: int):
    coords = np.arange(size, dtype=np.float32) + 0.5
    return np.meshgrid(coords, coords, indexing="ij")  # (y, x)


def _background(rng: np.random.Generator, size: int, clutter: float = 0.0) -> np.ndarray:
    base = rng.uniform(0, 50, size=3)
    image = base + rng.normal(0, 8 + 20 * clutter, size=(size, size, 3))
    return image.astype(np.float32)


def _jittered(rng: np.random.Generator, color: Tuple[int, int, int], amount: float = 25.0):
    return np.clip(np.array(color, np.float32) + rng.normal(0, amount, 3), 0, 255)


def shape_mask(shape: str, size: int, cy: float, cx: float, radius: float) -> np.ndarray:
    """Pixels inside ``shape`` centred at (cy, cx)."""
    y, x = _grid(size)
    dy, dx = y - cy, x - cx
    if shape == "circle":
        return dy**2 + dx**2 <= radius**2
    if shape == "square":
        half = radius * 0.85
        return (np.abs(dy) <= half) & (np.abs(dx) <= half)
    if shape == "triangle":
        top = -radius
        return (dy >= top) & (dy <= radius * 0.8) & (np.abs(dx) <= (dy - top) * 0.6)
    if shape == "cross":
        arm = max(radius / 3.0, 0.6)
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= radius)) | (
            (np.abs(dy) <= arm) & (np.abs(dx) <= radius)
        )
    raise ValueError(f"unknown shape {shape!r}")


def _paint(image: np.ndarray, mask: np.ndarray, color: np.ndarray) -> None:
    image[mask] = color


def _to_uint8(image: np.ndarray) -> Image:
    return np.clip(image, 0, 255).astype(np.uint8)


def _random_center(rng, size, radius, quadrant: int | None = None):
    lo, hi = radius + 0.5, size - radius - 0.5
    if quadrant is None:
        return rng.uniform(lo, hi), rng.uniform(lo, hi)
    half = size / 2
    row, col = divmod(quadrant, 2)
    cy = rng.uniform(max(lo, row * half + 1.0), min(hi, (row + 1) * half - 1.0))
    cx = rng.uniform(max(lo, col * half + 1.0), min(hi, (col + 1) * half - 1.0))
    return cy, cx


def _add_distractor(rng, image, size, avoid_color: str | None = None):
    """A small object of another colour somewhere: a nuisance the tasks must ignore."""
    names = [c for c in COLORS if c != avoid_color]
    color = COLORS[names[rng.integers(len(names))]]
    radius = rng.uniform(1.2, 1.8)
    cy, cx = _random_center(rng, size, radius)
    _paint(image, shape_mask(SHAPES[rng.integers(4)], size, cy, cx, radius), _jittered(rng, color))


# --- the eight tasks ------------------------------------------------------------------------------


def draw_shape(rng, label, size):
    image = _background(rng, size, clutter=0.3)
    radius = rng.uniform(3.5, 6.0)
    cy, cx = _random_center(rng, size, radius)
    color = COLORS[list(COLORS)[rng.integers(len(COLORS))]]
    _paint(image, shape_mask(SHAPES[label], size, cy, cx, radius), _jittered(rng, color))
    _add_distractor(rng, image, size)
    return _to_uint8(image)


def draw_color(rng, label, size):
    name = list(COLORS)[label]
    image = _background(rng, size, clutter=0.5)
    radius = rng.uniform(3.0, 5.0)
    cy, cx = _random_center(rng, size, radius)
    _paint(image, shape_mask(SHAPES[rng.integers(4)], size, cy, cx, radius),
           _jittered(rng, COLORS[name], 35.0))
    for _ in range(2):
        _add_distractor(rng, image, size, avoid_color=name)
    return _to_uint8(image)


def draw_position(rng, label, size):
    image = _background(rng, size, clutter=0.5)
    radius = rng.uniform(2.0, 3.0)
    cy, cx = _random_center(rng, size, radius, quadrant=label)
    color = COLORS[list(COLORS)[rng.integers(len(COLORS))]]
    _paint(image, shape_mask(SHAPES[rng.integers(4)], size, cy, cx, radius), _jittered(rng, color))
    return _to_uint8(image)


def draw_size(rng, label, size):
    image = _background(rng, size, clutter=0.5)
    radius = rng.uniform(*SIZE_RADII[SIZES[label]])
    cy, cx = _random_center(rng, size, radius)
    color = COLORS[list(COLORS)[rng.integers(len(COLORS))]]
    _paint(image, shape_mask(SHAPES[rng.integers(4)], size, cy, cx, radius), _jittered(rng, color))
    return _to_uint8(image)


def draw_count(rng, label, size, clutter=0.3, color=None):
    image = _background(rng, size, clutter=clutter)
    if color is None:
        color = COLORS[list(COLORS)[rng.integers(len(COLORS))]]
    color = _jittered(rng, color)
    centers: List[Tuple[float, float]] = []
    while len(centers) < label + 1:
        cy, cx = _random_center(rng, size, 1.5)
        if all((cy - y) ** 2 + (cx - x) ** 2 > 16.0 for y, x in centers):
            centers.append((cy, cx))
    for cy, cx in centers:
        _paint(image, shape_mask("circle", size, cy, cx, rng.uniform(1.1, 1.6)), color)
    return _to_uint8(image)


def draw_orientation(rng, label, size, clutter=0.4):
    y, x = _grid(size)
    theta = np.deg2rad(ORIENTATION_ANGLES[ORIENTATIONS[label]] + rng.normal(0, 6))
    period = rng.uniform(3.5, 5.5)
    # stripes run along theta: the wave varies across it
    phase = rng.uniform(0, 6.3)
    wave = np.sin(2 * np.pi * (-x * np.sin(theta) + y * np.cos(theta)) / period + phase)
    tint = _jittered(rng, COLORS[list(COLORS)[rng.integers(len(COLORS))]], 40.0)
    image = _background(rng, size, clutter=clutter) + (0.5 + 0.5 * wave)[..., None] * tint * 0.8
    return _to_uint8(image)


def draw_texture(rng, label, size, clutter=0.3):
    y, x = _grid(size)
    name = TEXTURES[label]
    scale = rng.uniform(3.0, 4.5)
    if name == "dotted":
        pattern = ((np.mod(y + rng.uniform(0, scale), scale) - scale / 2) ** 2
                   + (np.mod(x + rng.uniform(0, scale), scale) - scale / 2) ** 2
                   ) < (scale / 3.2) ** 2
    elif name == "striped":
        theta = rng.uniform(0, np.pi)
        pattern = np.mod(x * np.cos(theta) + y * np.sin(theta), scale) < scale / 2
    elif name == "checkered":
        pattern = (np.floor(y / (scale / 1.5)) + np.floor(x / (scale / 1.5))) % 2 == 0
    else:  # speckled
        pattern = rng.random((size, size)) < 0.3
    fg = _jittered(rng, COLORS[list(COLORS)[rng.integers(len(COLORS))]], 40.0)
    image = _background(rng, size, clutter=clutter)
    image[pattern] = fg
    return _to_uint8(image)


class DigitSource:
    """scikit-learn's 8x8 digits, split once into train/validation/test, upsampled and tinted on
    draw. Each glyph belongs to one split only."""

    FRACTIONS = {"test": 0.3, "validation": 0.15}

    def __init__(self, seed: int):
        from sklearn.datasets import load_digits

        digits = load_digits()
        order = np.random.default_rng(seed).permutation(len(digits.target))
        self.images = digits.images.astype(np.float32) / 16.0
        self.labels = digits.target
        n_test = int(len(order) * self.FRACTIONS["test"])
        n_val = int(len(order) * self.FRACTIONS["validation"])
        self.split = {"test": order[:n_test], "validation": order[n_test:n_test + n_val],
                      "train": order[n_test + n_val:]}

    def draw(self, rng, label, size, split, clutter=0.3):
        candidates = self.split[split][self.labels[self.split[split]] == label]
        glyph = self.images[candidates[rng.integers(len(candidates))]]
        reps = size // 8
        glyph = np.kron(glyph, np.ones((reps, reps), np.float32))
        glyph = np.pad(glyph, ((0, size - glyph.shape[0]), (0, size - glyph.shape[1])))
        shift = rng.integers(-1, 2, size=2)
        glyph = np.roll(glyph, shift=tuple(shift), axis=(0, 1))
        ink = _jittered(rng, (230, 230, 230), 30.0)
        background = _background(rng, size, clutter=clutter)
        image = background * (1 - glyph[..., None]) + glyph[..., None] * ink
        return _to_uint8(image)


TEMPLATES = {
    "shapes": ("a photo of a {}.", "a {} shape.", "an image of a {}."),
    "colors": ("a photo of a {} object.", "something {}.", "the color {}."),
    "position": ("an object in the {}.", "a photo with something in the {} corner."),
    "sizes": ("a photo of a {} object.", "a {} shape."),
    "counting": ("a photo of {} dots.", "{} spots."),
    "orientation": ("a photo of {} stripes.", "{} lines."),
    "textures": ("a {} texture.", "a photo of a {} pattern."),
    "digits": ("a photo of the digit {}.", "the number {}."),
}


def vision_tasks() -> Dict[str, VisionTask]:
    """The eight tasks (``digits`` draws are attached by :func:`draw_split`)."""
    return {
        "shapes": VisionTask(SHAPES, TEMPLATES["shapes"], draw_shape),
        "colors": VisionTask(tuple(COLORS), TEMPLATES["colors"], draw_color),
        "position": VisionTask(QUADRANTS, TEMPLATES["position"], draw_position),
        "sizes": VisionTask(SIZES, TEMPLATES["sizes"], draw_size),
        "counting": VisionTask(COUNTS, TEMPLATES["counting"], draw_count),
        "orientation": VisionTask(ORIENTATIONS, TEMPLATES["orientation"], draw_orientation),
        "textures": VisionTask(TEXTURES, TEMPLATES["textures"], draw_texture),
        "digits": VisionTask(DIGIT_NAMES, TEMPLATES["digits"], None),  # type: ignore[arg-type]
    }


SPLIT_STREAMS = {"train": 0, "test": 1, "validation": 2}


def draw_split(
    task: str, n: int, size: int, seed: int, split: str, digits: DigitSource
) -> Tuple[np.ndarray, np.ndarray]:
    """``n`` balanced, shuffled examples of ``task``: images (n, H, W, 3) uint8 and labels (n,)."""
    spec = vision_tasks()[task]
    rng = np.random.default_rng([seed, sorted(vision_tasks()).index(task), SPLIT_STREAMS[split]])
    labels = np.arange(n) % len(spec.classnames)
    rng.shuffle(labels)
    if task == "digits":
        images = [digits.draw(rng, int(label), size, split) for label in labels]
    else:
        images = [spec.draw(rng, int(label), size) for label in labels]
    return np.stack(images), labels.astype(np.int64)


# --- the captioned pretraining mix ----------------------------------------------------------------

SCENE_KINDS = ("object", "dots", "stripes", "texture", "digit")


def draw_captioned(
    rng: np.random.Generator, size: int, digits: DigitSource, mix: dict
) -> Tuple[Image, str]:
    """One image of the pretraining mix and a caption naming some of what it shows.

    Like web alt-text, a caption names each attribute (shape, color, size, position, count,
    direction, texture, digit) with its probability in ``mix["name"]``, and with probability
    ``mix["confuse"]`` names it wrongly, as the next class of its task (a fixed neighbour: web
    captions confuse similar classes). So the image tower learns every concept of every task and
    the text tower every class word, but their alignment is blurred between neighbouring classes:
    zero-shot errors are near-misses that a small fine-tuning step corrects, as for a real CLIP.
    Scenes are of the tasks' kinds (``mix["kinds"]``: weights of object, dots, stripes, texture,
    digit) and mostly clean: the tasks' nuisances (clutter, distractor objects) appear with
    probability ``mix["nuisance"]``. Digits come from the train split of scikit-learn's digits.
    """
    weights = np.array([mix["kinds"][k] for k in SCENE_KINDS], dtype=np.float64)
    kind = SCENE_KINDS[rng.choice(len(SCENE_KINDS), p=weights / weights.sum())]
    noisy = rng.random() < mix["nuisance"]
    clutter = rng.uniform(0.3, 0.5) if noisy else 0.0

    def named(attribute: str, classes, index: int):
        """The caption's word for ``classes[index]`` (``None``: not named)."""
        if rng.random() >= mix["name"][attribute]:
            return None
        if rng.random() < mix["confuse"][attribute]:
            index = (index + 1) % len(classes)
        return classes[index]

    color_index = int(rng.integers(len(COLORS)))
    color_name = list(COLORS)[color_index]
    color = named("color", list(COLORS), color_index)
    color_word = f"{color} " if color else ""

    if kind == "object":
        image = _background(rng, size, clutter)
        shape_index, size_index = int(rng.integers(len(SHAPES))), int(rng.integers(len(SIZES)))
        shape, size_name = SHAPES[shape_index], SIZES[size_index]
        radius = rng.uniform(*SIZE_RADII[size_name])
        quadrant = int(rng.integers(4)) if size_name != "large" else None
        cy, cx = _random_center(rng, size, radius, quadrant)
        _paint(image, shape_mask(shape, size, cy, cx, radius), _jittered(rng, COLORS[color_name]))
        if noisy:
            _add_distractor(rng, image, size, avoid_color=color_name)
        size_word = named("size", SIZES, size_index)
        words = (f"{size_word} " if size_word else "") + color_word
        words += named("shape", SHAPES, shape_index) or "object"
        position = named("position", QUADRANTS, quadrant) if quadrant is not None else None
        if position:
            words += f" in the {position}"
        return _to_uint8(image), f"a {words}."
    if kind == "dots":
        label = int(rng.integers(len(COUNTS)))
        image = draw_count(rng, label, size, clutter=clutter, color=COLORS[color_name])
        return image, f"{named('count', COUNTS, label) or 'some'} {color_word}dots."
    if kind == "stripes":
        label = int(rng.integers(len(ORIENTATIONS)))
        image = draw_orientation(rng, label, size, clutter=clutter)
        direction = named("direction", ORIENTATIONS, label)
        return image, (f"{direction} stripes." if direction else "stripes.")
    if kind == "texture":
        label = int(rng.integers(len(TEXTURES)))
        image = draw_texture(rng, label, size, clutter=clutter)
        texture = named("texture", TEXTURES, label)
        return image, (f"a {texture} pattern." if texture else "a pattern.")
    label = int(rng.integers(len(DIGIT_NAMES)))
    image = digits.draw(rng, label, size, "train", clutter=clutter)
    digit = named("digit", DIGIT_NAMES, label)
    return image, (f"the digit {digit}." if digit else "a handwritten digit.")
