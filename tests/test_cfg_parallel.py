"""CFG-parallel sampling (``omnigen.sampling.parallel``): 2 and 3 gloo processes on 127.0.0.1, each running
its own guidance branches, produce images byte-equal to one process's, from Python, the CLI and batch."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import torch_threads
from omnigen.sampling.parallel import CfgGroup, split_branches

STEPS = 3
EDIT = "<img><|image_1|></img> make it brighter"
T2I = "a red square"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def edit_input(folder: Path) -> Path:
    path = folder / "input.png"
    pixels = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def generate(pipe, folder: Path, parallel: str | None) -> dict[str, bytes]:
    """The text-to-image (2 CFG branches) and edit (3 branches) images (the edit of ``folder``'s
    ``edit_input``); for more ranks than a task has branches, the error it raises."""
    image = Image.open(folder / "input.png")
    kw = {"num_inference_steps": STEPS, "seed": 7, "progress": False, "parallel": parallel}
    outputs = {}
    for name, prompt, images in (("t2i", T2I, None), ("edit", EDIT, [image])):
        try:
            outputs[name] = png_bytes(pipe(prompt, input_images=images, **kw)[0])
        except ValueError as err:
            outputs[name] = f"ValueError: {err}".encode()
    return outputs


def _worker(rank: int, world_size: int, port: int, folder: str) -> None:
    """A spawned rank: joins the gloo group, generates with parallel='cfg', writes what it returned."""
    import torch.distributed as dist

    from omnigen.pipeline import OmniGenPipeline

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        pipe = OmniGenPipeline.from_pretrained()
        outputs = generate(pipe, Path(folder), "cfg")
        # no seed: every rank samples from rank 0's random seed
        image = Image.open(Path(folder) / "input.png")
        drawn = pipe(EDIT, input_images=[image], num_inference_steps=1, progress=False, parallel="cfg")[0]
        outputs["drawn"] = png_bytes(drawn) + str(drawn.info["seed"]).encode()
        for name, data in outputs.items():
            (Path(folder) / f"{name}.rank{rank}.png").write_bytes(data)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict[str, bytes]:
    """One process, one thread (the ranks' setting): the reference images."""
    from omnigen.pipeline import OmniGenPipeline

    with torch_threads(1):
        folder = tmp_path_factory.mktemp("single")
        edit_input(folder)
        return generate(OmniGenPipeline.from_pretrained(), folder, None)


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_match_one_process(single, tmp_path, world_size):
    import torch.multiprocessing as mp

    edit_input(tmp_path)  # written once, read by every rank
    mp.spawn(_worker, args=(world_size, free_port(), str(tmp_path)), nprocs=world_size, join=True)
    drawn = {(tmp_path / f"drawn.rank{rank}.png").read_bytes() for rank in range(world_size)}
    assert len(drawn) == 1, "without a seed, the ranks disagree"
    for rank in range(world_size):
        assert (tmp_path / f"edit.rank{rank}.png").read_bytes() == single["edit"], f"edit: rank {rank}"
        t2i = (tmp_path / f"t2i.rank{rank}.png").read_bytes()
        if world_size == 2:
            assert t2i == single["t2i"], f"text-to-image: rank {rank} differs from one process"
        else:  # text-to-image has 2 branches: a clear error on every rank, before any collective
            assert t2i.startswith(b"ValueError: parallel='cfg' puts each of the 2 guidance branches"), t2i
            assert b"at most 2 processes, got a process group of 3" in t2i


def test_split_branches():
    assert split_branches(3, 2) == ((0,), (1, 2))
    assert split_branches(3, 3) == ((0,), (1,), (2,))
    assert split_branches(2, 2) == ((0,), (1,))
    assert split_branches(2, 1) == ((0, 1),)
    with pytest.raises(ValueError, match="at most 2 processes, got a process group of 3"):
        split_branches(2, 3)


def test_mine_and_gather_order_without_a_group():
    group = CfgGroup(rank=1, assignment=((0,), (1, 2)))
    assert group.branches == (1, 2)
    assert group.mine(["cond", "uncond", "img_cond"]) == ["uncond", "img_cond"]


def test_clear_errors_without_a_process_group():
    from omnigen.pipeline import OmniGenPipeline

    pipe = OmniGenPipeline.from_pretrained()
    with pytest.raises(ValueError, match="needs an initialized torch.distributed process group"):
        pipe(T2I, num_inference_steps=1, progress=False, parallel="cfg")
    with pytest.raises(
        ValueError, match=r"parallel must be None or one of \('cfg', 'sequence'\), got 'tensor'"
    ):
        pipe(T2I, num_inference_steps=1, progress=False, parallel="tensor")


def _torchrun(nproc: int, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    command += ["--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "omnigen", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_cli_three_ranks_edit_matches_one_process(single, tmp_path):
    """`torchrun --nproc-per-node 3 -m omnigen generate ... --parallel cfg`: rank 0 writes the image
    (the others write nothing), byte-equal to one process's."""
    image = edit_input(tmp_path)
    out = tmp_path / "out"
    args = ["generate", EDIT, "--image", str(image), "-o", str(out / "edit.png"), "--seed", "7"]
    done = _torchrun(3, [*args, "--num-inference-steps", str(STEPS), "--parallel", "cfg"], tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    assert sorted(p.name for p in out.iterdir()) == ["edit.png"]
    reference = Image.open(io.BytesIO(single["edit"]))
    assert np.array_equal(np.asarray(Image.open(out / "edit.png")), np.asarray(reference))


def test_cli_parallel_without_torchrun_is_a_clear_error(tmp_path, caplog):
    from omnigen.cli.main import main

    code = main(["generate", T2I, "-o", str(tmp_path / "x.png"), "--steps", "1", "--parallel", "cfg"])
    assert code == 2 and not (tmp_path / "x.png").exists()
    assert "parallel='cfg' needs an initialized torch.distributed process group" in caplog.text


def test_batch_two_ranks_match_one_process(tmp_path):
    """`omnigen batch --parallel cfg` on 2 ranks: every image byte-equal to a one-process batch run, and
    rank 0 the only writer (no results file of rank 1)."""
    import json

    from omnigen.cli.main import main

    image = edit_input(tmp_path)
    rows = [
        {"id": "t", "prompt": T2I, "n": 2, "num_inference_steps": STEPS},
        {"id": "e", "prompt": EDIT, "input_images": [str(image)], "num_inference_steps": STEPS},
    ]
    requests = tmp_path / "r.jsonl"
    requests.write_text("".join(json.dumps(row) + "\n" for row in rows))
    args = ["batch", str(requests), "--no-progress", "--batch-size", "2"]
    done = _torchrun(2, [*args, "--out", str(tmp_path / "two"), "--parallel", "cfg"], tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    with torch_threads(1):
        assert main([*args, "--out", str(tmp_path / "one")]) == 0
    files = ["t/0.png", "t/1.png", "e/0.png"]
    for file in files:
        two = np.asarray(Image.open(tmp_path / "two" / file))
        assert np.array_equal(two, np.asarray(Image.open(tmp_path / "one" / file))), file
    assert not (tmp_path / "two" / "results.rank1.jsonl").exists()
    assert len((tmp_path / "two" / "results.jsonl").read_text().splitlines()) == len(files)
