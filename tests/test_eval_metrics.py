"""Benchmark metrics on hand-made cases with known answers, and the benchmark readers/layouts."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from omnigen.eval import metrics
from omnigen.eval.metrics import (
    SegmentationIoU,
    binary_f1,
    canny_edges,
    canny_f1,
    depth_label_to_uint8,
    depth_prediction_to_uint8,
    mean_pairwise_cosine,
    ms_ssim,
    rmse,
    ssim,
)

torch.set_num_threads(1)


def square_image(left: int, top: int, size: int = 64, side: int = 16) -> Image.Image:
    array = np.zeros((size, size, 3), dtype=np.uint8)
    array[top : top + side, left : left + side] = 255
    return Image.fromarray(array)


# --------------------------------------------------------------------------------------------------
# Canny F1
# --------------------------------------------------------------------------------------------------


def test_binary_f1_known_values():
    target = np.array([1, 1, 1, 1, 0, 0, 0, 0], dtype=bool)
    assert binary_f1(target, target) == 1.0
    assert binary_f1(np.array([1, 1, 0, 0, 1, 1, 0, 0]), target) == 0.5  # P = R = 1/2
    assert binary_f1(np.array([1, 1, 0, 0, 0, 0, 0, 0]), target) == pytest.approx(2 / 3)  # P 1, R 1/2
    assert binary_f1(np.zeros(8), target) == 0.0
    assert binary_f1(np.zeros(8), np.zeros(8)) == 0.0  # torchmetrics' zero_division


def test_canny_edges_follow_the_square_outline():
    edges = canny_edges(square_image(20, 24))
    ys, xs = np.nonzero(edges)
    assert edges.dtype == bool and edges.shape == (64, 64)
    assert 18 <= xs.min() <= 21 and 34 <= xs.max() <= 37 and 22 <= ys.min() <= 25 and 38 <= ys.max() <= 41
    assert not edges[28:36, 24:32].any()  # the flat inside has no edge
    assert not canny_edges(Image.new("RGB", (64, 64), (90, 90, 90))).any()


def test_canny_f1_identical_one_disjoint_zero_pooled_over_outputs():
    image = square_image(8, 8)
    condition = canny_edges(image)
    assert canny_f1([image], condition) == 1.0
    assert canny_f1([square_image(40, 40)], condition) == 0.0  # edges in another place
    assert canny_f1([Image.new("RGB", (64, 64))], condition) == 0.0
    # one perfect and one blank output, pooled: 2 tp / (pred + target) = 2E / (E + 2E)
    assert canny_f1([image, Image.new("RGB", (64, 64))], condition) == pytest.approx(2 / 3)


def test_canny_metric_uses_opencv_thresholds_100_200():
    # a step of 60 grey levels: gradient magnitude under the low threshold of 100 -> no edge
    array = np.zeros((32, 32, 3), dtype=np.uint8)
    array[:, 16:] = 15
    assert not canny_edges(array).any()
    array[:, 16:] = 255
    assert canny_edges(array).any()


# --------------------------------------------------------------------------------------------------
# SSIM / MS-SSIM
# --------------------------------------------------------------------------------------------------


def test_ssim_identical_is_one_and_constants_match_the_formula():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 40, 40, generator=g, dtype=torch.float64)
    assert torch.allclose(ssim(x, x), torch.ones(2, dtype=torch.float64))
    a, b = 0.2, 0.6
    c1 = (0.01 * 1.0) ** 2  # variances are 0, so only the luminance term is left
    value = ssim(np.full((32, 32), a), np.full((32, 32), b))
    assert float(value[0]) == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-9)


def test_ms_ssim_identical_is_one_and_degrades_with_noise():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 1, 192, 192, generator=g, dtype=torch.float64)
    assert float(ms_ssim(x, x)[0]) == pytest.approx(1.0)
    noisy = (x + 0.3 * torch.rand(x.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    assert 0.0 < float(ms_ssim(x, noisy)[0]) < 1.0
    with pytest.raises(ValueError, match="sides"):
        ms_ssim(x[..., :100, :100], x[..., :100, :100])


def test_ssim_matches_torchmetrics_when_installed():
    tm = pytest.importorskip("torchmetrics.image")
    g = torch.Generator().manual_seed(2)
    x = torch.rand(1, 3, 180, 200, generator=g, dtype=torch.float64)
    y = (x + 0.2 * torch.rand(x.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    reference = tm.StructuralSimilarityIndexMeasure(data_range=1.0).double()(x, y)
    assert float(ssim(x, y)[0]) == pytest.approx(float(reference), abs=1e-6)
    reference = tm.MultiScaleStructuralSimilarityIndexMeasure(data_range=1.0).double()(x, y)
    assert float(ms_ssim(x, y)[0]) == pytest.approx(float(reference), abs=1e-6)


# --------------------------------------------------------------------------------------------------
# Depth RMSE and segmentation mIoU
# --------------------------------------------------------------------------------------------------


def test_depth_maps_and_rmse():
    assert rmse(np.full((4, 4), 10), np.full((4, 4), 13)) == 3.0
    assert rmse(np.array([0, 0, 0, 4]), np.zeros(4)) == 2.0
    pred = depth_prediction_to_uint8(np.array([[0.0, 1.0], [2.0, 4.0]]), (2, 2))
    assert pred.tolist() == [[0, 63], [127, 255]]  # divided by the max, x255, truncated
    label = depth_label_to_uint8(np.array([[10, 20], [30, 10]], dtype=np.uint8), (2, 2))
    assert label.tolist() == [[0, 127], [255, 0]]  # min-max to 0..255


def test_segmentation_iou_known_values_and_accumulation():
    pred = np.array([[0, 0], [1, 1]])
    label = np.array([[0, 1], [1, 1]])
    one = SegmentationIoU(num_classes=3)
    one.update(pred, label)
    result = one.compute()
    assert result["iou_per_class"] == [0.5, pytest.approx(2 / 3), None]  # class 2 never appears
    assert result["miou"] == pytest.approx((0.5 + 2 / 3) / 2)
    # data-set level: intersections and unions are summed before dividing
    both = SegmentationIoU(num_classes=3)
    both.update(pred, label)
    both.update(np.array([[2, 2]]), np.array([[2, 0]]))
    assert both.compute()["iou_per_class"] == [pytest.approx(1 / 3), pytest.approx(2 / 3), 0.5]
    # ADE20K: label 0 is ignored, labels 1..K are classes 0..K-1
    ade = SegmentationIoU(num_classes=2, reduce_zero_label=True)
    ade.update(np.array([[0, 1, 1]]), np.array([[1, 2, 0]]))
    assert ade.compute()["miou"] == 1.0


# --------------------------------------------------------------------------------------------------
# CLIP and DINO with tiny random models
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_clip_dino(tmp_path_factory):
    pytest.importorskip("transformers")
    from conftest import tiny_clip_dino_folders

    clip_dir, dino_dir = tiny_clip_dino_folders(tmp_path_factory.mktemp("models"))
    return metrics.ClipFeatures.from_pretrained(str(clip_dir)), metrics.DinoFeatures.from_pretrained(
        str(dino_dir)
    )


def test_mean_pairwise_cosine_known_values():
    a = torch.tensor([[1.0, 0.0]])
    assert mean_pairwise_cosine(a, torch.tensor([[2.0, 0.0], [0.0, 3.0]])) == pytest.approx(0.5)
    assert mean_pairwise_cosine(a, torch.tensor([[0.0, 1.0]])) == pytest.approx(0.0)
    assert mean_pairwise_cosine(a, -a) == pytest.approx(-1.0)


def test_identical_images_score_one(tiny_clip_dino, rgb_image):
    clip, dino = tiny_clip_dino
    images = [rgb_image(40, 30, seed=s) for s in range(3)]
    assert metrics.clip_i(clip, images, images) == pytest.approx([1.0] * 3, abs=1e-5)
    assert metrics.dino(dino, images, images) == pytest.approx([1.0] * 3, abs=1e-5)
    other = metrics.clip_i(clip, images, images[::-1])
    assert other[1] == pytest.approx(1.0, abs=1e-5) and other[0] < 0.9999


def test_clip_t_is_the_cosine_clip_itself_computes(tiny_clip_dino, rgb_image):
    clip, _ = tiny_clip_dino
    images, texts = [rgb_image(seed=1), rgb_image(seed=2)], ["a cat", "two dogs on a mat"]
    ours = metrics.clip_t(clip, images, texts)
    inputs = clip.processor(text=texts, images=images, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = clip.model(**inputs)
    reference = (out.logits_per_image / clip.model.logit_scale.exp()).diagonal()
    assert ours == pytest.approx(reference.tolist(), abs=1e-5)


# --------------------------------------------------------------------------------------------------
# Benchmark readers and layouts
# --------------------------------------------------------------------------------------------------


def test_geneval_layout_and_summary(pipeline, tmp_path):
    from omnigen.batch import run_batch
    from omnigen.eval import geneval

    rows = [
        {"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"},
        {"tag": "colors", "include": [{"class": "dog", "count": 1, "color": "red"}], "prompt": "a red dog"},
    ]
    meta = tmp_path / "evaluation_metadata.jsonl"
    meta.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    metadata = geneval.read_metadata(meta)
    requests = geneval.build_requests(metadata, n_samples=2, seed=5)
    geneval.write_metadata(out, metadata)
    run_batch(pipeline, requests, out, layout=geneval.sample_layout, progress=False)
    for i, row in enumerate(rows):
        folder = out / f"{i:05d}"
        assert json.loads((folder / "metadata.jsonl").read_text()) == row
        assert sorted(p.name for p in (folder / "samples").iterdir()) == ["00000.png", "00001.png"]
    # what the official scorer sees: digit folders only
    assert sorted(p.name for p in out.iterdir() if p.is_dir() and p.name.isdigit()) == ["00000", "00001"]
    results = tmp_path / "scored.jsonl"
    scored = [
        ("single_object", True, "a"),
        ("single_object", False, "a"),
        ("colors", False, "b"),
        ("colors", False, "b"),
    ]
    results.write_text(
        "".join(json.dumps({"tag": t, "correct": c, "metadata": m}) + "\n" for t, c, m in scored)
    )
    summary = geneval.summarize_scores(results)
    assert summary["tags"] == {"single_object": 0.5, "colors": 0.0} and summary["overall"] == 0.25
    assert summary["correct_prompts"] == 0.5
    assert "0.990" in geneval.format_summary(summary)  # the paper's single-object score beside ours


def test_emu_edit_reader_requests_and_scores(tiny_clip_dino, tmp_path, rgb_image):
    from omnigen.eval import emu_edit

    rgb_image(48, 40, seed=3).save(tmp_path / "src.png")
    rows = [
        {
            "idx": 7,
            "instruction": "make it red",
            "image": "src.png",
            "task": "color",
            "split": "test",
            "input_caption": "a cat",
            "output_caption": "a red cat",
        },
        {"idx": 8, "instruction": "x", "image": "src.png", "split": "validation", "output_caption": "y"},
    ]
    data = tmp_path / "emu.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    samples = emu_edit.read_emu_edit(data, split="test")
    assert [s.idx for s in samples] == ["7"]
    out = tmp_path / "out"
    (request,) = emu_edit.build_requests(samples, out, seed=3)
    assert request.prompt == "<img><|image_1|></img> make it red"
    assert request.params["use_input_image_size_as_output"] and request.params["img_guidance_scale"] == 2.0
    (out / "7").mkdir()
    Image.open(tmp_path / "src.png").save(out / "7" / "0.png")  # a perfect "no change" output
    result = emu_edit.score(samples, out, *tiny_clip_dino)
    assert result["metrics"]["clip_i"] == pytest.approx(1.0, abs=1e-5)
    assert result["metrics"]["dino"] == pytest.approx(1.0, abs=1e-5)
    assert -1 <= result["metrics"]["clip_t"] <= 1 and result["n"] == 1
    assert "0.8290" in emu_edit.format_summary(result)


def test_emu_edit_reads_the_hub_parquet_layout(tmp_path, rgb_image):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    from omnigen.eval import emu_edit

    buffer = __import__("io").BytesIO()
    rgb_image(20, 16, seed=4).save(buffer, format="PNG")
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    (tmp_path / "data").mkdir()
    for split, idx in (("test", [3, 4]), ("validation", [9])):
        table = pa.table(
            {
                "instruction": [f"edit {i}" for i in idx],
                "image": pa.array([{"bytes": buffer.getvalue(), "path": None}] * len(idx), type=image_type),
                "task": ["add"] * len(idx),
                "split": [split] * len(idx),
                "idx": idx,
                "hash": ["h"] * len(idx),
                "input_caption": ["in"] * len(idx),
                "output_caption": ["out"] * len(idx),
            }
        )
        pq.write_table(table, tmp_path / "data" / f"{split}-00000-of-00001.parquet")
    samples = emu_edit.read_emu_edit(tmp_path, split="test")
    assert [s.idx for s in samples] == ["3", "4"]
    requests = emu_edit.build_requests(samples, tmp_path / "out")
    assert Image.open(requests[0].input_images[0]).size == (20, 16)


DREAMBENCH_TABLE = """Classes

subject_name,class
backpack,backpack
dog,dog

Prompts

Object Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a red {0} {1}'.format(unique_token, class_token)
]

Live Subject Prompts

prompt_list = [
'a {0} {1} wearing a red hat'.format(unique_token, class_token)
]
"""


def test_dreambench_reader_prompts_and_scores(tiny_clip_dino, tmp_path, rgb_image):
    from omnigen.eval import dreambench

    root = tmp_path / "dataset"
    for name, seeds in (("backpack", (1, 2)), ("dog", (3,))):
        (root / name).mkdir(parents=True)
        for k, seed in enumerate(seeds):
            rgb_image(seed=seed).save(root / name / f"{k:02d}.jpg")
    (root / "prompts_and_classes.txt").write_text(DREAMBENCH_TABLE)
    bench = dreambench.read_dreambench(root)
    assert [(s.name, s.cls, s.live, len(s.images)) for s in bench.subjects] == [
        ("backpack", "backpack", False, 2),
        ("dog", "dog", True, 1),
    ]
    requests = dreambench.build_requests(bench, n=2)
    assert [r.id for r in requests] == ["backpack-00", "backpack-01", "dog-00"]
    assert requests[0].prompt == "a backpack in the jungle. The backpack is <img><|image_1|></img>."
    assert requests[2].meta["clip_text"] == "a dog wearing a red hat"
    assert requests[0].input_images[0].endswith("backpack/00.jpg")
    out = tmp_path / "out"
    (out / "dog-00").mkdir(parents=True)
    Image.open(root / "dog" / "00.jpg").save(out / "dog-00" / "0.png")  # the dog's only photo
    result = dreambench.score(bench, requests, out, *tiny_clip_dino)
    assert result["images"] == 1
    assert result["metrics"]["dino"] == pytest.approx(1.0, abs=1e-5)
    assert result["metrics"]["clip_i"] == pytest.approx(1.0, abs=1e-5)


def test_control_canny_and_annotated_kinds_end_to_end(tmp_path):
    from omnigen.eval import control

    square_image(8, 8, size=32, side=12).save(tmp_path / "a.png")
    gradient = np.tile(np.linspace(0, 255, 32).astype(np.uint8), (32, 1))
    Image.fromarray(gradient).save(tmp_path / "depth.png")
    labels = np.zeros((32, 32), dtype=np.uint8)
    labels[:, 16:] = 3
    labels[:4] = 0
    Image.fromarray(labels).save(tmp_path / "seg.png")
    rows = [
        {
            "image": "a.png",
            "text": "a white square",
            "control_depth": "depth.png",
            "prompt": "p",
            "control_seg": "a.png",
            "seg_map": "seg.png",
        }
    ]
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps(rows[0]) + "\n")

    def fake_outputs(requests, out, image):
        for request in requests:
            (out / request.id).mkdir(parents=True, exist_ok=True)
            for k in range(request.n):
                image.save(out / request.id / f"{k}.png")

    out = tmp_path / "canny"
    requests = control.prepare(control.read_control(data, "canny"), "canny", out, resolution=32, n=2)
    assert (
        requests[0].prompt.startswith("a white square. The canny edge") and requests[0].params["height"] == 32
    )
    fake_outputs(requests, out, Image.open(tmp_path / "a.png"))  # outputs with the very same edges
    assert control.score("canny", requests, out)["metrics"]["f1"] == pytest.approx(100.0)
    fake_outputs(requests, out, Image.new("RGB", (32, 32)))
    assert control.score("canny", requests, out)["metrics"]["f1"] == 0.0

    out = tmp_path / "depth"
    requests = control.prepare(control.read_control(data, "depth"), "depth", out, resolution=32)
    fake_outputs(requests, out, Image.open(tmp_path / "depth.png").convert("RGB"))
    gray = lambda image: np.asarray(image.convert("L"), dtype=np.float64)  # noqa: E731 - perfect depth
    assert control.score("depth", requests, out, gray)["metrics"]["rmse"] == pytest.approx(0.0)
    halved = lambda image: gray(image) * 0.5 + 1  # noqa: E731 - rescaling does not matter, an offset does
    assert control.score("depth", requests, out, halved)["metrics"]["rmse"] > 0

    out = tmp_path / "seg"
    requests = control.prepare(control.read_control(data, "seg"), "seg", out, resolution=32)
    fake_outputs(requests, out, Image.new("RGB", (32, 32)))
    perfect = lambda image: np.where(labels > 0, labels.astype(np.int64) - 1, 0)  # noqa: E731
    result = control.score("seg", requests, out, perfect, num_classes=4)
    assert result["metrics"]["miou"] == pytest.approx(100.0)
    wrong = lambda image: np.zeros((32, 32), dtype=np.int64)  # noqa: E731 - all class 0, label class 2
    assert control.score("seg", requests, out, wrong, num_classes=4)["metrics"]["miou"] == 0.0
    assert math.isclose(control.PAPER_SCORES["miou"], 40.06)


def test_cli_geneval_and_control_canny(model_folder, tmp_path, capsys):
    from omnigen.cli.main import main

    meta = tmp_path / "evaluation_metadata.jsonl"
    meta.write_text(json.dumps({"tag": "single_object", "prompt": "a photo of a cat"}) + "\n")
    out = tmp_path / "geneval"
    common = ["--model", str(model_folder), "--device", "cpu", "--no-progress"]
    assert main(["eval", "geneval", str(meta), "--out", str(out), "--n-samples", "2", *common]) == 0
    assert sorted(p.name for p in (out / "00000" / "samples").iterdir()) == ["00000.png", "00001.png"]
    assert "evaluation/evaluate_images.py" in capsys.readouterr().out

    square_image(8, 8, size=32, side=12).save(tmp_path / "a.png")
    data = tmp_path / "canny.jsonl"
    data.write_text(json.dumps({"image": "a.png", "text": "a white square"}) + "\n")
    out = tmp_path / "control"
    argv = [
        "eval",
        "control",
        "--kind",
        "canny",
        "--data",
        str(data),
        "--out",
        str(out),
        "--resolution",
        "32",
        "--n-samples",
        "2",
        *common,
    ]
    assert main(argv) == 0
    result = json.loads((out / "control_canny.json").read_text())
    assert result["conditions"] == 1 and 0.0 <= result["metrics"]["f1"] <= 100.0
    assert result["paper"] == {"f1": 38.96}
    printed = capsys.readouterr().out
    assert "f1" in printed and "38.96" in printed
