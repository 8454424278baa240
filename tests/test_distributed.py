"""torchrun with 2 CPU processes (gloo), DDP and FSDP2, takes the same steps as one process that sees the
same global batch: per-step losses within 1e-5, resume included.

This file is also the script torchrun runs: ``python -m torch.distributed.run --standalone
--nproc_per_node 2 tests/test_distributed.py CONFIG.json [STOP_AFTER]``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TOLERANCE = 1e-5
STEPS = 4
LORA = {"lora": {"rank": 4, "alpha": 8}}


def val(root) -> dict:
    """Validation on 5 of the 6 rows every 2 steps: 2 ranks x 3 rows, one of them a zero-weight pad."""
    return {"val_data": str(root / "train.jsonl"), "val_every": 2, "val_samples": 5}


def val_losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "val.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(2, STEPS + 1, 2))
    return [r["val_loss"] for r in rows]


def losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    return [r["loss"] for r in rows]


def torchrun(config, stop_after: int | None = None, timeout: int = 120) -> None:
    """Straight runs go through the CLI (``omnigen train``); a stop_after run through this file."""
    path = Path(config.out_dir).with_suffix(".yaml")
    path.write_text(config.to_json())  # JSON is YAML
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    if stop_after is None:
        command += ["-m", "omnigen", "train", "--config", str(path), "--device", "cpu"]
    else:
        command += [__file__, str(path), str(stop_after)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]


@pytest.fixture(scope="module")
def single(world, tmp_path_factory):
    """One process, global batch 6 (the whole miniworld): a full fine-tune and a LoRA run of a random base
    (random, not freshly initialised: a zeroed head would give the adapter no gradient)."""
    from conftest import random_model
    from omnigen.config import OmniGenConfig
    from omnigen.training.trainer import train
    from omnigen.weights.checkpoint import save_model
    from test_training import PIXEL_MODEL

    root, _ = world
    out = tmp_path_factory.mktemp("single")
    save_model(random_model(OmniGenConfig.from_dict(PIXEL_MODEL), scale=0.05), out / "base")
    runs = {"dir": out, "base": str(out / "base")}
    for name, extra in (("full", val(root)), ("lora", LORA)):
        train(_config(root, out / name, 6, init_from=runs["base"], **extra), device="cpu")
        runs[name] = losses(out / name)
    runs["val"] = val_losses(out / "full")
    return runs


def _config(root, out, batch_size, **kw):
    from test_training import make_config

    stage = {"resolution": 16, "steps": STEPS, "batch_size": batch_size, "lr": 3e-3}
    kw.setdefault("ema_decay", 0.9)
    return make_config(root, out, STEPS, stages=[stage], drop_text=0.3, t_distribution="logit_normal", **kw)


def assert_same_curve(got: list[float], expected: list[float]) -> float:
    assert len(got) == len(expected) == STEPS
    diff = max(abs(a - b) for a, b in zip(got, expected))
    assert diff <= TOLERANCE, (got, expected)
    return diff


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_two_processes_match_one(world, single, tmp_path, kind):
    """2 ranks x batch 3 == 1 process x batch 6 (training and validation losses); the FSDP run also stops
    at step 2 and resumes."""
    root, _ = world
    config = _config(root, tmp_path / kind, 3, distributed=kind, init_from=single["base"], **val(root))
    if kind == "fsdp":
        torchrun(config, stop_after=2)
        assert losses(tmp_path / kind)[:2] and len(losses(tmp_path / kind)) == 2
    torchrun(config)
    print(kind, "max loss diff", assert_same_curve(losses(tmp_path / kind), single["full"]))
    assert max(abs(a - b) for a, b in zip(val_losses(tmp_path / kind), single["val"])) <= TOLERANCE

    from safetensors.torch import load_file

    got = load_file(str(tmp_path / kind / "final" / "model.safetensors"))
    ref = load_file(str(single["dir"] / "full" / "final" / "model.safetensors"))
    assert got.keys() == ref.keys()
    param_diff = max((got[k] - ref[k]).abs().max().item() for k in ref)
    print(kind, "max final (EMA) parameter diff", param_diff)
    assert param_diff <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_lora_two_processes_match_one(world, single, tmp_path, kind):
    """LoRA (frozen base, mixed requires_grad inside each sharded block); FSDP stops and resumes."""
    root, _ = world
    config = _config(root, tmp_path / kind, 3, distributed=kind, init_from=single["base"], **LORA)
    if kind == "fsdp":
        torchrun(config, stop_after=3)
    torchrun(config)
    print(kind, "lora max loss diff", assert_same_curve(losses(tmp_path / kind), single["lora"]))
    from safetensors.torch import load_file

    name = "adapter_model.safetensors"
    got = load_file(str(tmp_path / kind / "final" / name))
    ref = load_file(str(single["dir"] / "lora" / "final" / name))
    assert got.keys() == ref.keys() and len(ref) == 16
    print(kind, "lora max adapter diff", max((got[k] - ref[k]).abs().max().item() for k in ref))


def test_layout_independent_draws():
    """Each sample's generator depends on (seed, step, index) only; a rank's slice of a global batch."""
    from omnigen.training.sampling_data import sample_generator, shard

    a = sample_generator(0, 5, 3).initial_seed()
    assert a == sample_generator(0, 5, 3).initial_seed()
    assert len({a, sample_generator(0, 5, 4).initial_seed(), sample_generator(0, 6, 3).initial_seed()}) == 3
    assert shard([7, 8, 9, 10, 11], 0, 2) == ([7, 8, 9], [True] * 3)
    assert shard([7, 8, 9, 10, 11], 1, 2) == ([10, 11, 7], [True, True, False])
    assert shard([7], 1, 2) == ([7], [False])


if __name__ == "__main__":  # a torchrun worker
    import torch

    torch.set_num_threads(1)
    from omnigen.training.config import TrainConfig
    from omnigen.training.trainer import train

    data = json.loads(Path(sys.argv[1]).read_text())
    train(
        TrainConfig.from_dict(data),
        device="cpu",
        stop_after=int(sys.argv[2]) if len(sys.argv) > 2 else None,
    )
else:
    from test_training import world  # noqa: F401 - the fixture
