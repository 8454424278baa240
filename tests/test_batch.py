"""omnigen batch: request parsing, planning, resume after a kill, and 2-process sharding."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from omnigen.batch import RequestError, read_requests, run_batch
from omnigen.batch.runner import Job, consecutive_batches, rank_file, shard_bounds

torch.set_num_threads(1)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def records(out: Path, name: str = "results.jsonl") -> list[dict]:
    return [json.loads(line) for line in (out / name).read_text().splitlines() if line.strip()]


def rank_records(out: Path) -> list[dict]:
    rows = []
    for path in sorted(out.glob("results.rank*.jsonl")):
        rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows


@pytest.fixture
def image_file(tmp_path, rgb_image):
    path = tmp_path / "in.png"
    rgb_image(40, 36).save(path)
    return path


# --------------------------------------------------------------------------------------------------
# Parsing and planning
# --------------------------------------------------------------------------------------------------


def test_read_requests_reports_every_bad_line_with_its_number(tmp_path, image_file):
    path = write_jsonl(
        tmp_path / "r.jsonl",
        [
            {"id": "a", "prompt": "a red circle", "n": 2},
            "",
            "{not json",
            {"id": "b", "prompt": "make it blue <img><|image_1|></img>", "input_images": ["in.png"]},
            {"id": "c", "prompt": "a cat <img><|image_1|></img>"},  # tag without image
            {"id": "a", "prompt": "duplicate id"},
            {"id": "d", "prompt": "x", "steps": 3},  # unknown key
            {"id": "../e", "prompt": "x"},
            {"id": "f", "prompt": "x", "n": 0},
            {"id": "g", "prompt": "x", "input_images": ["missing.png"]},
            {
                "id": "h",
                "prompt": "a dog",
                "seed": 7,
                "guidance_scale": 2,
                "height": 32,
                "step_cache_threshold": 0,
            },
            {"prompt": "no id"},
        ],
    )
    requests, bad = read_requests(path, base_seed=100)
    assert [r.id for r in requests] == ["a", "b", "h", "000012"]
    assert [b.line for b in bad] == [3, 5, 6, 7, 8, 9, 10]
    reasons = {b.line: b.reason for b in bad}
    assert "invalid JSON" in reasons[3] and "duplicate id 'a'" in reasons[6] and "unknown key" in reasons[7]
    assert "not found" in reasons[10]
    # default seeds continue across the file (a: 100, 101; b: 102), explicit seeds are kept
    assert [r.seed for r in requests] == [100, 102, 7, 104]
    assert requests[2].params == {"guidance_scale": 2.0, "height": 32, "step_cache_threshold": 0.0}
    assert requests[1].input_images == (str(image_file.resolve()),)


def test_shards_are_disjoint_and_cover_everything():
    for count in range(0, 23):
        for world in (1, 2, 3, 5):
            covered = []
            for rank in range(world):
                start, end = shard_bounds(count, rank, world)
                covered += range(start, end)
            assert covered == list(range(count))


def test_batches_hold_one_group_and_consecutive_seeds():
    jobs = [Job(0, 0, 5, "a"), Job(0, 1, 6, "a"), Job(1, 0, 7, "a"), Job(2, 0, 9, "a"), Job(3, 0, 10, "b")]
    batches = consecutive_batches(jobs, batch_size=2)
    assert [[j.seed for j in b] for b in batches] == [[5, 6], [7], [9], [10]]


# --------------------------------------------------------------------------------------------------
# In-process runs with the tiny pipeline
# --------------------------------------------------------------------------------------------------


def test_outputs_equal_single_calls_with_the_recorded_seed(pipeline, tmp_path, image_file):
    path = write_jsonl(
        tmp_path / "r.jsonl",
        [
            {"id": "t2i", "prompt": "a red circle", "n": 2, "meta": {"k": 1}},
            {"id": "edit", "prompt": "make it blue <img><|image_1|></img>", "input_images": ["in.png"]},
            {"id": "wide", "prompt": "a blue square", "width": 48, "seed": 11},
            {
                "id": "same",
                "prompt": "make it green <img><|image_1|></img>",
                "input_images": ["in.png"],
                "use_input_image_size_as_output": True,
            },
        ],
    )
    requests, bad = read_requests(path)
    assert not bad
    out = tmp_path / "out"
    report = run_batch(pipeline, requests, out, batch_size=4, model="tiny", progress=False)
    assert (report.total_images, report.generated, report.failed) == (5, 5, 0)
    rows = records(out)
    assert [(r["id"], r["k"]) for r in rows] == [
        ("t2i", 0),
        ("t2i", 1),
        ("edit", 0),
        ("wide", 0),
        ("same", 0),
    ]
    assert [r["seed"] for r in rows] == [0, 1, 2, 11, 4]
    assert rows[0]["meta"] == {"k": 1} and rows[0]["model"] == "tiny"
    assert rows[0]["params"]["num_inference_steps"] == 3 and rows[0]["params"]["guidance_scale"] == 3.0
    assert (rows[3]["params"]["height"], rows[3]["params"]["width"]) == (32, 48)
    # 40x36 -> long side 32 (32x29) -> sides cut to multiples of 4: 32 wide, 28 high
    assert (rows[4]["params"]["height"], rows[4]["params"]["width"]) == (28, 32)
    for row in rows:
        saved = np.asarray(Image.open(out / row["file"]))
        assert Image.open(out / row["file"]).text["seed"] == str(row["seed"])
        params = {k: v for k, v in row["params"].items()}
        single = pipeline(
            row["prompt"],
            input_images=row["input_images"] or None,
            seed=row["seed"],
            progress=False,
            **params,
        )[0]
        assert np.abs(saved.astype(int) - np.asarray(single).astype(int)).max() <= 2, row["file"]


def test_masked_requests_keep_every_pixel_outside_their_mask(pipeline, tmp_path, rgb_image):
    """Masked and unmasked lines in one batch (per-prompt masks as a list); each masked output has its
    canvas's size and is the input outside the mask, and equals the single masked call."""
    sources = {"a.png": rgb_image(32, 32, seed=1), "b.png": rgb_image(32, 32, seed=2)}
    for name, image in sources.items():
        image.save(tmp_path / name)
    box = np.zeros((32, 32), dtype=np.uint8)
    box[8:24, 4:20] = 255
    (tmp_path / "masks").mkdir()
    Image.fromarray(box).save(tmp_path / "masks" / "m.png")
    edit = "make it blue <img><|image_1|></img>"
    rows = [
        {"id": "masked", "prompt": edit, "input_images": ["a.png"], "mask": "masks/m.png"},
        {"id": "plain", "prompt": edit, "input_images": ["b.png"]},
        {"id": "masked2", "prompt": edit, "input_images": ["b.png"], "mask": "masks/m.png", "seed": 3},
    ]
    requests, bad = read_requests(write_jsonl(tmp_path / "r.jsonl", rows))
    assert not bad and requests[0].mask == str((tmp_path / "masks" / "m.png").resolve())
    out = tmp_path / "out"
    calls = []

    class Recording:
        def __getattr__(self, name):
            return getattr(pipeline, name)

        def __call__(self, *args, **kwargs):
            calls.append(kwargs.get("mask"))
            return pipeline(*args, **kwargs)

    report = run_batch(Recording(), requests, out, batch_size=4, progress=False)
    assert (report.generated, report.failed) == (3, 0)
    assert any(isinstance(m, list) and None in m for m in calls), calls  # one batch, masks per prompt
    keep = box == 0
    for row in records(out):
        saved = np.asarray(Image.open(out / row["file"]))
        source = np.asarray(sources[Path(row["input_images"][0]).name])
        assert (row["params"]["height"], row["params"]["width"]) == (32, 32)
        if row["mask"] is None:
            continue
        assert np.array_equal(saved[keep], source[keep]), row["id"]
        assert (saved[~keep] != source[~keep]).any()
        single = pipeline(
            row["prompt"],
            input_images=row["input_images"],
            mask=row["mask"],
            seed=row["seed"],
            progress=False,
        )[0]
        assert np.array_equal(saved, np.asarray(single)), row["id"]
    # a changed mask is regenerated on a rerun
    Image.fromarray(255 - box).save(tmp_path / "masks" / "m2.png")
    rows[0]["mask"] = "masks/m2.png"
    again = run_batch(
        pipeline, read_requests(write_jsonl(tmp_path / "r.jsonl", rows))[0], out, progress=False
    )
    assert (again.already_done, again.generated) == (2, 1)
    redone = np.asarray(Image.open(out / "masked" / "0.png"))  # a batch of masked rows only
    assert np.array_equal(redone[box > 0], np.asarray(sources["a.png"])[box > 0])


def test_bad_masks_are_bad_lines(pipeline, tmp_path, rgb_image):
    rgb_image(32, 32).save(tmp_path / "a.png")
    Image.new("L", (32, 32), 0).save(tmp_path / "black.png")
    Image.new("L", (32, 16), 255).save(tmp_path / "wide.png")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    edit = {"prompt": "make it blue <img><|image_1|></img>", "input_images": ["a.png"]}
    rows = [
        {"id": "noimage", "prompt": "a red circle", "mask": "black.png"},
        {"id": "missing", **edit, "mask": "nope.png"},
        {"id": "notastring", **edit, "mask": 3},
        {"id": "black", **edit, "mask": "black.png"},
        {"id": "wide", **edit, "mask": "wide.png"},
        {"id": "junk", **edit, "mask": "junk.png"},
        {"id": "size", **edit, "mask": "wide.png".replace("wide", "a"), "height": 16},
    ]
    requests, bad = read_requests(write_jsonl(tmp_path / "r.jsonl", rows))
    reasons = [b.reason for b in bad]
    assert "'mask' needs 'input_images'" in reasons[0] and "mask not found" in reasons[1]
    assert "'mask' must be a path" in reasons[2] and len(bad) == 3
    report = run_batch(pipeline, requests, tmp_path / "out", bad_lines=bad, progress=False)
    assert report.generated == 0
    late = {b.reason.split("'")[1]: b.reason for b in report.bad_lines[3:]}
    assert "all black" in late["black"] and "aspect ratios differ" in late["wide"]
    assert "cannot read mask" in late["junk"] and "the canvas's size 32x32" in late["size"]
    with pytest.raises(RequestError, match="all black"):
        run_batch(pipeline, requests[:1], tmp_path / "out2", on_error="fatal", progress=False)


def interrupting(pipe, calls: int):
    """A pipeline sharing `pipe`'s model whose call after `calls` calls raises KeyboardInterrupt."""
    from omnigen.pipeline import OmniGenPipeline

    class Interrupting(OmniGenPipeline):
        @functools.wraps(OmniGenPipeline.__call__)
        def __call__(self, *args, **kwargs):
            nonlocal calls
            if calls == 0:
                raise KeyboardInterrupt
            calls -= 1
            return super().__call__(*args, **kwargs)

    return Interrupting(pipe.model, pipe.codec, pipe.tokenizer, pipe.defaults)


def test_resume_after_interruption_loses_and_duplicates_nothing(pipeline, tmp_path):
    path = write_jsonl(
        tmp_path / "r.jsonl", [{"id": f"r{i}", "prompt": "a red circle", "n": 2} for i in range(4)]
    )
    requests, _ = read_requests(path)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run_batch(interrupting(pipeline, 2), requests, out, batch_size=2, progress=False)
    before = rank_records(out)
    assert len(before) == 4 and not (out / "results.jsonl").exists()
    # what a kill can leave: a temporary file of the image in flight and a torn record line
    (out / "r2").mkdir(exist_ok=True)
    (out / "r2" / ".0.png.abc.tmp").write_bytes(b"partial")
    with rank_file(out, 0).open("a") as handle:
        handle.write('{"id": "r2", "k": 0, "fi')
    report = run_batch(pipeline, requests, out, batch_size=2, progress=False)
    assert (report.already_done, report.generated) == (4, 4)
    keys = [(r["id"], r["k"]) for r in rank_records(out)]
    assert Counter(keys) == Counter({(f"r{i}", k): 1 for i in range(4) for k in range(2)})
    assert [(r["id"], r["k"]) for r in records(out)] == sorted(keys)
    assert not list(out.rglob("*.tmp"))
    # a third run has nothing left to do
    assert run_batch(pipeline, requests, out, batch_size=2, progress=False).generated == 0


def test_changed_request_is_regenerated(pipeline, tmp_path):
    rows = [{"id": "a", "prompt": "a red circle"}, {"id": "b", "prompt": "a blue square"}]
    out = tmp_path / "out"
    run_batch(pipeline, read_requests(write_jsonl(tmp_path / "r.jsonl", rows))[0], out, progress=False)
    rows[1]["prompt"] = "a green square"
    report = run_batch(
        pipeline, read_requests(write_jsonl(tmp_path / "r.jsonl", rows))[0], out, progress=False
    )
    assert (report.already_done, report.generated) == (1, 1)
    assert [r["prompt"] for r in records(out)] == ["a red circle", "a green square"]


def test_invalid_size_is_skipped_or_fatal(pipeline, tmp_path):
    rows = [{"id": "ok", "prompt": "a cat"}, {"id": "bad", "prompt": "a dog", "height": 30}]
    requests, _ = read_requests(write_jsonl(tmp_path / "r.jsonl", rows))
    report = run_batch(pipeline, requests, tmp_path / "out", progress=False)
    assert report.generated == 1 and [b.line for b in report.bad_lines] == [2]
    assert json.loads((tmp_path / "out" / "errors.jsonl").read_text())["line"] == 2
    with pytest.raises(RequestError, match="line 2"):
        run_batch(pipeline, requests, tmp_path / "out2", on_error="fatal", progress=False)


def test_failed_batch_is_recorded_and_the_rest_goes_on(pipeline, tmp_path):
    from omnigen.pipeline import OmniGenPipeline

    class Flaky(OmniGenPipeline):
        @functools.wraps(OmniGenPipeline.__call__)
        def __call__(self, prompt, *args, **kwargs):
            if any("dog" in p for p in prompt):
                raise RuntimeError("out of memory")
            return super().__call__(prompt, *args, **kwargs)

    flaky = Flaky(pipeline.model, pipeline.codec, pipeline.tokenizer, pipeline.defaults)
    rows = [
        {"id": "a", "prompt": "a cat"},
        {"id": "b", "prompt": "a dog", "width": 48},
        {"id": "c", "prompt": "a cat"},
    ]
    requests, _ = read_requests(write_jsonl(tmp_path / "r.jsonl", rows))
    report = run_batch(flaky, requests, tmp_path / "out", progress=False)
    assert (report.generated, report.failed) == (2, 1)
    (error,) = [json.loads(line) for line in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
    assert error["id"] == "b" and error["line"] == 2 and "out of memory" in error["error"]
    with pytest.raises(RuntimeError, match="out of memory"):
        run_batch(flaky, requests, tmp_path / "out", on_error="fatal", progress=False)
    # the failed image is still pending: a working pipeline finishes it and only it
    assert run_batch(pipeline, requests, tmp_path / "out", progress=False).generated == 1


# --------------------------------------------------------------------------------------------------
# Processes: a real kill, and two gloo ranks
# --------------------------------------------------------------------------------------------------


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "OMNIGEN_TEST_THREADS": "1"}


def test_cli_bad_line_fatal_names_the_line(model_folder, tmp_path, caplog):
    from omnigen.cli.main import main

    path = write_jsonl(tmp_path / "r.jsonl", [{"id": "a", "prompt": "a cat"}, "{oops"])
    argv = ["batch", str(path), "--out", str(tmp_path / "o"), "--model", str(model_folder), "--no-progress"]
    assert main([*argv, "--on-error", "fatal"]) == 2
    assert "r.jsonl:2" in caplog.text and not (tmp_path / "o").exists()
    assert main(argv) == 1  # skip: the good line is generated, the bad one reported, the run not a success
    assert "1 bad line(s) skipped" in caplog.text
    assert json.loads((tmp_path / "o" / "errors.jsonl").read_text())["line"] == 2
    assert (tmp_path / "o" / "a" / "0.png").is_file()


def test_kill_mid_run_then_resume(model_folder, tmp_path):
    rows = [{"id": f"r{i}", "prompt": "a red circle", "n": 2, "num_inference_steps": 3} for i in range(6)]
    path = write_jsonl(tmp_path / "r.jsonl", rows)
    out = tmp_path / "out"
    args = ["batch", str(path), "--out", str(out), "--model", str(model_folder), "--no-progress"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "omnigen", *args, "--batch-size", "1"],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if rank_file(out, 0).exists() and len(rank_file(out, 0).read_text().splitlines()) >= 2:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = {(r["id"], r["k"]) for r in rank_records(out)}
    assert 2 <= len(done_before) < 12, "the run should have been killed part-way"
    from omnigen.cli.main import main

    assert main([*args, "--batch-size", "4"]) == 0  # the rerun, in this process
    keys = Counter((r["id"], r["k"]) for r in rank_records(out))
    assert keys == Counter({(f"r{i}", k): 1 for i in range(6) for k in range(2)})
    assert len(records(out)) == 12 and all((out / r["file"]).is_file() for r in records(out))
    assert not list(out.rglob("*.tmp"))


def test_two_gloo_processes_cover_every_request_once(model_folder, tmp_path, image_file):
    rows = [{"id": f"t{i}", "prompt": "a blue square", "n": 1 + i % 3} for i in range(7)]
    rows += [
        {"id": "e0", "prompt": "make it red <img><|image_1|></img>", "input_images": ["in.png"], "n": 2},
        {"id": "w0", "prompt": "a cat", "width": 48},
    ]
    path = write_jsonl(tmp_path / "r.jsonl", rows)
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "omnigen",
            "batch",
            str(path),
            "--out",
            str(out),
            "--model",
            str(model_folder),
            "--batch-size",
            "2",
            "--no-progress",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = Counter({(r["id"], k): 1 for r in rows for k in range(r["n"] if "n" in r else 1)})
    per_rank = [[(r["id"], r["k"]) for r in records(out, f"results.rank{rank}.jsonl")] for rank in (0, 1)]
    assert per_rank[0] and per_rank[1], "both ranks should have work"
    assert Counter(per_rank[0] + per_rank[1]) == expected
    assert Counter((r["id"], r["k"]) for r in records(out)) == expected
    assert all((out / f"{i}/{k}.png").is_file() for i, k in expected)
