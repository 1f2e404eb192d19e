"""Label ids of the toy urban world: Cityscapes train ids for the classes it draws."""

from __future__ import annotations

ROAD = 0
SIDEWALK = 1
BUILDING = 2
POLE = 5
TRAFFIC_LIGHT = 6
VEGETATION = 8
SKY = 10
PERSON = 11
RIDER = 12
CAR = 13
BICYCLE = 18

NAMES = {
    ROAD: "road",
    SIDEWALK: "sidewalk",
    BUILDING: "building",
    POLE: "pole",
    TRAFFIC_LIGHT: "traffic light",
    VEGETATION: "vegetation",
    SKY: "sky",
    PERSON: "person",
    RIDER: "rider",
    CAR: "car",
    BICYCLE: "bicycle",
}
IDS = {name: label for label, name in NAMES.items()}

# The thesis' four object classes, and the word its experiments attribute for each.
MAIN_CLASSES = ("car", "person", "traffic light", "rider")
CLASS_WORD = {"car": "car", "person": "person", "traffic light": "light", "rider": "rider"}

# How captions name the background things a scene may contain.
CAPTION_WORDS = {BUILDING: "building", VEGETATION: "tree", SIDEWALK: "sidewalk", ROAD: "road", BICYCLE: "bicycle"}

# The background things and their words: the open-vocabulary words of the diagnostics, the things a varied scene
# may leave out (``render.render_scene(variety=...)``), and how captions name them.
BACKGROUND_WORDS = {VEGETATION: "tree", ROAD: "road", SIDEWALK: "sidewalk", BUILDING: "building", SKY: "sky"}
