"""Miniature X2I world: determinism, task coverage, splits, exact maps, writer, tokenizer and scorer."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from omnigen.miniworld import scene as world
from omnigen.miniworld import score, tasks
from omnigen.miniworld import text as wording
from omnigen.miniworld import world as mw

TAG = re.compile(r"<img><\|image_(\d+)\|></img>")
MAP_TASKS = ("cv/edges", "cv/segmentation", "cv/depth", "cv/referring")


@pytest.fixture(scope="module")
def train_200() -> list[mw.Sample]:
    return mw.generate(200, seed=0, split="train")


def _fingerprint(samples: list[mw.Sample]) -> list[bytes]:
    out = []
    for s in samples:
        images = [*s.input_images, s.output_image]
        if s.few_shot is not None:
            images += [*s.few_shot["input_images"], s.few_shot["output_image"]]
            out.append(s.few_shot["instruction"].encode())
        out += [s.id.encode(), s.task_type.encode(), s.instruction.encode(), json.dumps(s.meta).encode()]
        out += [image.tobytes() for image in images]
    return out


def _scene_output_samples(samples: list[mw.Sample]) -> list[mw.Sample]:
    """Samples whose output image is exactly render_scene(meta["scene"])."""
    return [s for s in samples if s.meta["task"] not in MAP_TASKS and "output_transform" not in s.meta]


# --------------------------------------------------------------------------------------------------
# Generator
# --------------------------------------------------------------------------------------------------


def test_same_seed_same_bytes_and_different_seed_differs() -> None:
    first, again = mw.generate(60, seed=11), mw.generate(60, seed=11)
    assert _fingerprint(first) == _fingerprint(again)
    assert _fingerprint(mw.generate(20, seed=11)) == _fingerprint(first[:20])  # prefixes agree
    other = mw.generate(60, seed=12)
    assert [s.instruction for s in other] != [s.instruction for s in first]
    heldout = mw.generate(60, seed=11, split="heldout")
    assert [s.instruction for s in heldout] != [s.instruction for s in first]


def test_every_task_kind_appears(train_200: list[mw.Sample]) -> None:
    kinds = {s.meta["task"] for s in train_200}
    assert kinds == set(mw.TASK_KINDS)
    assert {s.task_type for s in train_200} == {"t2i", "edit", "subject", "condition", "cv", "few_shot"}
    for s in train_200:
        assert s.meta["few_shot"] == (s.task_type == "few_shot") == (s.few_shot is not None)
        if s.meta["task"] in tasks.FEW_SHOT_ONLY_TASKS:
            assert s.task_type == "few_shot"
        elif s.task_type != "few_shot":
            assert s.meta["task"].split("/")[0] == s.task_type
    wrapped = {s.meta["task"] for s in train_200 if s.few_shot} - set(tasks.FEW_SHOT_ONLY_TASKS)
    assert wrapped, "few-shot samples of regular kinds are expected too"


@pytest.mark.parametrize("size", [16, 32, 64])
def test_tags_match_input_images_and_shapes(size: int) -> None:
    for s in mw.generate(80, seed=3, size=size):
        rows = [(s.instruction, s.input_images, s.output_image)]
        if s.few_shot is not None:
            rows.append((s.few_shot["instruction"], s.few_shot["input_images"], s.few_shot["output_image"]))
        for text, inputs, output in rows:
            assert sorted(int(k) for k in TAG.findall(text)) == list(range(1, len(inputs) + 1)), text
            assert text.count("<|image_") == len(inputs)
            for image in [*inputs, output]:
                assert image.dtype == np.uint8 and image.shape == (size, size, 3)
        json.dumps(s.meta)


def test_withheld_pairs_only_in_compositional(train_200: list[mw.Sample]) -> None:
    for s in [*train_200, *mw.generate(200, seed=0, split="heldout")]:
        assert not mw.meta_pairs(s.meta) & tasks.WITHHELD_PAIRS, (s.id, s.instruction)
    compositional = mw.generate(120, seed=0, split="compositional")
    assert all(mw.meta_pairs(s.meta) & tasks.WITHHELD_PAIRS for s in compositional)
    seen = set().union(*(mw.meta_pairs(s.meta) for s in compositional))
    assert tasks.WITHHELD_PAIRS <= seen
    phrases = [f"{colour} {shape}" for colour, shape in tasks.WITHHELD_PAIRS]
    assert not any(p in s.instruction for s in train_200 for p in phrases)
    assert any(p in s.instruction for s in compositional for p in phrases)


def test_all_split_draws_the_withheld_pairs_over_represented_but_not_only(train_200: list[mw.Sample]) -> None:
    samples = mw.generate(300, seed=0, split="all")
    pairs = [mw.meta_pairs(s.meta) for s in samples]
    with_withheld = sum(bool(p & tasks.WITHHELD_PAIRS) for p in pairs)
    assert 0.4 * len(samples) < with_withheld < 0.9 * len(samples)  # measured 0.64 on 500 rows
    assert tasks.WITHHELD_PAIRS <= set().union(*pairs)
    objects = [(o["colour"], o["shape"]) for s in samples for o in s.meta["scene"]["objects"]]
    share = sum(pair in tasks.WITHHELD_PAIRS for pair in objects) / len(objects)
    assert share > 3 / 18 + 0.1  # above the uniform share of 3 pairs out of 18
    assert {s.id for s in samples}.isdisjoint(s.id for s in train_200)
    assert mw.generate(5, seed=0, split="all")[0].id.startswith("all-")


def test_weights_change_the_task_mix() -> None:
    samples = mw.generate(300, 1, weights={"t2i/relation": 20, "cv": 0})
    kinds = [s.meta["task"] for s in samples]
    assert kinds.count("t2i/relation") > 0.25 * len(kinds)
    assert not [s for s in samples if s.task_type == "cv"]  # (cv kinds still occur inside few-shot samples)
    with pytest.raises(ValueError, match="weight of 'edit' must be an int >= 0"):
        mw.generate(1, 0, weights={"edit": -1})
    with pytest.raises(ValueError, match="unknown task 'paint'"):
        mw.generate(1, 0, weights={"paint": 1})


def test_tasks_filter_and_bad_arguments() -> None:
    assert {s.meta["task"].split("/")[0] for s in mw.generate(30, 1, tasks=["edit"])} == {"edit"}
    assert {s.meta["task"] for s in mw.generate(5, 1, tasks="cv/edges")} == {"cv/edges"}
    assert all(s.task_type == "few_shot" for s in mw.generate(10, 1, tasks=["few_shot"]))
    with pytest.raises(ValueError, match="split"):
        mw.generate(1, 0, split="test")
    with pytest.raises(ValueError, match="image size"):
        mw.generate(1, 0, size=8)
    with pytest.raises(ValueError, match="unknown task"):
        mw.generate(1, 0, tasks=["paint"])
    with pytest.raises(ValueError, match="no task kinds"):
        mw.generate(1, 0, tasks=[])
    with pytest.raises(ValueError, match="seed"):
        mw.generate(1, -1)


# --------------------------------------------------------------------------------------------------
# Rendering and maps
# --------------------------------------------------------------------------------------------------


def _ring(top: int, left: int, side: int) -> np.ndarray:
    out = np.zeros((16, 16), dtype=bool)
    out[top : top + side, left : left + side] = True
    out[top + 1 : top + side - 1, left + 1 : left + side - 1] = False
    return out


def test_edge_map_exact_on_hand_made_scene() -> None:
    scene = world.Scene(
        "white",
        (
            world.SceneObject("square", "red", "large", 0),  # touches the image border
            world.SceneObject("square", "red", "large", 1),  # touches the first square, same colour
            world.SceneObject("square", "blue", "small", 4),
            world.SceneObject("circle", "green", "large", 8, dot="yellow"),  # dots draw no edges
        ),
    )
    circle = ".###.", "#...#", "#...#", "#...#", ".###."
    expected = _ring(0, 0, 5) | _ring(0, 5, 5) | _ring(6, 6, 3)
    expected[10:15, 10:15] = np.array([[ch == "#" for ch in row] for row in circle])
    assert np.array_equal(world.edge_mask(scene, 16), expected)
    edges = world.edge_map(scene, 16)
    assert np.array_equal(edges[expected], np.full((expected.sum(), 3), 255))
    assert not edges[~expected].any()
    image = world.render_scene(scene, 16)
    assert tuple(image[12, 12]) == world.OBJECT_COLOURS["yellow"] and tuple(image[15, 15]) == (255, 255, 255)


@pytest.mark.parametrize("size", [16, 32, 64])
def test_every_sprite_decodes_to_itself(size: int) -> None:
    for shape in world.SHAPES:
        for obj_size in world.SIZES:
            obj = world.SceneObject(shape, "purple", obj_size, 4, dot="yellow")
            _, cells = score.decode_scene(world.render_scene(world.Scene("beige", (obj,)), size))
            assert cells == {4: score.DecodedObject(shape, "purple", obj_size, "yellow")}


# --------------------------------------------------------------------------------------------------
# Writer and tokenizer
# --------------------------------------------------------------------------------------------------


def test_writer_round_trip(tmp_path) -> None:
    path = mw.write_dataset(tmp_path / "mini", n=40, seed=2, split="heldout", size=16)
    assert path == tmp_path / "mini" / "heldout.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    samples = mw.generate(40, seed=2, split="heldout")
    assert len(rows) == 40 and any("few_shot" in row for row in rows)
    base = {"id", "task_type", "instruction", "input_images", "output_image", "meta"}
    for row, sample in zip(rows, samples):
        assert set(row) in (base, base | {"few_shot"})
        assert row["id"] == sample.id and row["meta"] == sample.meta
        loaded = np.asarray(Image.open(path.parent / row["output_image"]).convert("RGB"))
        assert np.array_equal(loaded, sample.output_image)
        paths = [*row["input_images"], row["output_image"]]
        if "few_shot" in row:
            assert set(row["few_shot"]) == {"instruction", "input_images", "output_image"}
            paths += [*row["few_shot"]["input_images"], row["few_shot"]["output_image"]]
        assert all(not p.startswith("/") and (path.parent / p).is_file() for p in paths)
    assert sorted(p.name for p in path.parent.iterdir()) == ["heldout.jsonl", "images"]


def test_tokenizer_covers_every_instruction(tmp_path, train_200: list[mw.Sample]) -> None:
    tokenizer = mw.build_tokenizer()
    for index, token in enumerate(("<unk>", "<s>", "</s>", "<pad>")):
        assert tokenizer.token_to_id(token) == index
    for token in mw.SPECIAL_TOKENS:
        assert tokenizer.encode(token, add_special_tokens=False).tokens == [token]
    assert tokenizer.encode("a red circle").tokens == ["<s>", "a", "red", "circle"]
    assert tokenizer.encode("zebra").ids == [1, 0]
    samples = [*train_200, *mw.generate(100, 5, "compositional"), *mw.generate(60, 6, size=32)]
    texts = [s.instruction for s in samples] + [s.few_shot["instruction"] for s in samples if s.few_shot]
    texts += list(wording.WRAPPER_TEXTS)
    for text in texts:
        for piece in re.split(r"<\|image_\d+\|>", text):
            assert 0 not in tokenizer.encode(piece).ids, piece
    from tokenizers import Tokenizer

    saved = Tokenizer.from_file(str(mw.save_tokenizer(tmp_path)))
    assert saved.encode(texts[0]).ids == tokenizer.encode(texts[0]).ids


# --------------------------------------------------------------------------------------------------
# Scorer
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def many_samples(train_200: list[mw.Sample]) -> list[mw.Sample]:
    samples = [*train_200, *mw.generate(150, 1, "heldout"), *mw.generate(150, 2, "compositional")]
    return samples + mw.generate(60, 3, size=32) + mw.generate(60, 4, size=64)


def _blank(sample: mw.Sample) -> np.ndarray:
    task = sample.meta["task"]
    colour = (
        world.MAP_BACKGROUND
        if task in MAP_TASKS
        else world.BACKGROUND_COLOURS[sample.meta["scene"]["background"]]
    )
    return np.full_like(sample.output_image, colour)


def test_ground_truth_scores_correct_and_blank_incorrect(many_samples: list[mw.Sample]) -> None:
    for s in many_samples:
        truth = score.score_sample(s.meta, s.output_image, s.output_image)
        assert truth["correct"] is True, (s.meta["task"], truth)
        assert score.score_sample(s.meta, _blank(s), s.output_image)["correct"] is False, s.meta["task"]


def test_object_errors_name_the_first_wrong_attribute(many_samples: list[mw.Sample]) -> None:
    checked = 0
    for s in _scene_output_samples(many_samples):
        if s.meta["task"] == "t2i/relation":
            continue
        size, scene = s.meta["image_size"], world.Scene.from_dict(s.meta["scene"])
        truth = score.score_sample(s.meta, s.output_image, s.output_image)
        assert all(truth[f"wrong_{name}"] == 0 for name in score.OBJECT_ERRORS), truth
        if not scene.objects:
            continue
        obj = scene.objects[0]
        other = next(shape for shape in world.SHAPES if shape != obj.shape)
        reshaped = world.Scene(scene.background, (replace(obj, shape=other), *scene.objects[1:]))
        result = score.score_sample(s.meta, world.render_scene(reshaped, size), s.output_image)
        assert result["wrong_shape"] == 1 and result["correct"] is False, (s.meta["task"], result)
        removed = world.render_scene(world.Scene(scene.background, scene.objects[1:]), size)
        result = score.score_sample(s.meta, removed, s.output_image)
        assert result["wrong_missing"] == 1, (s.meta["task"], result)
        checked += 1
    assert checked > 50


def _recoloured(scene: world.Scene) -> world.Scene:
    obj = scene.objects[0]
    used = {o.colour for o in scene.objects} | {obj.dot}
    colour = next(c for c in world.OBJECT_COLOURS if c not in used)
    return world.Scene(scene.background, (replace(obj, colour=colour), *scene.objects[1:]))


def test_wrong_colour_scores_incorrect(many_samples: list[mw.Sample]) -> None:
    for s in _scene_output_samples(many_samples):
        size, scene = s.meta["image_size"], world.Scene.from_dict(s.meta["scene"])
        wrong = world.render_scene(_recoloured(scene), size)
        result = score.score_sample(s.meta, wrong, s.output_image)
        assert result["correct"] is False, s.meta["task"]
        if s.meta["task"] != "t2i/relation":
            assert result["wrong_colour"] == 1 and result["wrong_shape"] == 0, (s.meta["task"], result)
    for s in [x for x in many_samples if x.meta["task"] == "cv/segmentation"]:
        wrong = world.segmentation_map(
            _recoloured(world.Scene.from_dict(s.meta["scene"])), s.meta["image_size"]
        )
        assert score.score_sample(s.meta, wrong, s.output_image)["correct"] is False
    for s in [
        x for x in many_samples if x.meta["task"] == "cv/referring" and len(x.meta["scene"]["objects"]) > 1
    ]:
        other = 1 - min(s.meta["target_index"], 1)
        wrong = world.highlight_map(world.Scene.from_dict(s.meta["scene"]), other, s.meta["image_size"])
        assert score.score_sample(s.meta, wrong, s.output_image)["correct"] is False


def test_extra_object_scores_incorrect(many_samples: list[mw.Sample]) -> None:
    for s in _scene_output_samples(many_samples):
        scene = world.Scene.from_dict(s.meta["scene"])
        free = next(cell for cell in range(9) if cell not in {o.cell for o in scene.objects})
        colour = next(c for c in world.OBJECT_COLOURS if c not in {o.colour for o in scene.objects})
        extra = world.SceneObject("square", colour, "large", free)
        crowded = world.render_scene(
            world.Scene(scene.background, (*scene.objects, extra)), s.meta["image_size"]
        )
        result = score.score_sample(s.meta, crowded, s.output_image)
        assert result["extra_objects"] == 1 and result["correct"] is False, s.meta["task"]


def test_shifted_objects_fail_position(many_samples: list[mw.Sample]) -> None:
    checked = 0
    for s in many_samples:
        task = s.meta["task"]
        if task == "t2i/relation" or not task.startswith(
            ("t2i/", "edit/", "subject/", "condition/", "cv/edges")
        ):
            continue
        shifted = np.roll(s.output_image, world.cell_size(s.meta["image_size"]), axis=1)
        result = score.score_sample(s.meta, shifted, s.output_image)
        assert result["correct"] is False, (task, result)
        checked += 1
    assert checked > 100


def test_edit_preservation_and_relation_metrics() -> None:
    source = world.Scene(
        "white",
        (world.SceneObject("square", "red", "large", 0), world.SceneObject("circle", "red", "small", 8)),
    )
    target = world.Scene("white", (replace(source.objects[0], colour="purple"), source.objects[1]))
    meta = {"task": "edit/recolour", "few_shot": False, "image_size": 16, "scene": target.to_dict(),
            "input_scenes": [source.to_dict()]}  # fmt: skip
    truth = world.render_scene(target, 16)
    smeared = truth.copy()
    smeared[5:, :8] = world.OBJECT_COLOURS["orange"]  # untouched background painted over
    result = score.score_sample(meta, smeared, truth)
    assert result["preserve_acc"] < score.PRESERVE_THRESHOLD and result["correct"] is False
    relation = {**meta, "task": "t2i/relation", "relation": "left of", "input_scenes": []}
    assert score.score_sample(relation, truth, truth)["correct"] is True
    swapped = world.Scene("white", (replace(target.objects[0], cell=2), replace(target.objects[1], cell=6)))
    result = score.score_sample(relation, world.render_scene(swapped, 16), truth)
    assert result["object_acc"] == 1.0 and result["relation_ok"] is False and result["correct"] is False
    with pytest.raises(ValueError, match="output"):
        score.score_sample(meta, truth[:8], truth)


def test_summarize_groups_by_family_and_task() -> None:
    samples = mw.generate(60, 9)
    records = [score.score_sample(s.meta, s.output_image, s.output_image) for s in samples]
    records += [score.score_sample(s.meta, _blank(s), s.output_image) for s in samples]
    summary = score.summarize(records)
    assert set(summary) == {"t2i", "edit", "subject", "condition", "cv", "few_shot"}
    assert sum(group["n"] for group in summary.values()) == 120
    assert all(group["accuracy"] == 0.5 for group in summary.values())
    assert 0.0 <= summary["t2i"]["background_ok"] <= 1.0
    by_task = score.summarize(records, by="task")
    assert set(by_task) == {s.meta["task"] for s in samples}
    with pytest.raises(ValueError, match="by"):
        score.summarize(records, by="colour")


# --------------------------------------------------------------------------------------------------
# Phrasing: synonyms, optional sizes, held-out phrasings
# --------------------------------------------------------------------------------------------------


def _words(texts) -> set[str]:
    tokenizer = mw.build_tokenizer()
    return {t for text in texts for piece in TAG.split(text) for t in tokenizer.encode(piece).tokens}


def test_held_out_phrasings_only_in_the_phrasing_split_and_made_of_training_words() -> None:
    train = mw.generate(400, 0, "train")
    phrasing = mw.generate(200, 0, "phrasing")
    for samples, held in ((train, False), (mw.generate(100, 0, "compositional"), False), (phrasing, True)):
        for s in samples:
            key, variant, frame = s.meta["phrasing"]
            count = (len(wording.COMMANDS[key]), len(wording.FRAMES[key.split("/")[0]]))
            assert wording.is_held_out(variant, frame, *count) == held, (s.id, s.instruction)
    # every held-out combination is new while every word of it occurs in training
    pairs = {tuple(s.meta["phrasing"]) for s in train}
    held_pairs = {tuple(s.meta["phrasing"]) for s in phrasing}
    assert not pairs & held_pairs
    train_texts = [s.instruction for s in train] + [s.few_shot["instruction"] for s in train if s.few_shot]
    assert _words(s.instruction for s in phrasing) <= _words(train_texts)
    assert not {s.instruction for s in phrasing} & set(train_texts)
    assert all(score.score_sample(s.meta, s.output_image, s.output_image)["correct"] for s in phrasing)


def test_held_out_rule_leaves_every_variant_and_frame_in_training() -> None:
    for key, variants in wording.COMMANDS.items():
        frames = wording.FRAMES[key.split("/")[0]]
        pairs = [(v, f) for v in range(len(variants)) for f in range(len(frames))]
        train = [p for p in pairs if not wording.is_held_out(*p, len(variants), len(frames))]
        assert {v for v, _ in train} == set(range(len(variants))), key
        assert {f for _, f in train} == set(range(len(frames))), key
        assert len(train) < len(pairs), key


def test_instructions_use_synonyms_word_orders_and_two_sentences() -> None:
    texts = [s.instruction for s in mw.generate(1500, 2, "train")]
    for phrase in (
        "upper left",
        "grey",
        "in the middle",
        "to the left of",
        "big ",
        "tiny",
        ". the background is",
    ):
        assert any(phrase in t for t in texts), phrase
    assert any(t.startswith("on a ") for t in texts)  # background first
    assert any(t.endswith(".") for t in texts) and not all(t.endswith(".") for t in texts)
    assert any(re.match(r"^(in|at) the [a-z ]+ an? ", t) for t in texts)  # the cell before the object


def test_unnamed_sizes_are_drawn_at_the_default_and_scored_as_either_size() -> None:
    samples = mw.generate(800, 4, "train", tasks=["t2i", "edit/add"])
    free = [(s, o) for s in samples for o in s.meta["scene"]["objects"] if o.get("size_named") is False]
    named = [(s, o) for s in samples for o in s.meta["scene"]["objects"] if "size_named" not in o]
    assert free and named
    assert all(o["size"] == wording.DEFAULT_SIZE for _, o in free)
    size_words = {w for size in world.SIZES for w in wording.SYNONYMS[size]}
    for s in samples:  # an instruction whose objects all have open sizes names no size at all
        new = [o for o in s.meta["scene"]["objects"] if s.meta["task"].startswith("t2i")]
        if new and all(o.get("size_named") is False for o in new):
            assert not set(s.instruction.replace(".", " ").split()) & size_words, s.instruction
    for s, o in free[:20] + named[:20]:  # redraw that object at the other size
        objects = [
            {**x, "size": "small" if x["size"] == "large" else "large"} if x is o else x
            for x in s.meta["scene"]["objects"]
        ]
        other = {**s.meta["scene"], "objects": objects}
        image = world.render_scene(world.Scene.from_dict(other), s.meta["image_size"])
        if s.meta["task"] == "edit/add":
            continue  # its untouched-pixel check would also see the change
        assert score.score_sample(s.meta, image, s.output_image)["correct"] == (o.get("size_named") is False)


def test_placed_prompt_asks_for_the_scene_it_returns() -> None:
    """Rendering the returned scene scores right against it; seeds turn through 8 cells and 4
    backgrounds; unknown names are refused."""
    seen = set()
    for seed in range(8):
        prompt, want = wording.placed_prompt("blue", "circle", seed)
        obj = want["objects"][0]
        assert prompt == f"a blue circle in the {obj['cell']} on a {want['background']} background"
        image = world.render_scene(world.Scene.from_dict(want), 16)
        assert score.scene_scores(want, image)["scene_ok"], prompt
        _, other = wording.placed_prompt("blue", "circle", seed + 1)
        assert not score.scene_scores(other, image)["scene_ok"]
        seen.add((obj["cell"], want["background"]))
    assert len({cell for cell, _ in seen}) == 8 and len({bg for _, bg in seen}) == 4
    assert (
        wording.placed_prompt("red", "circle", 0)[0] == "a red circle in the top left on a white background"
    )
    with pytest.raises(ValueError, match="colour must be one of"):
        wording.placed_prompt("pink", "circle", 0)
