"""Tests for the X2I reader, image-tag rule, few-shot composition and the sampling-side data policy."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from omnigen.text.tags import image_tag, validate_image_tags
from omnigen.training.sampling_data import (
    ConditionDropout,
    ShardedBucketSampler,
    bucket_for,
    make_buckets,
)
from omnigen.training.x2i import (
    FewShot,
    X2IFormatError,
    X2ISample,
    compose_instruction,
    read_x2i,
)

TAG1, TAG2, TAG3 = image_tag(1), image_tag(2), image_tag(3)


def _png(path: Path, size: tuple[int, int] = (8, 6)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (120, 30, 200)).save(path)
    return path


def _write_jsonl(path: Path, rows: list[object]) -> Path:
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture()
def data_dir(tmp_path: Path) -> Path:
    for name in ("a.png", "b.png", "out.png", "ex_in.png", "ex_out.png"):
        _png(tmp_path / "img" / name)
    return tmp_path


def _row(**overrides: object) -> dict[str, object]:
    row: dict[str, object] = {
        "instruction": f"Put the cat in {TAG1} on the sofa.",
        "input_images": ["img/a.png"],
        "output_image": "img/out.png",
    }
    row.update(overrides)
    return row


# ------------------------------------------------------------------------------------------------
# Image tags
# ------------------------------------------------------------------------------------------------


def test_validate_image_tags_accepts_any_order() -> None:
    assert validate_image_tags(f"{TAG2} and {TAG1}", 2) == [2, 1]
    assert validate_image_tags("a plain prompt", 0) == []


@pytest.mark.parametrize(
    ("text", "num_images", "expected"),
    [
        (f"only {TAG1}", 2, "missing [2]"),
        (f"{image_tag(0)} {TAG1}", 1, "out of range [0]"),
        (f"{TAG1} and {TAG1}", 1, "duplicated [1]"),
        (f"{TAG1} and {TAG3}", 2, "out of range [3]"),
        (f"{TAG1} and {TAG3}", 3, "missing [2]"),
        ("<img><|image_01|></img>", 1, "leading zeros"),
        (f"a {TAG1}", 0, "no image tags"),
        ("see <|image_1|> here", 1, "without the <img>...</img> wrapper"),
        ("see <img><|image_1|> here", 1, "<|image_1|>"),
    ],
)
def test_validate_image_tags_rejects(text: str, num_images: int, expected: str) -> None:
    with pytest.raises(ValueError, match="image") as info:
        validate_image_tags(text, num_images)
    assert expected in str(info.value)


def test_validate_image_tags_message_names_found_and_allowed() -> None:
    with pytest.raises(ValueError) as info:
        validate_image_tags(f"{TAG1} {TAG3}", 2)
    message = str(info.value)
    assert "found [<|image_1|>, <|image_3|>]" in message and "<|image_1|>..<|image_2|>" in message


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------


def test_read_valid_file_with_all_fields_and_original_rows(data_dir: Path) -> None:
    original = {
        "task_type": "text_to_image",
        "instruction": "A red apple.",
        "input_images": [],
        "output_image": "img/out.png",
    }
    full = _row(
        task_type="image_edit",
        id="s1",
        weight=2,
        meta={"origin": "x"},
        few_shot={
            "instruction": f"Blur {TAG1}.",
            "input_images": ["img/ex_in.png"],
            "output_image": "img/ex_out.png",
        },
    )
    null_inputs = {"instruction": "A dog.", "input_images": None, "output_image": "img/out.png"}
    path = _write_jsonl(data_dir / "train.jsonl", [original, "", full, null_inputs])
    result = read_x2i(path)
    assert result.skipped == []
    first, second, third = result.samples
    assert first.task_type == "text_to_image" and first.input_images == () and first.weight == 1.0
    assert first.source == f"{path}:1" and first.id == first.source
    assert second.source == f"{path}:3" and second.id == "s1" and second.weight == 2.0
    assert second.input_images == (data_dir / "img" / "a.png",)
    assert second.few_shot == FewShot(
        f"Blur {TAG1}.", (data_dir / "img/ex_in.png",), data_dir / "img/ex_out.png"
    )
    assert third.input_images == () and third.task_type is None


def test_paths_relative_to_file_or_image_root(tmp_path: Path) -> None:
    _png(tmp_path / "data" / "img" / "a.png")
    _png(tmp_path / "data" / "img" / "out.png")
    _png(tmp_path / "root" / "img" / "a.png")
    _png(tmp_path / "root" / "img" / "out.png")
    absolute = _png(tmp_path / "abs.png")
    path = _write_jsonl(tmp_path / "data" / "train.jsonl", [_row(output_image=str(absolute))])
    by_file = read_x2i(path).samples[0]
    assert by_file.input_images == (tmp_path / "data" / "img" / "a.png",)
    assert by_file.output_image == absolute
    by_root = read_x2i(path, image_root=tmp_path / "root").samples[0]
    assert by_root.input_images == (tmp_path / "root" / "img" / "a.png",)
    assert by_root.output_image == absolute


def test_glob_and_list_of_files(data_dir: Path) -> None:
    _write_jsonl(data_dir / "part1.jsonl", [_row()])
    _write_jsonl(data_dir / "part2.jsonl", [_row(), _row()])
    assert len(read_x2i(str(data_dir / "part*.jsonl")).samples) == 3
    assert len(read_x2i([data_dir / "part1.jsonl", data_dir / "part2.jsonl"]).samples) == 3
    with pytest.raises(ValueError, match="directory"):
        read_x2i(data_dir)
    with pytest.raises(FileNotFoundError, match="matched no files"):
        read_x2i(str(data_dir / "none*.jsonl"))


BAD_ROWS = [
    ('{"instruction": "x", ', "invalid JSON"),
    ('["a", "b"]', "expected a JSON object, got array"),
    (_row(colour="red"), "unknown key(s) ['colour']"),
    ({"instruction": "x", "input_images": []}, "missing required key(s) ['output_image']"),
    (_row(instruction=5), "'instruction' must be a string"),
    (_row(input_images="img/a.png"), "'input_images' must be a list"),
    (_row(input_images=[3]), "'input_images[0]' must be a non-empty string"),
    (_row(output_image=None), "'output_image' must be a string"),
    (_row(task_type=7), "'task_type' must be a string"),
    (_row(instruction="no tag here"), "missing [1]"),
    (_row(instruction="bare <|image_1|>"), "without the <img>...</img> wrapper"),
    (_row(input_images=["img/missing.png"]), "image file not found"),
    (_row(weight=0), "'weight' must be a positive"),
    (_row(weight=-1.5), "'weight' must be a positive"),
    (_row(weight="2"), "'weight' must be a positive number"),
    (_row(few_shot={"instruction": "x", "input_images": []}), "missing required key(s) ['output_image']"),
    (
        _row(few_shot={"instruction": TAG1, "input_images": [], "output_image": "img/a.png"}),
        "few_shot.instruction",
    ),
    (_row(meta=[1]), "'meta' must be an object"),
]


@pytest.mark.parametrize(("bad", "reason"), BAD_ROWS)
def test_bad_row_error_names_file_and_line(data_dir: Path, bad: object, reason: str) -> None:
    path = _write_jsonl(data_dir / "train.jsonl", [_row(), "   ", bad, _row()])
    with pytest.raises(X2IFormatError) as info:
        read_x2i(path)
    message = str(info.value)
    assert "train.jsonl:3" in message and reason in message
    assert info.value.source == f"{path}:3"


def test_corrupt_image_is_a_bad_row(data_dir: Path) -> None:
    (data_dir / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not image data at all")
    path = _write_jsonl(data_dir / "train.jsonl", [_row(output_image="img/broken.png")])
    with pytest.raises(X2IFormatError, match=r"train\.jsonl:1: 'output_image': corrupt image"):
        read_x2i(path)
    assert len(read_x2i(path, check_images=False).samples) == 1
    assert len(read_x2i(path, check_images="exists").samples) == 1  # "exists" does not open files
    missing = _write_jsonl(data_dir / "missing.jsonl", [_row(output_image="img/nothing.png")])
    with pytest.raises(X2IFormatError, match="image file not found"):
        read_x2i(missing, check_images="exists")
    with pytest.raises(ValueError, match="check_images must be 'verify', 'exists' or False, got 'all'"):
        read_x2i(path, check_images="all")


def test_duplicate_id_is_a_bad_row(data_dir: Path) -> None:
    path = _write_jsonl(data_dir / "train.jsonl", [_row(id="a"), _row(id="a")])
    with pytest.raises(X2IFormatError, match=r"train\.jsonl:2: duplicate id 'a' \(first used at .*:1\)"):
        read_x2i(path)


def test_skip_mode_collects_and_logs(data_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    rows = [_row(), "not json", _row(weight=0), _row(), _row(input_images=["img/nope.png"])]
    path = _write_jsonl(data_dir / "train.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="omnigen.training.x2i"):
        result = read_x2i(path, on_bad_row="skip")
    assert [s.source for s in result.samples] == [f"{path}:1", f"{path}:4"]
    assert [b.source for b in result.skipped] == [f"{path}:2", f"{path}:3", f"{path}:5"]
    assert "skipped 3 bad X2I row(s) of 5" in caplog.text
    with pytest.raises(ValueError, match="on_bad_row"):
        read_x2i(path, on_bad_row="ignore")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------
# Few-shot composition
# ------------------------------------------------------------------------------------------------


def _sample(instruction: str, inputs: tuple[Path, ...], few_shot: FewShot | None) -> X2ISample:
    return X2ISample(instruction, inputs, Path("out.png"), None, "id", 1.0, few_shot, "f:1")


def test_compose_without_few_shot_is_identity() -> None:
    sample = _sample(f"Edit {TAG1}", (Path("a.png"),), None)
    assert compose_instruction(sample) == (f"Edit {TAG1}", [Path("a.png")])


def test_compose_few_shot_renumbers_query_tags() -> None:
    example = FewShot(f"Merge {TAG2} into {TAG1}", (Path("e1.png"), Path("e2.png")), Path("e_out.png"))
    query = _sample(f"Merge {TAG2} into {TAG1}", (Path("q1.png"), Path("q2.png")), example)
    text, images = compose_instruction(query)
    assert images == [Path(p) for p in ("e1.png", "e2.png", "e_out.png", "q1.png", "q2.png")]
    assert validate_image_tags(text, len(images)) == [2, 1, 3, 5, 4]
    assert text.startswith(f"Here is an example. Instruction: Merge {TAG2} into {TAG1} Output: {TAG3}")
    assert text.endswith(f"Instruction: Merge {image_tag(5)} into {image_tag(4)}")


def test_compose_few_shot_text_to_image_example() -> None:
    example = FewShot("A cat.", (), Path("e_out.png"))
    text, images = compose_instruction(_sample("A dog.", (), example))
    assert images == [Path("e_out.png")] and validate_image_tags(text, 1) == [1]


# ------------------------------------------------------------------------------------------------
# Condition dropout
# ------------------------------------------------------------------------------------------------


def test_condition_dropout_frequencies_and_determinism() -> None:
    dropout = ConditionDropout(p_drop_text=0.1, p_drop_images=0.2, p_drop_both=0.05)
    draws = 4000
    generator = torch.Generator().manual_seed(123)
    choices = [dropout.sample(generator) for _ in range(draws)]
    generator = torch.Generator().manual_seed(123)
    assert choices == [dropout.sample(generator) for _ in range(draws)]
    counts = Counter(choices)
    expected = {"drop_text": 0.1, "drop_images": 0.2, "drop_both": 0.05, "keep": 0.65}
    for choice, probability in expected.items():
        assert abs(counts[choice] / draws - probability) < 0.03, (choice, counts)


@pytest.mark.parametrize("probs", [(-0.1, 0.0, 0.0), (0.5, 0.4, 0.2), (float("nan"), 0.0, 0.0), (1.5, 0, 0)])
def test_condition_dropout_rejects_bad_probabilities(probs: tuple[float, float, float]) -> None:
    with pytest.raises(ValueError, match="p_drop"):
        ConditionDropout(*probs)


def test_condition_dropout_apply() -> None:
    text = f"Put  {TAG2} next to {TAG1},\n  then blur."
    images = ["i1", "i2"]
    assert ConditionDropout.apply(text, images, "keep") == (text, images)
    assert ConditionDropout.apply(text, images, "drop_text") == (f"{TAG1} {TAG2}", images)
    assert ConditionDropout.apply(text, images, "drop_images") == ("Put next to ,\nthen blur.", [])
    assert ConditionDropout.apply(text, images, "drop_both") == ("", [])
    with pytest.raises(ValueError, match="choice"):
        ConditionDropout.apply(text, images, "drop_all")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="missing"):
        ConditionDropout.apply(text, ["i1", "i2", "i3"], "keep")


# ------------------------------------------------------------------------------------------------
# Buckets and sharded sampling
# ------------------------------------------------------------------------------------------------


def test_make_buckets_respects_budget_and_multiple() -> None:
    buckets = make_buckets(256 * 256, multiple=16)
    assert len(buckets) == 7 and (256, 256) in buckets
    for height, width in buckets:
        assert height % 16 == 0 and width % 16 == 0 and height * width <= 256 * 256
    ratios = [w / h for h, w in buckets]
    assert ratios == sorted(ratios)
    with pytest.raises(ValueError, match="max_pixels"):
        make_buckets(100, multiple=16)


def test_bucket_for_closest_ratio_and_tie_to_larger_area() -> None:
    buckets = [(256, 256), (192, 320), (320, 192)]
    assert bucket_for(100, 180, buckets) == (192, 320)
    assert bucket_for(500, 300, buckets) == (320, 192)
    assert bucket_for(64, 64, [(128, 128), (256, 256)]) == (256, 256)
    assert bucket_for(100, 100, [(100, 200), (200, 100)]) in [(100, 200), (200, 100)]
    assert bucket_for(100, 100, [(100, 200), (400, 200)]) == (400, 200)
    with pytest.raises(ValueError, match="height"):
        bucket_for(0, 10, buckets)


def _keys(n: int) -> list[tuple[int, int]]:
    shapes = [(256, 256), (192, 320), (320, 192)]
    return [shapes[(i * 7) % 3] for i in range(n)]


@pytest.mark.parametrize("num_replicas", [1, 3, 5])
def test_sharded_sampler_covers_every_sample_once(num_replicas: int) -> None:
    sizes = [(256, 256)] * 24 + [(192, 320)] * 12 + [(320, 192)] * 24  # 15 batches of 4
    samplers = [ShardedBucketSampler(sizes, 4, num_replicas, rank, seed=3) for rank in range(num_replicas)]
    for epoch in (0, 1):
        seen: list[int] = []
        for sampler in samplers:
            sampler.set_epoch(epoch)
            batches = list(sampler)
            assert len(batches) == len(sampler) == 15 // num_replicas
            for batch in batches:
                assert len({sizes[i] for i in batch}) == 1
            seen.extend(i for batch in batches for i in batch)
        assert sorted(seen) == list(range(len(sizes)))
    assert (
        samplers[0].epoch_batches() != ShardedBucketSampler(sizes, 4, num_replicas, 0, seed=3).epoch_batches()
    )


def test_sharded_sampler_padding_and_drop_last() -> None:
    sizes = _keys(23)  # buckets of 8, 8, 7 -> 9 batches of <= 3
    padded = [list(ShardedBucketSampler(sizes, 3, 2, rank)) for rank in range(2)]
    assert len(padded[0]) == len(padded[1]) == 5  # one batch repeated to make 10
    flat = [i for batches in padded for batch in batches for i in batch]
    assert set(flat) == set(range(23))
    for batches in padded:
        assert all(len({sizes[i] for i in batch}) == 1 for batch in batches)
    dropped = [list(ShardedBucketSampler(sizes, 3, 4, rank, drop_last=True)) for rank in range(4)]
    assert [len(batches) for batches in dropped] == [1, 1, 1, 1]  # 6 full batches -> 4
    flat = [i for batches in dropped for batch in batches for i in batch]
    assert len(flat) == len(set(flat)) == 12


def test_sharded_sampler_resume_continues_at_next_batch() -> None:
    sizes = _keys(40)
    sampler = ShardedBucketSampler(sizes, 3, num_replicas=2, rank=1, seed=7)
    sampler.set_epoch(2)
    full = sampler.epoch_batches()
    iterator = iter(sampler)
    taken = [next(iterator) for _ in range(3)]
    state = sampler.state_dict()
    assert taken == full[:3] and state["epoch"] == 2 and state["position"] == 3

    resumed = ShardedBucketSampler(sizes, 3, num_replicas=2, rank=1, seed=7)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # same epoch: position kept
    assert list(resumed) == full[3:]
    resumed.set_epoch(3)
    assert resumed.position == 0 and len(list(resumed)) == len(resumed)
    with pytest.raises(ValueError, match="num_replicas"):
        ShardedBucketSampler(sizes, 3, num_replicas=4, rank=1, seed=7).load_state_dict(state)


def test_sharded_sampler_length_groups_pad_less_and_keep_the_epoch() -> None:
    import random

    rng = random.Random(0)
    sizes = [(16, 16)] * 480 + [(16, 32)] * 96
    lengths = [rng.choice([40, 50, 60, 120, 180]) + rng.randrange(10) for _ in sizes]
    plain = ShardedBucketSampler(sizes, 16, seed=5)
    assert ShardedBucketSampler(sizes, 16, seed=5, lengths=lengths).epoch_batches() == plain.epoch_batches()
    grouped = ShardedBucketSampler(sizes, 16, seed=5, lengths=lengths, length_groups=8)
    for epoch in (0, 1):
        grouped.set_epoch(epoch)
        plain.set_epoch(epoch)
        batches = grouped.epoch_batches()
        assert sorted(i for b in batches for i in b) == list(range(len(sizes)))  # each sample once
        assert all(len({sizes[i] for i in b}) == 1 for b in batches)
        assert [len(b) for b in batches] != [] and len(batches) == len(plain.epoch_batches())

        def padded(batches: list[list[int]]) -> int:  # tokens a batch computes: its longest row x rows
            return sum(max(lengths[i] for i in b) * len(b) for b in batches)

        assert padded(batches) < 0.75 * padded(plain.epoch_batches())
    again = ShardedBucketSampler(sizes, 16, seed=5, lengths=lengths, length_groups=8)
    again.set_epoch(1)
    assert again.epoch_batches() == grouped.epoch_batches()  # deterministic, so resume stays exact
    with pytest.raises(ValueError, match="lengths has 3 entries"):
        ShardedBucketSampler(sizes, 16, lengths=[1, 2, 3], length_groups=2)
    with pytest.raises(ValueError, match="length_groups"):
        ShardedBucketSampler(sizes, 16, lengths=lengths, length_groups=0)


def test_sharded_sampler_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="rank"):
        ShardedBucketSampler([(1, 1)], 1, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="batch_size"):
        ShardedBucketSampler([(1, 1)], 0)
    with pytest.raises(ValueError, match=r"sizes\[0\]"):
        ShardedBucketSampler([(1, 1, 1)], 1)  # type: ignore[list-item]
