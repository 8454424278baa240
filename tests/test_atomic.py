"""omnigen.util.atomic: the one home of atomic writes, and the permissions of what every writer leaves."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from omnigen.util.atomic import atomic_folder, atomic_write


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def modes(folder: Path) -> dict[str, int]:
    """Permission bits of everything under ``folder`` (and itself as "."), by relative path."""
    found = {".": stat.S_IMODE(folder.stat().st_mode)}
    for path in folder.rglob("*"):
        found[str(path.relative_to(folder))] = stat.S_IMODE(path.stat().st_mode)
    return found


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_atomic_write_replaces_whole_and_leaves_nothing_on_error(tmp_path, umask_022):
    target = tmp_path / "a.txt"
    atomic_write(target, lambda path: path.write_text("first"))
    assert target.read_text() == "first" and modes(tmp_path)["a.txt"] == 0o644

    def fail(path: Path) -> None:
        path.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, fail)
    assert target.read_text() == "first" and leftovers(tmp_path) == []


def test_atomic_folder_gives_usual_permissions_and_replaces_only_with_overwrite(tmp_path, umask_022):
    from safetensors.torch import save_file

    target = tmp_path / "model"
    with atomic_folder(target) as tmp:
        save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors"))  # safetensors writes 0600
        (tmp / "sub").mkdir(mode=0o700)
        (tmp / "sub" / "x.json").write_text("{}")
        os.chmod(tmp / "sub" / "x.json", 0o600)
    assert modes(target) == {".": 0o755, "model.safetensors": 0o644, "sub": 0o755, "sub/x.json": 0o644}
    with pytest.raises(ValueError, match="exists and is not empty; pass overwrite=True"):
        with atomic_folder(target):
            pass
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_folder(target, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("boom")
    assert sorted(p.name for p in target.iterdir()) == ["model.safetensors", "sub"]  # untouched
    with atomic_folder(target, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"] and leftovers(tmp_path) == []


def test_exported_model_files_are_0644_like_other_model_files(tmp_path, umask_022):
    from omnigen.cli.main import main

    out = tmp_path / "exported"
    assert main(["export", str(out)]) in (0, None)
    found = modes(out)
    assert "model.safetensors" in found and "config.json" in found
    assert {name: mode for name, mode in found.items() if mode != (0o755 if name == "." else 0o644)} == {}


def test_training_checkpoints_and_latent_cache_write_atomically(tmp_path, umask_022):
    from omnigen.training.latent_cache import LatentCache
    from omnigen.training.state import load_checkpoint, save_checkpoint

    runs = tmp_path / "run"
    optimizer = {"state": {0: {"exp_avg": torch.ones(2), "step": 3}}, "param_groups": [{"lr": 0.1}]}
    for step in (1, 2, 2):  # the same step twice: replaced, not refused
        save_checkpoint(runs, {"w": torch.full((2,), step)}, None, optimizer, {"step": step}, keep=1)
    loaded = load_checkpoint(runs)
    assert loaded["path"].name == "step_00000002" and torch.equal(loaded["model"]["w"], torch.full((2,), 2))
    assert sorted(p.name for p in runs.iterdir()) == ["latest", "step_00000002"]  # no temporary names
    assert set(modes(runs / "step_00000002").values()) == {0o755, 0o644}

    cache = LatentCache(tmp_path / "cache", "codec", flush_every=1)
    cache.put("k", torch.arange(3.0))
    assert torch.equal(LatentCache(tmp_path / "cache", "codec").get("k"), torch.arange(3.0))
    assert leftovers(tmp_path / "cache") == [] and set(modes(tmp_path / "cache").values()) == {0o755, 0o644}


def test_one_home_for_atomic_writes():
    """No module renames files into place itself: every writer goes through omnigen.util.atomic."""
    src = Path(__file__).resolve().parents[1] / "src" / "omnigen"
    users = sorted(
        str(p.relative_to(src)) for p in src.rglob("*.py") if "os.replace(" in p.read_text(encoding="utf-8")
    )
    assert users == ["util/atomic.py"]
