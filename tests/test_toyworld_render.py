import numpy as np
import pytest

from daamlab.toyworld import labels as L
from daamlab.toyworld.captions import caption, thesis_prompt
from daamlab.toyworld.render import render_scene

SEEDS = range(40)


@pytest.mark.parametrize("name", L.MAIN_CLASSES)
def test_main_object_is_present_at_a_realistic_scale(name):
    coverage = np.array([render_scene(name, seed).coverage(name) for seed in SEEDS])
    assert coverage.min() > 0.01 and coverage.max() < 0.30
    assert np.median(coverage) > 0.025


def test_rendering_is_seeded():
    a, b = render_scene("car", 3), render_scene("car", 3)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.image, render_scene("car", 4).image)


def test_traffic_light_mask_excludes_its_pole():
    for seed in SEEDS:
        scene = render_scene("traffic light", seed)
        light, pole = scene.mask("traffic light"), scene.labels == L.POLE
        assert light.any() and pole.any() and not (light & pole).any()
        # the pole stands below the housing: its lowest pixel is below the light's lowest pixel
        assert np.nonzero(pole)[0].max() > np.nonzero(light)[0].max()


def test_rider_and_bicycle_are_disjoint_and_the_rider_sits_on_it():
    for seed in SEEDS:
        scene = render_scene("rider", seed)
        rider, bicycle = scene.mask("rider"), scene.labels == L.BICYCLE
        assert rider.any() and bicycle.any() and not (rider & bicycle).any()
        rows, cols = np.nonzero(rider)
        b_rows, b_cols = np.nonzero(bicycle)
        assert b_cols.min() <= np.median(cols) <= b_cols.max()  # above the bicycle
        assert rows.min() < b_rows.min()  # the rider's head is above the bicycle


def test_labels_match_the_painted_colours():
    scene = render_scene("person", 5)
    # the sky is painted first and only where nothing else is: every sky pixel is bluish
    sky = scene.labels == L.SKY
    assert (scene.image[sky][:, 2] >= scene.image[sky][:, 0]).all()


def test_captions_only_name_things_present():
    assert thesis_prompt("traffic light") == "a traffic light in an urban environment"
    words_to_labels = {word: label for label, word in L.CAPTION_WORDS.items()}
    for name in L.MAIN_CLASSES:
        for seed in SEEDS:
            scene = render_scene(name, seed)
            text = caption(scene, seed)
            assert name in text
            for word, label in words_to_labels.items():
                if f" {word}" in text:
                    assert (scene.labels == label).sum() >= 20, (text, word)


def test_unknown_class():
    with pytest.raises(ValueError, match="unknown class"):
        render_scene("bus", 0)


def test_variety_zero_renders_the_same_scene_and_full_variety_leaves_things_out():
    """variety 0 is the default scene; at variety 1 every background thing that may go is gone, and each
    scene keeps one of building/sky and one of road/sidewalk (the two pairs share their part of the image)."""
    from daamlab.toyworld.render import BACKGROUND_THINGS

    words_to_labels = {word: label for label, word in L.BACKGROUND_WORDS.items()}
    assert set(BACKGROUND_THINGS) == {"building", "sidewalk", "road", "tree", "sky"}
    assert np.array_equal(render_scene("car", 3, variety=0.0).labels, render_scene("car", 3).labels)
    for seed in SEEDS:
        labels = render_scene(L.MAIN_CLASSES[seed % 4], seed, variety=1.0).labels
        present = {word for word, label in words_to_labels.items() if (labels == label).any()}
        assert "tree" not in present
        assert len(present & {"building", "sky"}) == 1 and len(present & {"road", "sidewalk"}) == 1, present
    with pytest.raises(ValueError, match="variety must lie in"):
        render_scene("car", 0, variety=1.5)


def test_varied_scenes_vary_each_background_thing():
    from daamlab.toyworld.dataset import render_scene_set

    scenes = render_scene_set(80, 64, variety=0.3, progress=False)
    for label in (L.BUILDING, L.SIDEWALK, L.ROAD, L.VEGETATION, L.SKY):
        share = np.mean([(labels == label).sum() >= 20 for labels in scenes.labels])
        assert 0.3 < share < 0.95, (L.NAMES[label], share)


def test_background_captions_name_present_things_and_absent_ones_with_no():
    """Every background word in a caption of a varied scene is there when named plainly and has fewer
    than 20 pixels when named with "no"; spatial captions follow the same rule."""
    import re

    from daamlab.toyworld.captions import spatial_caption

    seen = {"present": 0, "absent": 0}
    for seed in SEEDS:
        scene = render_scene(L.MAIN_CLASSES[seed % 4], seed, variety=0.4)
        texts = [caption(scene, seed * 3 + k, name_background=True) for k in range(3)]
        texts.append(spatial_caption(scene.labels, scene.main_class, np.random.default_rng(seed), name_absent=1.0))
        for text in texts:
            for label, word in L.BACKGROUND_WORDS.items():
                pixels = (scene.labels == label).sum()
                if re.search(rf"\bno {word}\b", text):
                    seen["absent"] += 1
                    assert pixels < 20, (text, word, pixels)
                elif re.search(rf"\b{word}\b", text):
                    seen["present"] += 1
                    assert pixels >= 20, (text, word, pixels)
    assert seen["present"] > 20 and seen["absent"] > 20, seen


def test_attributes_keep_the_layout_and_paint_each_background_thing_its_named_colour():
    """attributes=True changes no label and no main-object pixel; each background thing's typical pixel,
    divided by the scene's brightness, lies within the renderer's spread of its named base colour (the
    spreads: sky 25, building 20, sidewalk 12, road 10, leaves 20; +2 for rounding), and the default
    scene names only the main object's colour."""
    from daamlab.toyworld.render import BACKGROUND_COLOURS, LAMPS, VIVID

    spread = {"building": 20, "sidewalk": 12, "road": 10, "tree": 20}
    seen = {thing: set() for thing in BACKGROUND_COLOURS}
    labels_of_words = {word: label for label, word in L.BACKGROUND_WORDS.items()}
    for seed in range(24):
        name = L.MAIN_CLASSES[seed % 4]
        plain, coloured = render_scene(name, seed), render_scene(name, seed, attributes=True)
        assert np.array_equal(plain.labels, coloured.labels)
        main = plain.mask(name)
        assert np.array_equal(plain.image[main], coloured.image[main])
        assert set(plain.attributes) == {name} and plain.attributes[name] in (LAMPS if name == "traffic light" else VIVID)
        assert coloured.attributes[name] == plain.attributes[name]
        for thing, colour in coloured.attributes.items():
            if thing == name:
                continue
            seen[thing].add(colour)
            pixels = coloured.image[coloured.labels == labels_of_words[thing]]
            if thing == "sky":  # the top row is the gradient's top colour
                typical, base, tolerance = coloured.image[0][coloured.labels[0] == L.SKY], BACKGROUND_COLOURS["sky"][colour][0], 25
            else:
                typical, base, tolerance = pixels, BACKGROUND_COLOURS[thing][colour], spread[thing]
            median = np.median(typical.astype(np.float32), axis=0)
            unclipped = median < 255
            offset = np.abs(median / coloured.brightness - np.asarray(base))[unclipped]
            assert (offset <= tolerance + 2).all(), (seed, thing, colour, median, coloured.brightness)
    assert all(len(names) >= 2 for names in seen.values()), seen


def test_attribute_captions_name_each_colour_with_its_own_thing():
    """Every "<colour> <word>" in an attribute caption is the colour the scene gave that word; the main
    object is named with its colour in most captions, and captions without attributes name no colour."""
    import re

    from daamlab.toyworld.render import BACKGROUND_COLOURS, LAMPS, VIVID

    colours = set(VIVID) | set(LAMPS) | {c for names in BACKGROUND_COLOURS.values() for c in names}
    words = list(L.MAIN_CLASSES) + list(L.BACKGROUND_WORDS.values())
    pattern = re.compile(rf"\b({'|'.join(sorted(colours))}) ({'|'.join(words)})\b")
    named_main, total = 0, 0
    for seed in SEEDS:
        scene = render_scene(L.MAIN_CLASSES[seed % 4], seed, attributes=True)
        for k in range(3):
            text = caption(scene, seed * 3 + k, name_attributes=True)
            pairs = pattern.findall(text)
            assert all(scene.attributes[word] == colour for colour, word in pairs), (text, scene.attributes)
            named_main += any(word == scene.main_class for _, word in pairs)
            total += 1
            assert not pattern.search(caption(scene, seed * 3 + k)), "a caption without name_attributes names a colour"
            assert re.search(r"\ba [aeiou]", text) is None and re.search(r"\ban [^aeiou]", text) is None, text
    assert 0.5 < named_main / total < 0.95, named_main / total
