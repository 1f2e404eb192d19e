"""Procedural urban scenes with exact per-pixel labels (Cityscapes conventions).

Every shape is painted into the RGB image and into the label map in the same order, so the
label of a pixel is exactly the class of the last shape drawn over it. The traffic light's
pole is painted as ``pole`` (the light's mask excludes it) and a rider's bicycle as ``bicycle``
(the rider's mask excludes it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from skimage import draw

from daamlab.toyworld import labels as L

DEFAULT_SIZE = 128


@dataclass
class Scene:
    """A rendered scene: image uint8 [S, S, 3], labels uint8 [S, S], what it contains."""

    image: np.ndarray
    labels: np.ndarray
    main_class: str
    present: set[int] = field(default_factory=set)  # label ids with at least one pixel
    attributes: dict[str, str] = field(default_factory=dict)  # word -> colour name, e.g. {"car": "red", "sky": "orange"}
    brightness: float = 1.0  # the factor every colour of the scene was painted with

    def mask(self, class_name: str) -> np.ndarray:
        return self.labels == L.IDS[class_name]

    def coverage(self, class_name: str) -> float:
        return float(self.mask(class_name).mean())


class Canvas:
    """An RGB image and its label map, painted together."""

    def __init__(self, size: int, brightness: float) -> None:
        self.size = size
        self.brightness = brightness
        self.image = np.zeros((size, size, 3), np.float32)
        self.labels = np.full((size, size), L.SKY, np.uint8)

    def paint(self, rows: np.ndarray, cols: np.ndarray, color, label: int) -> None:
        inside = (rows >= 0) & (rows < self.size) & (cols >= 0) & (cols < self.size)
        rows, cols = rows[inside], cols[inside]
        self.image[rows, cols] = np.asarray(color, np.float32) * self.brightness
        self.labels[rows, cols] = label

    def rectangle(self, top, left, bottom, right, color, label) -> None:
        rows, cols = draw.rectangle((int(round(top)), int(round(left))), (int(round(bottom)), int(round(right))),
                                    shape=self.image.shape[:2])
        self.paint(rows.ravel(), cols.ravel(), color, label)

    def polygon(self, ys, xs, color, label) -> None:
        rows, cols = draw.polygon(np.asarray(ys), np.asarray(xs), shape=self.image.shape[:2])
        self.paint(rows, cols, color, label)

    def disk(self, y, x, radius, color, label) -> None:
        rows, cols = draw.disk((y, x), max(radius, 0.8), shape=self.image.shape[:2])
        self.paint(rows, cols, color, label)

    def ring(self, y, x, radius, width, color, label) -> None:
        outer = draw.disk((y, x), max(radius, 1.0), shape=self.image.shape[:2])
        keep = (outer[0] - y) ** 2 + (outer[1] - x) ** 2 >= max(radius - width, 0) ** 2
        self.paint(outer[0][keep], outer[1][keep], color, label)

    def line(self, y0, x0, y1, x1, width, color, label) -> None:
        length = max(np.hypot(y1 - y0, x1 - x0), 1e-6)
        ny, nx = -(x1 - x0) / length * width / 2, (y1 - y0) / length * width / 2
        self.polygon([y0 + ny, y1 + ny, y1 - ny, y0 - ny], [x0 + nx, x1 + nx, x1 - nx, x0 - nx], color, label)

    def to_uint8(self) -> np.ndarray:
        return np.clip(self.image, 0, 255).astype(np.uint8)


def _color(rng: np.random.Generator, base, spread: float = 30.0):
    return np.clip(np.asarray(base, np.float32) + rng.uniform(-spread, spread, 3), 0, 255)


VIVID = {"red": (200, 30, 30), "blue": (30, 60, 190), "yellow": (230, 200, 40), "white": (240, 240, 240),
         "black": (30, 30, 30), "green": (40, 150, 60), "grey": (150, 150, 160)}


def _vivid(rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """A vivid colour for a car, a shirt or a bicycle frame, and its name."""
    name = list(VIVID)[rng.integers(len(VIVID))]
    return _color(rng, VIVID[name], 20), name


# -- named background colours (render_scene(attributes=True)) -------------------------------------
# Each background thing takes one named colour per scene; the base colours stay clear of one another within
# a thing so that a caption's colour word says what the pixels show. The sky has a top and a bottom colour.
BACKGROUND_COLOURS = {
    "sky": {"blue": ((90, 150, 225), (185, 210, 240)), "grey": ((130, 135, 145), (195, 195, 200)),
            "orange": ((215, 115, 70), (250, 200, 140))},
    "building": {"grey": (170, 170, 165), "brown": (140, 105, 80), "red": (170, 65, 50), "white": (228, 225, 218),
                 "yellow": (210, 180, 90)},
    "road": {"grey": (100, 100, 105), "black": (35, 35, 40)},
    "sidewalk": {"grey": (175, 170, 160), "red": (180, 95, 80), "yellow": (205, 185, 125)},
    "tree": {"green": (50, 120, 50), "orange": (205, 115, 40)},
}


def _background_colours(rng: np.random.Generator) -> dict[str, str]:
    """One colour name per background thing, e.g. {"sky": "orange", "building": "red", ...}."""
    return {thing: list(colours)[rng.integers(len(colours))] for thing, colours in BACKGROUND_COLOURS.items()}


# -- background ---------------------------------------------------------------------------------
BACKGROUND_THINGS = tuple(L.BACKGROUND_WORDS.values())  # what a varied scene may leave out


def _left_out(rng: np.random.Generator, variety: float) -> frozenset[str]:
    """The background things a scene leaves out, each with probability ``variety``; a scene keeps at least
    one of building and sky (they share the upper half) and one of road and sidewalk (the ground)."""
    left_out = {thing for thing in BACKGROUND_THINGS if rng.random() < variety}
    for pair in (("building", "sky"), ("road", "sidewalk")):
        if set(pair) <= left_out:
            left_out.discard(pair[rng.integers(2)])
    return frozenset(left_out)


def _background(canvas: Canvas, rng: np.random.Generator, horizon: float, curb: float,
                left_out: frozenset[str] = frozenset(), colours: dict[str, str] | None = None) -> None:
    """Sky, buildings, sidewalk and road; with ``colours`` (thing -> name in ``BACKGROUND_COLOURS``) each thing
    takes its named colour, drawing the same random numbers, so that the scene keeps its layout."""
    S = canvas.size
    base = {thing: BACKGROUND_COLOURS[thing][name] for thing, name in (colours or {}).items()}
    top, bottom = base.get("sky", ((90, 150, 225), (185, 210, 240)))
    sky_top, sky_bottom = _color(rng, top, 25), _color(rng, bottom, 20)
    sky_end = curb if "building" in left_out else horizon  # no buildings: open sky down to the curb
    for row in range(int(sky_end) + 1):
        t = row / max(sky_end, 1)
        canvas.rectangle(row, 0, row, S - 1, sky_top * (1 - t) + sky_bottom * t, L.SKY)
    x = -rng.uniform(0, 10)
    while x < S and "building" not in left_out:
        width = rng.uniform(0.15, 0.35) * S
        height = horizon + 1 if "sky" in left_out else rng.uniform(0.15, 0.45) * S  # no sky: walls to the top
        wall = rng.choice([(150, 120, 100), (170, 170, 165), (120, 110, 130), (190, 160, 120)])
        wall = _color(rng, base.get("building", wall), 20)
        canvas.rectangle(horizon - height, x, curb, x + width, wall, L.BUILDING)
        window = _color(rng, (60, 80, 110), 15)
        for wy in np.arange(horizon - height + 4, curb - 6, 8):
            for wx in np.arange(x + 3, x + width - 4, 7):
                canvas.rectangle(wy, wx, wy + 3, wx + 3, window, L.BUILDING)
        x += width
    road_top = curb if "sidewalk" in left_out else S if "road" in left_out else curb + (S - curb) * 0.22
    canvas.rectangle(curb, 0, road_top, S - 1, _color(rng, base.get("sidewalk", (175, 170, 160)), 12), L.SIDEWALK)
    if "road" not in left_out:
        canvas.rectangle(road_top, 0, S - 1, S - 1, _color(rng, base.get("road", (85, 85, 90)), 10), L.ROAD)
        for x in np.arange(rng.uniform(0, 20), S, 24):
            canvas.rectangle((road_top + S) / 2, x, (road_top + S) / 2 + 1, x + 10, (220, 220, 210), L.ROAD)


def _tree(canvas: Canvas, rng: np.random.Generator, ground: float, x: float, scale: float, leaves=(50, 120, 50)) -> None:
    trunk = _color(rng, (90, 60, 40), 10)
    canvas.rectangle(ground - 10 * scale, x - 1.2 * scale, ground, x + 1.2 * scale, trunk, L.VEGETATION)
    leaves = _color(rng, leaves, 20)
    for dy, dx in ((-14, 0), (-11, -4), (-11, 4)):
        canvas.disk(ground + dy * scale, x + dx * scale, 6 * scale, leaves, L.VEGETATION)


# -- objects ------------------------------------------------------------------------------------
def _car(canvas: Canvas, rng: np.random.Generator, ground: float, x: float, scale: float) -> str:
    body, name = _vivid(rng)
    length, height = 34 * scale, 9 * scale
    facing = rng.choice([-1, 1])
    canvas.rectangle(ground - height - 3 * scale, x - length / 2, ground - 3 * scale, x + length / 2, body, L.CAR)
    cabin_front, cabin_back = x + facing * length * 0.15, x - facing * length * 0.3
    canvas.polygon([ground - height - 3 * scale, ground - height - 10 * scale, ground - height - 10 * scale, ground - height - 3 * scale],
                   [cabin_back - facing * 3 * scale, cabin_back, cabin_front, cabin_front + facing * 5 * scale], body, L.CAR)
    glass = _color(rng, (120, 160, 190), 10)
    canvas.polygon([ground - height - 4 * scale, ground - height - 8.5 * scale, ground - height - 8.5 * scale, ground - height - 4 * scale],
                   [cabin_back - facing * 1.5 * scale, cabin_back + facing * scale, cabin_front - facing * scale, cabin_front + facing * 3 * scale], glass, L.CAR)
    for wheel_x in (x - length * 0.3, x + length * 0.3):
        canvas.disk(ground - 3.5 * scale, wheel_x, 3.8 * scale, (25, 25, 25), L.CAR)
    return name


def _person_shape(canvas: Canvas, rng: np.random.Generator, feet: float, x: float, scale: float, label: int,
                  seated: bool) -> tuple[float, str]:
    """Draws a person standing on ``feet`` (or seated with hips at ``feet``); returns the hip row and the shirt's colour."""
    skin = _color(rng, rng.choice([(230, 190, 160), (170, 120, 90), (110, 75, 55)]), 10)
    (shirt, shirt_name), trousers = _vivid(rng), _color(rng, rng.choice([(40, 50, 90), (50, 50, 50), (120, 100, 70)]), 15)
    leg = 0 if seated else 13 * scale
    hips = feet - leg
    if not seated:
        canvas.line(hips, x - 1.5 * scale, feet, x - 3 * scale, 2.6 * scale, trousers, label)
        canvas.line(hips, x + 1.5 * scale, feet, x + 3 * scale, 2.6 * scale, trousers, label)
    canvas.rectangle(hips - 12 * scale, x - 3.2 * scale, hips, x + 3.2 * scale, shirt, label)
    canvas.line(hips - 11 * scale, x - 3 * scale, hips - 3 * scale, x - 5 * scale, 2 * scale, shirt, label)
    canvas.line(hips - 11 * scale, x + 3 * scale, hips - 3 * scale, x + 5 * scale, 2 * scale, shirt, label)
    canvas.disk(hips - 15.5 * scale, x, 3.3 * scale, skin, label)
    return hips, shirt_name


def _person(canvas: Canvas, rng: np.random.Generator, ground: float, x: float, scale: float) -> str:
    return _person_shape(canvas, rng, ground, x, scale, L.PERSON, seated=False)[1]


def _rider(canvas: Canvas, rng: np.random.Generator, ground: float, x: float, scale: float) -> str:
    frame, _ = _vivid(rng)
    radius = 5.5 * scale
    back, front = x - 9 * scale, x + 9 * scale
    axle = ground - radius
    for wheel_x in (back, front):
        canvas.ring(axle, wheel_x, radius, 1.4 * scale, (30, 30, 30), L.BICYCLE)
    seat = (axle - 8 * scale, x - 2 * scale)
    bars = (axle - 10 * scale, front - 2 * scale)
    for (y0, x0), (y1, x1) in (((axle, back), seat), (seat, (axle, x + 1 * scale)), ((axle, x + 1 * scale), (axle, back)),
                               ((axle, x + 1 * scale), bars), (bars, (axle, front)), (seat, bars)):
        canvas.line(y0, x0, y1, x1, 1.3 * scale, frame, L.BICYCLE)
    hips, shirt_name = _person_shape(canvas, rng, seat[0], seat[1], scale * 0.95, L.RIDER, seated=True)
    trousers = _color(rng, (40, 50, 90), 15)
    canvas.line(hips, seat[1], axle - 1 * scale, x + 2 * scale, 2.6 * scale, trousers, L.RIDER)
    return shirt_name


LAMPS = {"red": (230, 40, 30), "yellow": (240, 190, 30), "green": (40, 210, 80)}


def _traffic_light(canvas: Canvas, rng: np.random.Generator, ground: float, x: float, scale: float) -> str:
    pole = _color(rng, (70, 75, 80), 10)
    top = ground - 34 * scale
    canvas.rectangle(top, x - 1.1 * scale, ground, x + 1.1 * scale, pole, L.POLE)
    housing = _color(rng, (35, 35, 35), 10)
    box_top, box_bottom = top - 16 * scale, top + 1 * scale
    canvas.rectangle(box_top, x - 3.8 * scale, box_bottom, x + 3.8 * scale, housing, L.TRAFFIC_LIGHT)
    lit = rng.integers(3)
    for index, color in enumerate(LAMPS.values()):
        shade = color if index == lit else tuple(c * 0.3 for c in color)
        canvas.disk(box_top + (3 + 5 * index) * scale, x, 2 * scale, shade, L.TRAFFIC_LIGHT)
    return list(LAMPS)[lit]  # the lit lamp's colour


DRAWERS = {"car": _car, "person": _person, "rider": _rider, "traffic light": _traffic_light}
_MAIN_SCALE = {"car": (1.2, 2.2), "person": (1.5, 2.6), "rider": (1.6, 2.6), "traffic light": (1.6, 2.5)}


def render_scene(main_class: str, seed: int, size: int = DEFAULT_SIZE, variety: float = 0.0,
                 attributes: bool = False) -> Scene:
    """A seeded urban scene whose main object is ``main_class`` (one of ``labels.MAIN_CLASSES``).

    ``variety`` in [0, 1] is the probability with which the scene leaves out each of the background
    things (``BACKGROUND_THINGS``); at 0 every scene has buildings, sidewalk, road and sky, and a seed
    renders the same scene as before the option existed (the choice draws from its own generator).
    ``Scene.attributes`` names the main object's colour (a car's body, a person's or rider's shirt, a traffic
    light's lit lamp); with ``attributes`` each background thing also takes a named colour
    (``BACKGROUND_COLOURS``, drawn from its own generator: the layout stays the seed's) and is named there.
    """
    if main_class not in DRAWERS:
        raise ValueError(f"unknown class {main_class!r}; choose from {sorted(DRAWERS)}")
    if not 0.0 <= variety <= 1.0:
        raise ValueError(f"variety must lie in [0, 1] (a probability per background thing), got {variety}")
    rng = np.random.default_rng([seed, L.MAIN_CLASSES.index(main_class)])
    left_out = _left_out(np.random.default_rng([seed, L.MAIN_CLASSES.index(main_class), 1]), variety)
    colours = _background_colours(np.random.default_rng([seed, L.MAIN_CLASSES.index(main_class), 2])) if attributes else {}
    unit = size / DEFAULT_SIZE
    canvas = Canvas(size, brightness=rng.uniform(0.7, 1.15))
    horizon = rng.uniform(0.35, 0.5) * size
    curb = horizon + rng.uniform(0.08, 0.14) * size
    _background(canvas, rng, horizon, curb, left_out, colours)
    sidewalk_ground = curb + (size - curb) * 0.2
    for _ in range(0 if "tree" in left_out else rng.integers(0, 3)):
        _tree(canvas, rng, sidewalk_ground, rng.uniform(0, size), unit * rng.uniform(0.9, 1.4),
              BACKGROUND_COLOURS["tree"][colours.get("tree", "green")])
    for _ in range(rng.integers(0, 3)):  # small distractor objects far away
        other = rng.choice([c for c in DRAWERS if c != main_class])
        ground = sidewalk_ground if other in ("person", "traffic light") else rng.uniform(sidewalk_ground + 3, size * 0.8)
        DRAWERS[other](canvas, rng, ground, rng.uniform(0.1, 0.9) * size, unit * rng.uniform(0.45, 0.7))
    scale = unit * rng.uniform(*_MAIN_SCALE[main_class])
    if main_class in ("car", "rider"):
        ground = rng.uniform(0.8, 0.97) * size
    else:
        ground = rng.uniform(sidewalk_ground, size * 0.97)
    main_colour = DRAWERS[main_class](canvas, rng, ground, rng.uniform(0.3, 0.7) * size, scale)
    labels = canvas.labels
    present = set(int(v) for v in np.unique(labels))
    named = {word: colours[word] for label, word in L.BACKGROUND_WORDS.items() if word in colours and label in present}
    return Scene(canvas.to_uint8(), labels.copy(), main_class, present, {main_class: main_colour, **named}, canvas.brightness)
