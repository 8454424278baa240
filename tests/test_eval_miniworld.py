"""omnigen eval miniworld: few-shot composition, pairing of outputs with samples, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from omnigen.eval import miniworld as ev
from omnigen.miniworld import world as mw
from omnigen.miniworld.tasks import FEW_SHOT_ONLY_TASKS

torch.set_num_threads(1)
TASKS = ["few_shot/invert", "few_shot/mirror", "t2i/objects", "edit/move", "cv/edges"]


def test_compose_few_shot_matches_the_x2i_rule():
    from omnigen.training.x2i import FewShot, X2ISample, compose_instruction

    shot = FewShot(
        "<img><|image_1|></img> and <img><|image_2|></img> combined", (Path("e1"), Path("e2")), Path("eo")
    )
    sample = X2ISample(
        "put <img><|image_1|></img> in <img><|image_2|></img>",
        (Path("q1"), Path("q2")),
        Path("o"),
        None,
        "id",
        1.0,
        shot,
        "f:1",
    )
    few_shot = {
        "instruction": shot.instruction,
        "input_images": list(shot.input_images),
        "output_image": shot.output_image,
    }
    assert ev.compose_few_shot(
        sample.instruction, list(sample.input_images), few_shot
    ) == compose_instruction(sample)
    assert ev.compose_few_shot("a cat", [], None) == ("a cat", [])


def test_items_add_a_no_example_twin_for_few_shot_only_tasks():
    samples = mw.generate(12, 0, "heldout", size=16, tasks=TASKS)
    items = ev.build_items(samples, seed=100)
    mains = [i for i in items if i.variant == ev.MAIN]
    twins = [i for i in items if i.variant == ev.NO_EXAMPLE]
    assert [i.seed for i in mains] == [100 + k for k in range(12)]
    expected = [k for k, s in enumerate(samples) if s.meta["task"] in FEW_SHOT_ONLY_TASKS]
    assert expected and [t.index for t in twins] == expected
    for twin in twins:
        sample = samples[twin.index]
        assert twin.prompt == sample.instruction and len(twin.images) == len(sample.input_images)
        assert twin.seed == mains[twin.index].seed  # same noise: only the example differs
        assert "Here is an example" in mains[twin.index].prompt


class Oracle:
    """Returns each sample's ground truth (found by prompt and seed), or black images when `blind`."""

    def __init__(self, samples, seed: int, blind_variant: str | None = None) -> None:
        self.targets = {}
        for item in ev.build_items(samples, seed):
            self.targets[(item.prompt, item.seed)] = (samples[item.index].output_image, item.variant)
        self.blind_variant = blind_variant
        self.calls = []

    def __call__(self, prompts, input_images=None, seed=0, num_images_per_prompt=1, **kwargs):
        self.calls.append(len(prompts))
        out = []
        for k, prompt in enumerate(prompts):
            target, variant = self.targets[(prompt, seed + k)]
            image = np.zeros_like(target) if variant == self.blind_variant else target
            out.append(Image.fromarray(image))
        return out


def test_outputs_are_scored_against_their_own_samples():
    samples = mw.generate(14, 0, "heldout", size=16, tasks=TASKS)
    oracle = Oracle(samples, seed=3)
    result = ev.evaluate(oracle, "heldout", 14, seed=3, size=16, batch_size=4, tasks=TASKS, progress=False)
    summary = result.summary()
    assert summary["overall"] == {"n": 14, "accuracy": 1.0}
    assert all(v["accuracy"] == 1.0 for v in summary["tasks"].values())
    assert max(oracle.calls) <= 4 and sum(oracle.calls) == len(result.records) + len(result.ablation_records)
    for task, row in summary["few_shot_ablation"].items():
        assert task in FEW_SHOT_ONLY_TASKS and row["with_example"] == 1.0 and row["without_example"] == 1.0
    # a model that ignores the query without its example fails exactly the ablation half
    blind = ev.evaluate(
        Oracle(samples, 3, ev.NO_EXAMPLE), "heldout", 14, seed=3, size=16, tasks=TASKS, progress=False
    )
    ablation = blind.summary()["few_shot_ablation"]
    assert ablation and all(
        r["with_example"] == 1.0 and r["without_example"] == 0.0 for r in ablation.values()
    )
    assert "without example" in ev.format_summary(blind.summary())


def test_cli_writes_json_and_prints_tables(model_folder, tmp_path, capsys):
    from omnigen.cli.main import main

    out = tmp_path / "mw.json"
    argv = [
        "eval",
        "miniworld",
        "--split",
        "compositional",
        "--model",
        str(model_folder),
        "--n",
        "6",
        "--out",
        str(out),
        "--steps",
        "2",
        "--step-cache",
        "0.1",
        "--tasks",
        "few_shot/mirror",
        "t2i",
        "--no-progress",
        "--device",
        "cpu",
    ]
    assert main(argv) == 0
    data = json.loads(out.read_text())
    assert data["split"] == "compositional" and data["overall"]["n"] == 6 and len(data["records"]) == 6
    assert set(data["families"]) <= {"t2i", "few_shot"} and "tasks" in data
    assert data["overrides"] == {"num_inference_steps": 2, "step_cache_threshold": 0.1}
    assert data["seconds"] > 0
    assert [r["task"] for r in data["records"]].count("few_shot/mirror") == 1  # fixed by the data seed
    assert data["few_shot_ablation"]["few_shot/mirror"]["n"] == 1 and len(data["ablation_records"]) == 1
    printed = capsys.readouterr().out
    assert "family" in printed and "accuracy" in printed and str(out) in printed


@pytest.mark.parametrize("split", ["heldout", "compositional"])
def test_split_samples_are_what_the_eval_scores(split):
    samples = mw.generate(3, 0, split, size=16)
    assert [s.id for s in samples] == [f"{split}-0-{k:06d}" for k in range(3)]
