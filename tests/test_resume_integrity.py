"""Resuming only from intact checkpoints (manifest, finite tensors, every entry), a non-finite loss that
stops the run, and the EMA warm-up that makes a short run export what it learnt."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from omnigen.training.base import resolve_base
from omnigen.training.trainer import train
from omnigen.weights.checkpoint import CheckpointError
from test_training import make_config, world  # noqa: F401 - `world` is a fixture

STEPS = 3


def _config(root, out, **kw):
    kw = {"ema_decay": 0.9, "checkpoint_every": 1, "keep_checkpoints": 2, **kw}
    return make_config(root, out, STEPS, **kw)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


@pytest.fixture(scope="module")
def straight(world, tmp_path_factory):  # noqa: F811
    """A run straight through: its last checkpoint is what every resumed run must reach exactly."""
    root, _ = world
    out = tmp_path_factory.mktemp("straight")
    train(_config(root, out), device="cpu")
    return out / "checkpoints" / f"step_{STEPS:08d}"


def _assert_same_checkpoint(a: Path, b: Path) -> None:
    for name in ("model", "ema", "optimizer"):
        x, y = _tensors(a / f"{name}.safetensors"), _tensors(b / f"{name}.safetensors")
        assert x.keys() == y.keys(), name
        assert all(torch.equal(x[k], y[k]) for k in x), name


def _ff_block(path: Path) -> None:
    """4 KiB of 0xFF in the middle of the file's tensor data (the header stays readable)."""
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    start = header + (len(data) - header) // 2
    data[start : start + 4096] = b"\xff" * min(4096, len(data) - start)
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {"ff_block": _ff_block, "truncated": _truncate, "deleted": Path.unlink}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
@pytest.mark.parametrize("file", ["model.safetensors", "ema.safetensors", "optimizer.safetensors"])
def test_a_damaged_newest_checkpoint_is_named_and_the_run_resumes_exactly_from_the_one_before(
    world,  # noqa: F811
    straight,
    tmp_path,
    caplog,
    file,
    damage,
):
    root, _ = world
    config = _config(root, tmp_path / "run")
    train(config, device="cpu", stop_after=2)
    newest = tmp_path / "run" / "checkpoints" / "step_00000002"
    DAMAGE[damage](newest / file)
    with caplog.at_level(logging.INFO, logger="omnigen"):
        train(config, device="cpu")
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any(str(newest / file) in message for message in errors), errors
    assert "resumed from" in caplog.text and "step_00000001" in caplog.text
    _assert_same_checkpoint(straight, tmp_path / "run" / "checkpoints" / f"step_{STEPS:08d}")
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / "loss.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]  # step 2 retrained from step 1, logged once


def test_no_intact_checkpoint_is_an_error_naming_each_damaged_file(world, tmp_path):  # noqa: F811
    root, _ = world
    config = _config(root, tmp_path / "run")
    train(config, device="cpu", stop_after=2)
    checkpoints = tmp_path / "run" / "checkpoints"
    _ff_block(checkpoints / "step_00000002" / "model.safetensors")
    _truncate(checkpoints / "step_00000001" / "optimizer.safetensors")
    with pytest.raises(CheckpointError) as caught:
        train(config, device="cpu")
    message = str(caught.value)
    assert "step_00000002/model.safetensors" in message and "step_00000001/optimizer.safetensors" in message


def _drop_model_tensor(folder: Path) -> None:
    state = _tensors(folder / "model.safetensors")
    state.pop(sorted(k for k in state if k != "pos_embed")[0])
    save_file(state, str(folder / "model.safetensors"))


def _drop_optimizer_moment(folder: Path) -> None:
    state = _tensors(folder / "optimizer.safetensors")
    state.pop(sorted(k for k in state if k.endswith(".exp_avg"))[0])
    save_file(state, str(folder / "optimizer.safetensors"))


def _drop_optimizer_parameter(folder: Path) -> None:
    state = _tensors(folder / "optimizer.safetensors")
    name = sorted(k for k in state if k.endswith(".exp_avg"))[0].rsplit(".", 1)[0]
    save_file(
        {k: v for k, v in state.items() if not k.startswith(name + ".")},
        str(folder / "optimizer.safetensors"),
    )


def _put_nan(folder: Path) -> None:
    state = _tensors(folder / "ema.safetensors")
    first = sorted(state)[0]
    state[first] = torch.full_like(state[first], float("nan"))
    save_file(state, str(folder / "ema.safetensors"))


MISSING = {
    "model_tensor": _drop_model_tensor,
    "optimizer_moment": _drop_optimizer_moment,
    "optimizer_parameter": _drop_optimizer_parameter,
    "ema_file": lambda folder: (folder / "ema.safetensors").unlink(),
    "nan_ema": _put_nan,
}


@pytest.mark.parametrize("manifest", ["kept", "removed"])
@pytest.mark.parametrize("change", sorted(MISSING))
def test_a_missing_or_non_finite_entry_is_an_error_even_without_a_manifest(world, tmp_path, change, manifest):  # noqa: F811
    """A file rewritten without an entry fails the manifest; a checkpoint without a manifest (older
    code) is still checked entry by entry and tensor by tensor."""
    root, _ = world
    config = _config(root, tmp_path / "run", keep_checkpoints=1)
    train(config, device="cpu", stop_after=1)
    folder = tmp_path / "run" / "checkpoints" / "step_00000001"
    if manifest == "removed":
        (folder / "manifest.json").unlink()
    MISSING[change](folder)
    with pytest.raises(CheckpointError, match="step_00000001"):
        train(config, device="cpu")


def test_the_manifest_lists_every_file_with_its_size_and_hash(world, tmp_path):  # noqa: F811
    import hashlib

    root, _ = world
    train(_config(root, tmp_path / "run"), device="cpu", stop_after=1)
    folder = tmp_path / "run" / "checkpoints" / "step_00000001"
    manifest = json.loads((folder / "manifest.json").read_text())
    files = sorted(p.name for p in folder.iterdir() if p.name != "manifest.json")
    assert sorted(manifest["files"]) == files
    for name, entry in manifest["files"].items():
        data = (folder / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _nan_loss_at(monkeypatch, bad_step: int) -> None:
    """The loss (and per-sample losses) become NaN in optimizer step ``bad_step`` (1-based)."""
    from omnigen.training import step as step_module

    real, real_train_step = step_module.flow_matching_loss, step_module.train_step
    current = {}

    def loss(*args, **kwargs):
        out = real(*args, **kwargs)
        if current["step"] + 1 == bad_step:
            nan = float("nan")
            return type(out)(loss=out.loss * nan, per_sample=out.per_sample * nan, t=out.t)
        return out

    def train_step(run, step, *args):
        current["step"] = step
        return real_train_step(run, step, *args)

    from omnigen.training import trainer

    monkeypatch.setattr(step_module, "flow_matching_loss", loss)
    monkeypatch.setattr(trainer, "train_step", train_step)


def test_a_non_finite_loss_stops_the_run_naming_the_step_before_the_weights_change(
    world,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    from omnigen.training.step import NonFiniteLossError

    root, _ = world
    _nan_loss_at(monkeypatch, 2)
    config = _config(root, tmp_path / "run")
    with pytest.raises(NonFiniteLossError, match="step 2"):
        train(config, device="cpu")
    checkpoints = tmp_path / "run" / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step_00000001"
    assert not (tmp_path / "run" / "final").exists()


def test_skip_nonfinite_loss_skips_the_batch_and_keeps_the_weights_finite(world, tmp_path, monkeypatch):  # noqa: F811
    root, _ = world
    _nan_loss_at(monkeypatch, 2)
    config = _config(root, tmp_path / "run", skip_nonfinite_loss=True, keep_checkpoints=3)
    train(config, device="cpu")
    rows = [json.loads(x) for x in (tmp_path / "run" / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[1]["loss"] != rows[1]["loss"] and rows[2]["loss"] == rows[2]["loss"]  # NaN, then finite
    checkpoints = tmp_path / "run" / "checkpoints"
    one, two = (_tensors(checkpoints / f"step_0000000{k}" / "model.safetensors") for k in (1, 2))
    assert all(torch.equal(one[k], two[k]) for k in one)  # step 2 took no update
    final = _tensors(tmp_path / "run" / "final" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in final.values())
    state = json.loads((checkpoints / "step_00000003" / "state.json").read_text())
    assert state["ema_updates"] == 2  # the skipped step did not move the EMA either


def test_a_short_run_exports_most_of_what_it_learnt_and_resumes_its_ema_exactly(world, tmp_path, caplog):  # noqa: F811
    """ema_decay 0.999 over 20 steps: without the warm-up the export would have moved ~2% of the way the
    raw weights moved; with it the EMA follows them. A split run reaches the same EMA exactly."""
    from omnigen.model import OmniGenModel

    root, _ = world
    steps = 20
    config = make_config(root, tmp_path / "a", steps, ema_decay=0.999)
    with caplog.at_level(logging.INFO, logger="omnigen"):
        train(config, device="cpu")
    assert "exporting the EMA weights: 20 updates" in caplog.text
    torch.manual_seed(config.seed)  # the trainer's initialisation of a new model
    start = OmniGenModel(resolve_base(config).model_config)
    start.initialize_weights()
    initial = start.state_dict()
    raw = _tensors(tmp_path / "a" / "checkpoints" / f"step_{steps:08d}" / "model.safetensors")
    exported = _tensors(tmp_path / "a" / "final" / "model.safetensors")
    names = sorted(_tensors(tmp_path / "a" / "checkpoints" / f"step_{steps:08d}" / "ema.safetensors"))

    def moved(weights):
        return torch.sqrt(sum(((weights[k].float() - initial[k]) ** 2).sum() for k in names))

    assert moved(raw) > 0
    assert moved(exported) > 0.5 * moved(raw), (moved(exported), moved(raw))
    split = make_config(root, tmp_path / "b", steps, ema_decay=0.999)
    train(split, device="cpu", stop_after=7)
    train(split, device="cpu")
    ema = [_tensors(tmp_path / n / "checkpoints" / f"step_{steps:08d}" / "ema.safetensors") for n in "ab"]
    assert all(torch.equal(ema[0][k], ema[1][k]) for k in names)
