"""``omnigen data shards``: X2I rows + images (folder, tar, split .tar.gz) -> webdataset tar shards."""

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from omnigen.data.shards import write_shards
from omnigen.data.sources import split_parts
from omnigen.miniworld.world import write_dataset


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """8 miniworld rows and their images, plus 4 bad rows: a missing image, an undecodable one, an
    oversized one, and an instruction with a tag too many."""
    folder = tmp_path_factory.mktemp("world")
    jsonl = write_dataset(folder, 8, seed=3, size=16)
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    (folder / "images" / "broken.png").write_bytes(b"not a png")
    Image.new("RGB", (80, 8)).save(folder / "images" / "wide.png")
    bad = [
        {"instruction": "a cat", "input_images": [], "output_image": "images/nowhere.png"},
        {"instruction": "a cat", "input_images": [], "output_image": "images/broken.png"},
        {"instruction": "a cat", "input_images": [], "output_image": "images/wide.png"},
        {
            "instruction": "put <img><|image_1|></img> here",
            "input_images": [],
            "output_image": rows[0]["output_image"],
        },
    ]
    meta = folder / "meta.jsonl"
    meta.write_text("".join(json.dumps(r) + "\n" for r in rows[:4] + bad + rows[4:]) + "not json\n")
    return folder, meta, rows


def samples_of(out: Path) -> dict[str, dict[str, bytes]]:
    """Every sample in the shards, grouped as webdataset does (name up to the first dot)."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                key, _, suffix = member.name.partition(".")
                samples.setdefault(key, {})[suffix] = tar.extractfile(member).read()
    return samples


def check_shards(out: Path, world_folder: Path, rows: list[dict]) -> None:
    samples = samples_of(out)
    assert len(samples) == len(rows)
    for (_, files), row in zip(sorted(samples.items()), rows, strict=True):
        meta = json.loads(files["json"])
        assert meta["instruction"] == row["instruction"] and meta["task_type"] == row["task_type"]
        assert files["out.png"] == (world_folder / row["output_image"]).read_bytes()  # bytes as they were
        inputs = row["input_images"] or []
        assert sorted(k for k in files if k.startswith("in")) == [f"in{k}.png" for k in range(len(inputs))]
        for k, path in enumerate(inputs):
            got = Image.open(io.BytesIO(files[f"in{k}.png"]))
            assert got.tobytes() == Image.open(world_folder / path).convert("RGB").tobytes()
            assert meta["input_sizes"][k] == [got.height, got.width]
    report = json.loads((out / "report.json").read_text())
    assert report["written"] == len(rows)
    assert report["skipped"] == {"bad_row": 1, "missing": 1, "oversized": 1, "tags": 1, "undecodable": 1}
    index = json.loads((out / "index.json").read_text())
    # 3 rows per shard, less the skipped: rows 4-7 and 12 are bad; the last shard's row is skipped
    assert [s["samples"] for s in index["shards"]] == [3, 1, 1, 3, 0]


def test_folder_source_writes_every_good_row_and_counts_every_bad_one(world, tmp_path):
    folder, meta, rows = world
    report = write_shards([meta], folder, tmp_path / "out", samples_per_shard=3, max_side=64)
    check_shards(tmp_path / "out", folder, rows)
    assert report.examples["missing"][0].endswith("images/nowhere.png is not in the image source")


def test_split_tar_gz_gives_the_same_shards_and_is_deterministic(world, tmp_path):
    folder, meta, rows = world
    archive = tmp_path / "images.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder / "images", arcname="./images")
    data = archive.read_bytes()
    third = len(data) // 3 + 1
    for k, suffix in enumerate(["aa", "ab", "ac"]):
        (tmp_path / f"images.tar.gz.{suffix}").write_bytes(data[k * third : (k + 1) * third])
    assert [p.name for p in split_parts(tmp_path / "images.tar.gz.aa")] == [
        "images.tar.gz.aa",
        "images.tar.gz.ab",
        "images.tar.gz.ac",
    ]
    write_shards([meta], tmp_path / "images.tar.gz.aa", tmp_path / "split", samples_per_shard=3, max_side=64)
    check_shards(tmp_path / "split", folder, rows)
    write_shards([meta], folder, tmp_path / "folder", samples_per_shard=3, max_side=64)
    for shard in (f"{k:06d}.tar" for k in range(5)):
        assert (tmp_path / "split" / shard).read_bytes() == (tmp_path / "folder" / shard).read_bytes()


def files_of(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_resume_keeps_finished_shards_and_completes_the_rest(world, tmp_path):
    folder, meta, rows = world
    out = tmp_path / "out"
    write_shards([meta], folder, out, samples_per_shard=3, max_side=64)
    whole = files_of(out)
    (out / "000002.tar").unlink()  # as if killed before the shard's tar was renamed into place
    (out / "000004.json").unlink()  # ... or before its sidecar was
    (out / "000001.tar").write_bytes(b"kept")  # a finished shard is not rewritten
    write_shards([meta], folder, out, samples_per_shard=3, max_side=64)
    assert (out / "000001.tar").read_bytes() == b"kept"
    assert files_of(out) == {**whole, "000001.tar": b"kept"}  # report.json counts the kept shards too
    report = json.loads((out / "report.json").read_text())
    assert report["written"] == len(rows) and sum(report["skipped"].values()) == 5
    with pytest.raises(ValueError, match="000000.json covers rows \\[0, 3\\], the plan says \\[0, 4\\]"):
        write_shards([meta], folder, out, samples_per_shard=4, max_side=64)


def test_two_processes_write_the_same_bytes_and_resume_a_partial_output(world, tmp_path):
    folder, meta, _ = world
    one, two = tmp_path / "one", tmp_path / "two"
    write_shards([meta], folder, one, samples_per_shard=2, max_side=64)
    write_shards([meta], folder, two, samples_per_shard=2, max_side=64, workers=2)
    assert len(files_of(one)) == 2 * 7 + 2  # 7 shards with their sidecars, index.json, report.json
    assert files_of(two) == files_of(one)
    for name in (
        "000001.tar",
        "000004.json",
        "000006.tar",
        "report.json",
    ):  # killed: shards of both processes
        (two / name).unlink()
    write_shards([meta], folder, two, samples_per_shard=2, max_side=64, workers=2)
    assert files_of(two) == files_of(one)


def test_cli_prints_the_counts(world, tmp_path):
    folder, meta, _ = world
    out = subprocess.run(
        [sys.executable, "-m", "omnigen", "data", "shards", "--jsonl", str(meta), "--images", str(folder)]
        + ["--out", str(tmp_path / "cli"), "--samples-per-shard", "4", "--max-side", "64"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert "wrote 8 samples in 4 shard(s)" in out.stdout and "undecodable 1" in out.stdout


def test_bad_arguments_are_named(world, tmp_path):
    folder, meta, _ = world
    with pytest.raises(ValueError, match="samples_per_shard must be a positive int"):
        write_shards([meta], folder, tmp_path, samples_per_shard=0)
    with pytest.raises(ValueError, match="workers must be a positive int, got 0"):
        write_shards([meta], folder, tmp_path, workers=0)
    with pytest.raises(ValueError, match="must be an image folder"):
        write_shards([meta], meta, tmp_path)


def test_latents_are_stored_per_image_with_their_codec_and_resolution(world, tmp_path):
    from omnigen.text.processor import load_image
    from omnigen.training.batches import fill_pixels
    from omnigen.training.shard_latents import read_sample

    folder, meta, rows = world
    command = [
        sys.executable,
        "-m",
        "omnigen",
        "data",
        "shards",
        "--jsonl",
        str(meta),
        "--images",
        str(folder),
    ]
    out = subprocess.run(
        command + ["--out", str(tmp_path / "lat"), "--latents", "identity"], capture_output=True, text=True
    )
    assert out.returncode != 0 and "--latents CODEC and --resolution R go together" in out.stderr
    out = subprocess.run(
        command
        + ["--out", str(tmp_path / "lat"), "--latents", "identity", "--resolution", "8", "--max-side", "64"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    two = command + ["--out", str(tmp_path / "lat2"), "--latents", "identity", "--resolution", "8"]
    out = subprocess.run(two + ["--max-side", "64", "--workers", "2"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert files_of(tmp_path / "lat2") == files_of(tmp_path / "lat")  # byte for byte, in other processes
    samples = samples_of(tmp_path / "lat")
    for files, row in zip([samples[k] for k in sorted(samples)], rows, strict=True):
        tensors, info = read_sample(files["latents.safetensors"])
        names = {f"in{k}" for k in range(len(row["input_images"] or []))} | {"out"}
        if row.get("few_shot"):
            names |= {f"shot_in{k}" for k in range(len(row["few_shot"]["input_images"]))} | {"shot_out"}
        assert set(tensors) == names
        assert all(t.shape == (3, 8, 8) for t in tensors.values())
        assert info == {"codec": "identity-c3-s1.0", "resolution": "8"}
        seen = fill_pixels(load_image(folder / row["output_image"]), 8, 8)  # the trainer's square view
        assert torch.equal(tensors["out"], seen)
