"""omnigen batch --engine ray: the torchrun runner's bytes and records, a killed actor, no Ray left over."""

from __future__ import annotations

import functools
import json
import os
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from conftest import torch_threads
from omnigen.batch import read_requests, run_batch
from omnigen.batch.ray_engine import GroupWorker, _task, run_batch_ray
from omnigen.batch.runner import consecutive_batches, expected_record, plan, validate_requests
from omnigen.pipeline import OmniGenPipeline

ray = pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")
pytest.importorskip("ray.data")


@pytest.fixture(scope="module")
def local_ray():  # (module scope: only the tests marked `ray` start it)
    """A local Ray bound to loopback with 2 CPUs; every process it started is gone afterwards."""
    before = os.environ.get("RAY_USAGE_STATS_ENABLED")
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        object_store_memory=100 * 1024**2,
        num_cpus=2,
        log_to_driver=False,
    )
    try:
        yield
    finally:
        started = psutil.Process().children(recursive=True)  # gcs_server, raylet and its workers
        assert {"raylet", "gcs_server"} <= {p.name() for p in started}
        ray.shutdown()
        _, alive = psutil.wait_procs(started, timeout=30)
        assert not [p for p in alive if _running(p)], f"left running after ray.shutdown(): {alive}"
        if before is None:
            os.environ.pop("RAY_USAGE_STATS_ENABLED")


def _running(proc) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def rank_records(out: Path) -> list[dict]:
    rows = []
    for path in sorted(out.glob("results.rank*.jsonl")):
        rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows


def pngs(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*.png"))}


@pytest.mark.ray
def test_ray_outputs_equal_the_torchrun_runner(local_ray, model_folder, tmp_path, rgb_image):
    rgb_image(40, 36).save(tmp_path / "in.png")
    rows = [
        {"id": "a", "prompt": "a red circle", "n": 3},
        {"id": "b", "prompt": "a blue square", "height": 16, "width": 32},
        {"id": "c", "prompt": "make it blue <img><|image_1|></img>", "input_images": ["in.png"], "n": 2},
        {"id": "d", "prompt": "a green dot", "seed": 7, "n": 2},
        {"id": "e", "prompt": "bad size", "height": 99999},  # a bad line: errors.jsonl in both
    ]
    requests, bad = read_requests(write_jsonl(tmp_path / "r.jsonl", rows))
    load = functools.partial(OmniGenPipeline.from_pretrained, str(model_folder), device="cpu")
    planner = load()
    common = {"batch_size": 2, "model": "tiny", "bad_lines": bad}
    with torch_threads(1):  # as an actor of num_cpus=1 (Ray sets its OMP_NUM_THREADS): bytes need it
        report = run_batch(planner, requests, tmp_path / "torchrun", progress=False, **common)
    ray_report = run_batch_ray(load, requests, tmp_path / "ray", actors=2, planner=planner, **common)
    assert (ray_report.generated, ray_report.failed, ray_report.world_size) == (report.generated, 0, 2)
    assert report.generated == 8
    expected = pngs(tmp_path / "torchrun")
    assert len(expected) == 8 and pngs(tmp_path / "ray") == expected  # same files, same bytes
    for name in ("results.jsonl", "errors.jsonl"):
        assert (tmp_path / "ray" / name).read_text() == (tmp_path / "torchrun" / name).read_text()
    assert {p.name for p in (tmp_path / "ray").glob("results.rank*")} != {"results.rank0.jsonl"}

    again = run_batch_ray(load, requests, tmp_path / "ray", actors=2, planner=planner, **common)
    assert (again.already_done, again.generated) == (8, 0)  # a rerun skips recorded images
    assert len(rank_records(tmp_path / "ray")) == 8


@pytest.mark.ray
def test_killed_actor_loses_and_duplicates_nothing(local_ray, model_folder, tmp_path):
    rows = [{"id": f"r{i}", "prompt": "a red circle", "num_inference_steps": 40} for i in range(10)]
    requests, _ = read_requests(write_jsonl(tmp_path / "r.jsonl", rows))
    load = functools.partial(OmniGenPipeline.from_pretrained, str(model_folder), device="cpu")
    planner, out = load(), tmp_path / "out"
    killed: list[int] = []

    def kill_first_writer() -> None:  # SIGKILL the actor that recorded the first image
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            for path in out.glob("results.rank-ray-*.jsonl"):
                if path.read_text().strip():
                    pid = int(path.name.rsplit("-", 1)[1].split(".")[0])
                    psutil.Process(pid).kill()
                    killed.append(pid)
                    break
            time.sleep(0.02)

    killer = threading.Thread(target=kill_first_writer)
    killer.start()
    try:
        report = run_batch_ray(load, requests, out, actors=2, planner=planner, batch_size=1)
        generated = report.generated
        print(f"the killed actor's group was retried by Ray: {generated} generated")
    except Exception as err:  # Ray gave up on the group: the rerun finishes it
        generated = 0
        print(f"the run failed ({type(err).__name__}); the rerun finishes it")
    killer.join()
    assert killed, "no actor was killed"
    done_at_kill = len(rank_records(out))
    rerun = run_batch_ray(load, requests, out, actors=2, planner=planner, batch_size=1)
    keys = Counter((r["id"], r["k"]) for r in rank_records(out))
    assert keys == Counter({(f"r{i}", 0): 1 for i in range(10)}), keys  # every id once
    assert generated + rerun.generated + rerun.already_done >= 10 and done_at_kill >= 1
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["id"] for r in results] == [f"r{i}" for i in range(10)]
    assert not list(out.rglob("*.tmp"))


def test_a_retried_group_writes_nothing_twice(pipeline, tmp_path):
    """Ray reruns the group of a dead actor: what its records show done is skipped, the rest generated."""
    rows = [{"id": "a", "prompt": "a red circle", "n": 3}, {"id": "b", "prompt": "a blue square"}]
    requests, _ = read_requests(write_jsonl(tmp_path / "r.jsonl", rows))
    params, _ = validate_requests(pipeline, requests, "skip", None)
    expected = {
        (r.id, k): expected_record(r, k, params[i], None, f"{r.id}/{k}.png")
        for i, r in enumerate(requests)
        for k in range(r.n)
    }
    (group,) = [b for b in consecutive_batches(plan(requests, params, {}, 0, 1), 4) if len(b) == 4]
    task = _task(requests, params, expected, group)
    worker = GroupWorker(lambda: pipeline, str(tmp_path / "out"), "skip")
    assert worker.run_group(task)[:3] == (4, 0, 0)
    first = pngs(tmp_path / "out")
    assert worker.run_group(task)[:3] == (0, 0, 4)  # the whole group was recorded: nothing redone
    log = next((tmp_path / "out").glob("results.rank-ray-*.jsonl"))
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines[:2]) + "\n")  # the actor died after its second record
    (tmp_path / "out" / json.loads(lines[2])["file"]).unlink()  # ... before its third PNG
    assert worker.run_group(task)[:3] == (2, 0, 2)
    keys = Counter((r["id"], r["k"]) for r in rank_records(tmp_path / "out"))
    assert keys == Counter({key: 1 for key in expected}), keys
    assert pngs(tmp_path / "out") == first


def test_cli_ray_flags_are_checked_before_ray_starts(model_folder, tmp_path, caplog):
    from omnigen.cli.main import main

    path = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "a red circle"}])
    argv = ["batch", str(path), "--out", str(tmp_path / "o"), "--model", str(model_folder), "--no-progress"]
    assert main([*argv, "--actors", "2"]) == 2
    assert "--actors and --ray-address need --engine ray" in caplog.text
    assert main([*argv, "--engine", "ray", "--actors", "0"]) == 2
    assert "--actors must be >= 1, got 0" in caplog.text
    assert not ray.is_initialized() and not (tmp_path / "o").exists()


def test_a_failed_group_returns_its_error_rows(pipeline, tmp_path):
    class Broken:
        def __call__(self, *args, **kwargs):
            raise RuntimeError("out of memory")

    requests, _ = read_requests(write_jsonl(tmp_path / "r.jsonl", [{"id": "a", "prompt": "a cat", "n": 2}]))
    params, _ = validate_requests(pipeline, requests, "skip", None)
    expected = {("a", k): expected_record(requests[0], k, params[0], None, f"a/{k}.png") for k in range(2)}
    (group,) = consecutive_batches(plan(requests, params, {}, 0, 1), 4)
    worker = GroupWorker(Broken, str(tmp_path / "out"), "skip")
    generated, failed, skipped, rows = worker.run_group(_task(requests, params, expected, group))
    assert (generated, failed, skipped) == (0, 2, 0)
    assert [(r["id"], r["k"], r["error"]) for r in rows] == [
        ("a", k, "RuntimeError: out of memory") for k in range(2)
    ]
    assert rank_records(tmp_path / "out") == []
    with pytest.raises(RuntimeError, match="out of memory"):
        GroupWorker(Broken, str(tmp_path / "out"), "fatal").run_group(
            _task(requests, params, expected, group)
        )
