"""The ComfyUI nodes (comfyui/), through a stand-in for ComfyUI's executor (tests/comfy_harness.py)."""

from __future__ import annotations

import inspect
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from comfy_harness import (
    Executor,
    FakeComfy,
    InterruptProcessingException,
    NodeError,
    PromptError,
    check_mappings,
    core_nodes,
    load_custom_node,
)

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "comfyui"
EXAMPLES = ROOT / "src" / "omnigen" / "assets" / "examples"
WORKFLOW = PACKAGE / "workflows" / "omnigen_edit.json"
LOADER = {
    "class_type": "OmniGenLoader",
    "inputs": {
        "model": "shipped miniature model",
        "dtype": "auto",
        "device": "cpu",
        "offload_model": False,
        "offload_kv_cache": True,
    },
}
SETTINGS = {
    "width": 16,
    "height": 16,
    "use_input_image_size": False,
    "steps": 3,
    "guidance_scale": 2.0,
    "img_guidance_scale": 1.5,
    "seed": 7,
    "sampler": "euler",
    "batch_size": 1,
}


@pytest.fixture(scope="module")
def package():
    # The folder name a user gives the link (a dash, so it cannot hide the omnigen library).
    return load_custom_node(PACKAGE, "omnigen-comfyui")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    inputs, outputs = tmp_path_factory.mktemp("input"), tmp_path_factory.mktemp("output")
    for name in ("02_edit_recolour_1.png", "06_subject_pair_1.png", "06_subject_pair_2.png"):
        shutil.copy(EXAMPLES / name, inputs / name)
    return inputs, outputs


@pytest.fixture(scope="module")
def executor(package, folders):
    """One executor for the module: the loader runs once and is reused from the cache, as in ComfyUI."""
    return Executor({**core_nodes(*folders), **package.NODE_CLASS_MAPPINGS})


def graph(prompt: str, images: tuple[str, ...] = (), **changes) -> dict:
    nodes = {"1": LOADER}
    generate = {"pipe": ["1", 0], "prompt": prompt, **SETTINGS, **changes}
    for k, name in enumerate(images, start=1):
        nodes[f"img{k}"] = {"class_type": "LoadImage", "inputs": {"image": name}}
        generate[f"image_{k}"] = [f"img{k}", 0]
    nodes["gen"] = {"class_type": "OmniGenGenerate", "inputs": generate}
    nodes["save"] = {"class_type": "SaveImage", "inputs": {"images": ["gen", 0], "filename_prefix": "t"}}
    return nodes


def run_image(executor: Executor, nodes: dict) -> tuple[torch.Tensor, object]:
    results = executor.run(nodes)
    return results["gen"]["outputs"][0][0], results["1"]["outputs"][0][0].pipeline


def pipeline_pixels(pipeline, prompt: str, images: tuple[str, ...] = (), **changes) -> torch.Tensor:
    """The pipeline's own output for the same settings (pixels in [-1, 1])."""
    s = {**SETTINGS, **changes}
    return pipeline(
        prompt,
        input_images=[Image.open(EXAMPLES / name) for name in images] or None,
        height=s["height"] or None,  # 0: the model's default
        width=s["width"] or None,
        num_inference_steps=s["steps"],
        guidance_scale=s["guidance_scale"],
        img_guidance_scale=s["img_guidance_scale"],
        seed=s["seed"],
        use_input_image_size_as_output=s["use_input_image_size"],
        num_images_per_prompt=s["batch_size"],
        output_type="pt",
        progress=False,
    )


# ------------------------------------------------------------------------------------------ registration
def test_package_registers_both_nodes_without_comfyui(package):
    # nothing of ComfyUI was needed to import it (pytest may import the repository root's
    # __init__.py under its folder's name, which may be "comfy")
    assert "comfy.model_management" not in sys.modules and "folder_paths" not in sys.modules
    assert set(package.NODE_CLASS_MAPPINGS) == {"OmniGenLoader", "OmniGenLoraLoader", "OmniGenGenerate"}
    assert set(package.NODE_DISPLAY_NAME_MAPPINGS) == set(package.NODE_CLASS_MAPPINGS)
    generate = package.NODE_CLASS_MAPPINGS["OmniGenGenerate"]
    assert generate.RETURN_TYPES == ("IMAGE",)
    assert package.NODE_CLASS_MAPPINGS["OmniGenLoader"].RETURN_TYPES == ("OMNIGEN_PIPE",)
    spec = generate.INPUT_TYPES()
    assert set(spec["required"]) == {"pipe", "prompt", "seed"} and spec["required"]["pipe"] == (
        "OMNIGEN_PIPE",
    )
    assert spec["optional"]["sampler"][0] == ["model default", "euler", "heun", "dpmpp_2m"]
    assert {k: v[0] for k, v in spec["optional"].items() if v[0] in ("IMAGE", "MASK")} == {
        "image_1": "IMAGE",
        "image_2": "IMAGE",
        "image_3": "IMAGE",
        "mask": "MASK",
    }
    # FUNCTION takes the required inputs by name, the settings as keywords, images and mask default None.
    parameters = inspect.signature(getattr(generate, generate.FUNCTION)).parameters
    assert (
        set(spec["required"]) < set(parameters)
        and parameters["settings"].kind is inspect.Parameter.VAR_KEYWORD
    )
    assert (
        all(parameters[f"image_{k}"].default is None for k in (1, 2, 3))
        and parameters["mask"].default is None
    )


def test_widgets_follow_generation_config(package):
    """Ranges are GenerationConfig's, with one value below each for "the model's default"."""
    from omnigen import generation

    spec = package.NODE_CLASS_MAPPINGS["OmniGenGenerate"].INPUT_TYPES()["optional"]
    assert spec["width"] == ("INT", {**spec["width"][1], "default": 0, "min": 0, "step": 16})
    assert spec["steps"][1]["default"] == 0 and spec["steps"][1]["min"] == 0
    assert spec["guidance_scale"][0] == "FLOAT" and spec["guidance_scale"][1]["min"] == -1.0
    assert spec["negative_prompt"][0] == "STRING" and spec["negative_prompt"][1]["default"] == ""
    assert spec["batch_size"][1]["default"] == 1 and spec["batch_size"][1]["min"] == 1
    assert spec["vae_tiling"] == (
        "BOOLEAN",
        {**spec["vae_tiling"][1], "default": generation.default("vae_tiling")},
    )
    assert spec["preset"][0] == ["model default", *generation.PRESETS]
    # ComfyUI's UI rounds a float widget to its step's decimals: a model-default value must survive that
    assert spec["time_shift"][1]["default"] == 0.0 and spec["time_shift"][1]["min"] == 0.0
    floats = {name: options["default"] for name, (kind, options) in spec.items() if kind == "FLOAT"}
    assert floats and all(float(value).is_integer() for value in floats.values()), floats
    loader = package.NODE_CLASS_MAPPINGS["OmniGenLoader"].INPUT_TYPES()
    assert set(generation.names("operator")) <= set(loader["optional"])
    assert loader["required"]["dtype"][0] == ["auto", "float32", "bfloat16", "float16", "stored"]


def test_the_mapping_check_rejects_a_broken_node():
    class Broken:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"x": ("INT", {"default": 1})}}

        RETURN_TYPES = ("IMAGE",)
        RETURN_NAMES = ("a", "b")
        FUNCTION = "run"
        CATEGORY = "x"

        def run(self, x):
            return (x,)

    module = type(sys)("broken")
    module.NODE_CLASS_MAPPINGS = {"Broken": Broken}
    with pytest.raises(TypeError, match="RETURN_NAMES"):
        check_mappings(module)


# ------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    ("change", "kind", "name"),
    [
        (lambda g: g["gen"]["inputs"].pop("prompt"), "required_input_missing", "prompt"),
        (lambda g: g["gen"]["inputs"].update(pipe=["img1", 0]), "return_type_mismatch", "pipe"),
        (lambda g: g["gen"]["inputs"].update(image_1=["1", 0]), "return_type_mismatch", "image_1"),
        (lambda g: g["gen"]["inputs"].update(steps="many"), "invalid_input_type", "steps"),
        (lambda g: g["gen"]["inputs"].update(steps=-1), "value_smaller_than_min", "steps"),
        (lambda g: g["gen"]["inputs"].update(seed=-1), "value_smaller_than_min", "seed"),
        (lambda g: g["gen"]["inputs"].update(guidance_scale=31.0), "value_bigger_than_max", "guidance_scale"),
        (lambda g: g["gen"]["inputs"].update(width=-16), "value_smaller_than_min", "width"),
        (lambda g: g["gen"]["inputs"].update(sampler="model"), "value_not_in_list", "sampler"),
        (lambda g: g["gen"]["inputs"].update(sampler="ddim"), "value_not_in_list", "sampler"),
        (lambda g: g["1"]["inputs"].update(dtype="int8"), "value_not_in_list", "dtype"),
        (lambda g: g["1"]["inputs"].pop("device"), "required_input_missing", "device"),
        (lambda g: g["gen"]["inputs"].update(pipe=["1", 3]), "bad_linked_input", "pipe"),
    ],
)
def test_validation_rejects_bad_inputs(executor, change, kind, name):
    nodes = json.loads(json.dumps(graph("<img><|image_1|></img> x", ("02_edit_recolour_1.png",))))
    change(nodes)
    calls = len(executor.calls)
    with pytest.raises(PromptError) as info:
        executor.run(nodes)
    assert [(e["type"], e["input_name"]) for e in info.value.errors] == [(kind, name)]
    assert len(executor.calls) == calls  # refused before any node ran


def test_a_prompt_without_an_output_node_is_refused(executor):
    nodes = graph("a red square")
    del nodes["save"]
    with pytest.raises(PromptError, match="prompt_no_outputs"):
        executor.run(nodes)


# ------------------------------------------------------------------------------------------ execution
def test_text_to_image_equals_the_pipeline(executor, folders):
    image, pipeline = run_image(executor, graph("a green square under a big violet triangle on gray"))
    assert image.shape == (1, 16, 16, 3) and image.dtype == torch.float32
    assert 0 <= image.min() and image.max() <= 1 and image.std() > 0
    pixels = pipeline_pixels(pipeline, "a green square under a big violet triangle on gray")
    assert torch.equal(image, (pixels * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1))
    # The pipeline's PIL output is the same picture.
    pil = pipeline("a green square under a big violet triangle on gray", **_pil_kwargs())[0]
    assert torch.equal((image[0] * 255).to(torch.uint8), torch.from_numpy(np.array(pil)))
    saved = sorted(folders[1].glob("t_*.png"))[-1]
    assert np.array_equal(np.array(Image.open(saved)), np.array(pil))


def _pil_kwargs() -> dict:
    s = SETTINGS
    return dict(
        height=s["height"],
        width=s["width"],
        num_inference_steps=s["steps"],
        guidance_scale=s["guidance_scale"],
        img_guidance_scale=s["img_guidance_scale"],
        seed=s["seed"],
        progress=False,
    )


@pytest.mark.parametrize(
    ("prompt", "images", "size"),
    [
        ("<img><|image_1|></img> make the orange circle green", ("02_edit_recolour_1.png",), True),
        (
            "put the triangle of <img><|image_1|></img> in the middle right and the circle of "
            "<img><|image_2|></img> at the centre. the background is black",
            ("06_subject_pair_1.png", "06_subject_pair_2.png"),
            False,
        ),
    ],
)
def test_image_inputs_equal_the_pipeline(executor, prompt, images, size):
    nodes = graph(prompt, images, use_input_image_size=size, batch_size=2)
    image, pipeline = run_image(executor, nodes)
    expected = pipeline_pixels(pipeline, prompt, images, use_input_image_size=size, batch_size=2)
    assert image.shape == (2, *expected.shape[-2:], 3)
    assert torch.equal(image, (expected * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1))
    assert not torch.equal(image[0], image[1])  # seeds seed and seed + 1


def test_a_loader_without_a_model_input_loads_the_shipped_model(package, folders):
    """An API workflow may name only model_path (or no model at all): the shipped model, as before the
    model list existed."""
    runner = Executor({**core_nodes(*folders), **package.NODE_CLASS_MAPPINGS})  # its own loader cache
    nodes = graph("a red square", steps=2)
    nodes["1"] = {**LOADER, "inputs": {k: v for k, v in LOADER["inputs"].items() if k != "model"}}
    image, pipeline = run_image(runner, nodes)
    assert image.shape == (1, 16, 16, 3) and pipeline.defaults.height == 16
    nodes["1"]["inputs"]["model_path"] = ""
    assert torch.equal(run_image(runner, nodes)[0], image)


def test_the_loader_keeps_the_stored_dtype_on_request(package, folders):
    """dtype "auto" means what it means everywhere (float32 for the shipped model on a CPU); "stored"
    keeps the file's own dtype (float16 for the shipped model), as ``from_pretrained(dtype=None)``."""
    runner = Executor({**core_nodes(*folders), **package.NODE_CLASS_MAPPINGS})
    nodes = graph("a red square", steps=2)
    dtypes = {}
    for choice in ("auto", "stored"):
        nodes["1"] = {**LOADER, "inputs": {**LOADER["inputs"], "dtype": choice, "device": "cpu"}}
        dtypes[choice] = next(run_image(runner, nodes)[1].model.parameters()).dtype
    assert dtypes == {"auto": torch.float32, "stored": torch.float16}


def test_the_loader_runs_once_for_several_prompts(executor):
    run_image(executor, graph("a red square", seed=1))
    run_image(executor, graph("a red square", seed=2))
    assert [c[1] for c in executor.calls].count("OmniGenLoader") == 1  # same inputs: ComfyUI's cache


def test_the_example_workflow_runs(executor, folders, package):
    workflow = json.loads(WORKFLOW.read_text())
    # as ComfyUI's "Export (API)" writes it: every widget of each node, so each value is validated
    for node in ("1", "3"):
        spec = package.NODE_CLASS_MAPPINGS[workflow[node]["class_type"]].INPUT_TYPES()
        widgets = {k for part in spec.values() for k, v in part.items() if v[0] not in ("IMAGE", "MASK")}
        assert widgets - {"pipe"} <= set(workflow[node]["inputs"]), widgets - set(workflow[node]["inputs"])
    results = executor.run(workflow)
    image = results["3"]["outputs"][0][0]
    pipeline = results["1"]["outputs"][0][0].pipeline
    settings = {k: workflow["3"]["inputs"][k] for k in SETTINGS}
    expected = pipeline_pixels(
        pipeline, workflow["3"]["inputs"]["prompt"], ("02_edit_recolour_1.png",), **settings
    )
    assert image.shape == (1, 16, 16, 3)  # use_input_image_size: the 16x16 input's size, not 1024
    assert torch.equal(image, (expected * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1))
    saved = results["4"]["ui"]["images"][0]["filename"]
    assert saved.startswith("omnigen_edit_") and (folders[1] / saved).is_file()


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"image_1": None, "image_2": ["img1", 0]}, "connect the input images in order from image_1"),
        ({"prompt": "no tag here"}, "image tags do not match 1 input image"),
        ({"pipe": "not a pipe"}, "pipe must come from the OmniGen loader node"),
        ({"image_1": "a file name"}, "image_1 must be a ComfyUI IMAGE tensor"),
    ],
)
def test_node_errors_are_clear(executor, changes, message):
    nodes = graph("<img><|image_1|></img> x", ("02_edit_recolour_1.png",))
    for key, value in changes.items():
        if value is None:
            nodes["gen"]["inputs"].pop(key)
        else:
            nodes["gen"]["inputs"][key] = value
    with pytest.raises(NodeError, match=message) as info:
        executor.run(nodes)
    assert isinstance(info.value.error, (ValueError, TypeError))


def test_a_batch_on_an_image_input_is_refused(package):
    collect_images = sys.modules["omnigen-comfyui.nodes"].collect_images
    with pytest.raises(ValueError, match="image_1 holds a batch of 2 images"):
        collect_images([torch.zeros(2, 8, 8, 3), None, None])
    pictures = collect_images([torch.full((1, 8, 6, 3), 128 / 255), torch.zeros(1, 8, 8, 3), None])
    assert [p.size for p in pictures] == [(6, 8), (8, 8)] and np.array(pictures[0]).max() == 128


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"steps": -3}, r"steps must be an int (>= 1|between 1 and \d+), got -3"),
        ({"batch_size": 0}, r"batch_size must be an int (>= 1|between 1 and \d+), got 0"),
        ({"width": 32}, r"width=32: this model was trained at sides \[16\] only"),
        ({"use_input_image_size": True}, "use_input_image_size"),
    ],
)
def test_errors_name_the_node_inputs(executor, changes, message):
    """The pipeline's messages name its arguments; the node's name its inputs."""
    _, pipeline = run_image(executor, graph("a red square"))
    loaded = sys.modules["omnigen-comfyui.nodes"].LoadedOmniGen(pipeline, {})
    generate = sys.modules["omnigen-comfyui.nodes"].OmniGenGenerate()
    with pytest.raises((ValueError, TypeError), match=message) as info:
        generate.generate(loaded, "a red square", 0, **changes)
    assert not any(
        name in str(info.value) for name in ("num_inference_steps", "num_images_per_prompt", "_as_output")
    )


# ------------------------------------------------------------------------------------------ defaults
def test_a_fresh_generate_node_runs_on_the_shipped_model(executor, package):
    """Every setting at its widget default (and, in API form, every setting left out) is the loaded
    model's own settings: the shipped model's 16 x 16 pixels and 25 steps, not GenerationConfig's 1024."""
    widgets = package.NODE_CLASS_MAPPINGS["OmniGenGenerate"].INPUT_TYPES()["optional"]
    defaults = {
        name: options["default"]
        for name, (kind, *rest) in widgets.items()
        for options in rest
        if "default" in options
    }
    fresh = {"pipe": ["1", 0], "prompt": "a red square", "seed": 0}
    for inputs in (fresh, {**fresh, **defaults}):
        nodes = {"1": LOADER, "gen": {"class_type": "OmniGenGenerate", "inputs": inputs}}
        nodes["save"] = {"class_type": "SaveImage", "inputs": {"images": ["gen", 0], "filename_prefix": "f"}}
        image, pipeline = run_image(executor, nodes)
        assert pipeline.defaults.height == 16 and pipeline.defaults.num_inference_steps == 25
        expected = pipeline("a red square", seed=0, output_type="pt", progress=False)
        assert image.shape == (1, 16, 16, 3)
        assert torch.equal(image, (expected * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1))


def test_mask_input_reaches_the_pipeline(executor, folders):
    nodes = graph("<img><|image_1|></img> make the orange circle green", ("02_edit_recolour_1.png",))
    nodes["mask"] = {"class_type": "LoadImage", "inputs": {"image": "mask.png"}}
    nodes["gen"]["inputs"].update(mask=["mask", 1], use_input_image_size=True)
    source = Image.open(EXAMPLES / "02_edit_recolour_1.png")
    alpha = np.full((source.height, source.width), 255, np.uint8)
    alpha[: source.height // 2] = 0  # transparent top half: LoadImage's MASK is 1 there (regenerate)
    Image.fromarray(np.dstack([np.array(source.convert("RGB")), alpha])).save(folders[0] / "mask.png")
    image = executor.run(nodes)["gen"]["outputs"][0][0][0]
    kept = torch.from_numpy(np.array(source.convert("RGB"))[source.height // 2 :]).float() / 255
    assert torch.allclose(image[source.height // 2 :], kept, atol=1 / 255)


def test_mask_conversion_follows_comfyui():
    to_pil = sys.modules["omnigen-comfyui.convert"].mask_to_pil
    mask = torch.zeros(1, 4, 6)
    mask[0, :2] = 1.0
    picture = to_pil(mask)
    assert picture.mode == "L" and picture.size == (6, 4)
    assert np.array_equal(np.array(picture), np.where(np.arange(4)[:, None] < 2, 255, 0).repeat(6, 1))
    with pytest.raises(ValueError, match="mask must be a MASK"):
        to_pil(torch.zeros(2, 4, 6))


# ------------------------------------------------------------------------------------------ ComfyUI services
def test_progress_and_cancel_go_through_comfyui(executor, monkeypatch):
    run_image(executor, graph("a blue circle", steps=1))  # the loader is cached before counting checks
    fake = FakeComfy(cancel_after=3).install(monkeypatch)
    executor.interrupt = fake.check  # ComfyUI checks once before each node function too
    try:
        with pytest.raises(NodeError) as info:
            executor.run(graph("a blue circle", steps=4, seed=11))
    finally:
        executor.interrupt = None
    assert isinstance(info.value.error, InterruptProcessingException)
    assert fake.progress == [(1, 4), (2, 4)]  # cancelled after the second of four steps

    fake.cancel_after = None
    fake.progress.clear()
    image, _ = run_image(executor, graph("a blue circle", steps=4, seed=11))
    assert fake.progress == [(1, 4), (2, 4), (3, 4), (4, 4)] and image.shape == (1, 16, 16, 3)


def test_auto_device_asks_comfyui(package, monkeypatch):
    host = sys.modules["omnigen-comfyui.host"]
    assert host.torch_device() == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    fake = FakeComfy(device="meta").install(monkeypatch)
    assert host.torch_device() == torch.device("meta")
    host.free_memory(1000, torch.device("cpu"))
    host.free_memory(1000, torch.device("meta"))
    assert fake.freed == [(1000, torch.device("meta"))]  # the CPU is never "freed"


def test_the_loader_refuses_cuda_without_cuda(package, monkeypatch):
    loader = package.NODE_CLASS_MAPPINGS["OmniGenLoader"]()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device 'cuda' was chosen but torch sees no CUDA device"):
        loader.load(model="shipped miniature model", dtype="auto", device="cuda", offload_model=False)


@pytest.mark.parametrize(
    ("returned", "message"),
    [
        ([torch.zeros(1, 4, 4, 3)], "want a 1-tuple"),  # a list, not a tuple
        ((torch.zeros(1, 4, 4, 3), 1), "want a 1-tuple"),
        ((torch.zeros(1, 4, 4, 4),), r"an IMAGE is \(B, H, W, 3\)"),
        ((torch.full((1, 4, 4, 3), 2.0),), r"values must lie in \[0, 1\]"),
    ],
)
def test_the_harness_holds_nodes_to_comfyui_conventions(folders, returned, message):
    class Source:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {}}

        RETURN_TYPES = ("IMAGE",)
        FUNCTION = "run"
        CATEGORY = "test"

        def run(self):
            return returned

    runner = Executor({**core_nodes(*folders), "Source": Source})
    with pytest.raises(NodeError, match=message):
        runner.run(
            {
                "1": {"class_type": "Source", "inputs": {}},
                "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}},
            }
        )


# ------------------------------------------------------------------------------------------ install
def fake_folder_paths(monkeypatch, models_dir: Path):
    """ComfyUI's ``folder_paths`` module (what the nodes use of it), for a ``models`` folder."""
    module = type(sys)("folder_paths")
    module.models_dir = str(models_dir)
    module.folder_names_and_paths = {"diffusers": ([str(models_dir / "diffusers")], set())}

    def add_model_folder_path(name, path, is_default=False):
        module.folder_names_and_paths.setdefault(name, ([], set()))[0].append(path)

    module.add_model_folder_path = add_model_folder_path
    monkeypatch.setitem(sys.modules, "folder_paths", module)
    return module


def test_the_loader_lists_comfyuis_model_folders(executor, monkeypatch, tmp_path):
    from omnigen.pipeline import default_model_path

    models = tmp_path / "models"
    (models / "omnigen").mkdir(parents=True)
    (models / "omnigen" / "mini").symlink_to(default_model_path(), target_is_directory=True)
    (models / "omnigen" / "empty").mkdir()  # no config.json: not a model
    for name, pipeline in (("omni", "OmniGenPipeline"), ("sdxl", "StableDiffusionXLPipeline")):
        (models / "diffusers" / name).mkdir(parents=True)
        (models / "diffusers" / name / "model_index.json").write_text(json.dumps({"_class_name": pipeline}))
    folder_paths = fake_folder_paths(monkeypatch, models)
    loader = sys.modules["omnigen-comfyui.nodes"].OmniGenLoader
    choices = loader.INPUT_TYPES()["optional"]["model"][0]
    assert choices == ["shipped miniature model", "omnigen/mini", "diffusers/omni"]
    assert folder_paths.folder_names_and_paths["omnigen"][0] == [str(models / "omnigen")]  # registered once
    nodes = graph("a red square", steps=2)
    nodes["1"] = {**LOADER, "inputs": {**LOADER["inputs"], "model": "omnigen/mini"}}
    image, pipeline = run_image(executor, nodes)
    assert image.shape == (1, 16, 16, 3) and pipeline.defaults.height == 16
    nodes["1"]["inputs"]["model"] = "omnigen/empty"
    with pytest.raises(PromptError, match="value_not_in_list"):
        executor.run(nodes)


@pytest.fixture
def cloned_as_omnigen(monkeypatch, tmp_path):
    """The repository loaded as ComfyUI loads ``custom_nodes/omnigen`` (a ``git clone`` of it)."""
    fake_folder_paths(monkeypatch, tmp_path / "models")  # ComfyUI imports it before any custom node
    import omnigen as library

    ours = [name for name in sys.modules if name.split(".")[0] == "omnigen_comfyui"]
    assert ours == []  # nothing cached: the root file really loads the nodes here
    try:
        yield load_custom_node(ROOT, "omnigen")
    finally:
        sys.modules["omnigen"] = library
        for name in [name for name in sys.modules if name.split(".")[0] == "omnigen_comfyui"]:
            del sys.modules[name]


def test_a_clone_of_the_repository_is_a_node_folder(cloned_as_omnigen, folders):
    """ComfyUI registers the folder as module "omnigen"; the library must still be the library."""
    assert set(cloned_as_omnigen.NODE_CLASS_MAPPINGS) == {
        "OmniGenLoader",
        "OmniGenLoraLoader",
        "OmniGenGenerate",
    }
    assert set(cloned_as_omnigen.NODE_DISPLAY_NAME_MAPPINGS) == set(cloned_as_omnigen.NODE_CLASS_MAPPINGS)
    assert hasattr(sys.modules["omnigen"], "OmniGenPipeline")  # not the node folder
    runner = Executor({**core_nodes(*folders), **cloned_as_omnigen.NODE_CLASS_MAPPINGS})
    nodes = graph("a red square", steps=1)
    image = runner.run(nodes)["gen"]["outputs"][0][0]
    assert image.shape == (1, 16, 16, 3)


def test_a_clone_works_without_the_library_installed(tmp_path):
    """ComfyUI-Manager installs requirements.txt only: the root file then imports omnigen from src/."""
    import subprocess
    import textwrap

    script = textwrap.dedent(
        f"""
        import importlib.util, sys, types
        from pathlib import Path
        root = Path({str(ROOT)!r})
        # no installed omnigen: drop every path entry that holds the library (PYTHONPATH, editable install)
        sys.path[:] = [p for p in sys.path if not (Path(p or ".") / "omnigen" / "__init__.py").is_file()]
        assert importlib.util.find_spec("omnigen") is None
        sys.modules["folder_paths"] = types.ModuleType("folder_paths")  # inside ComfyUI
        spec = importlib.util.spec_from_file_location("omnigen", root / "__init__.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["omnigen"] = module
        spec.loader.exec_module(module)
        print(sorted(module.NODE_CLASS_MAPPINGS), Path(sys.modules["omnigen"].__file__).relative_to(root))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [
        "['OmniGenGenerate',",
        "'OmniGenLoader',",
        "'OmniGenLoraLoader']",
        "src/omnigen/__init__.py",
    ]


def test_the_root_file_does_nothing_outside_comfyui():
    """pytest imports the repository's root __init__.py while collecting tests/: it must stay inert."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("repository_root", ROOT / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.NODE_CLASS_MAPPINGS == {} and "omnigen_comfyui" not in sys.modules


def test_requirements_are_the_library_dependencies():
    """ComfyUI-Manager installs requirements.txt; it must be what pyproject.toml says the library needs,
    the "lora" extra the LoRA node needs (a ComfyUI without peft refused every LoRA) and the "gguf" extra
    (GGUF model files)."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    extras = project["optional-dependencies"]
    wanted = project["dependencies"] + extras["lora"] + extras["gguf"]
    assert [line for line in lines if line and not line.startswith("#")] == wanted


# ------------------------------------------------------------------------------------------ LoRA
@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Two adapters that fit the shipped model (random, non-zero)."""
    pytest.importorskip("peft")
    from conftest import save_random_adapters
    from omnigen.pipeline import default_model_path
    from omnigen.weights.checkpoint import load_model

    def shipped():
        return load_model(default_model_path())[0]

    return tuple(save_random_adapters(shipped, tmp_path_factory.mktemp("loras"), ("a", "b")))


def test_lora_nodes_chain_and_leave_other_branches_alone(executor, adapters):
    from omnigen.weights import lora

    a, b = adapters
    prompt = "a green square under a big violet triangle on gray"
    nodes = graph(prompt)
    nodes["la"] = {
        "class_type": "OmniGenLoraLoader",
        "inputs": {"pipe": ["1", 0], "lora_path": str(a), "strength": 1.0},
    }
    nodes["lb"] = {
        "class_type": "OmniGenLoraLoader",
        "inputs": {"pipe": ["la", 0], "lora_path": str(b), "strength": 0.5},
    }
    nodes["gen2"] = {"class_type": "OmniGenGenerate", "inputs": {**nodes["gen"]["inputs"], "pipe": ["lb", 0]}}
    nodes["save2"] = {"class_type": "SaveImage", "inputs": {"images": ["gen2", 0], "filename_prefix": "l"}}
    results = executor.run(nodes)
    plain, stacked = results["gen"]["outputs"][0][0], results["gen2"]["outputs"][0][0]
    loaded = results["1"]["outputs"][0][0]
    assert loaded.loras == () and results["la"]["outputs"][0][0].loras == ((str(a), 1.0),)
    pipeline = loaded.pipeline
    lora.apply_loras(pipeline.model, [])
    expected_plain = (pipeline_pixels(pipeline, prompt) * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
    lora.apply_loras(pipeline.model, [(a, 1.0), (b, 0.5)])
    expected_stacked = (pipeline_pixels(pipeline, prompt) * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
    lora.apply_loras(pipeline.model, [])
    assert torch.equal(plain, expected_plain) and torch.equal(stacked, expected_stacked)
    assert not torch.equal(plain, stacked)  # the adapters matter


def test_the_loader_takes_a_lora_and_refuses_a_wrong_folder(executor, adapters, tmp_path):
    a, _ = adapters
    nodes = graph("a red circle")
    nodes["1"] = {**LOADER, "inputs": {**LOADER["inputs"], "lora_path": str(a), "lora_strength": 0.7}}
    results = executor.run(nodes)
    assert results["1"]["outputs"][0][0].loras == ((str(a), 0.7),)
    nodes["1"]["inputs"]["lora_path"] = str(tmp_path)
    with pytest.raises(NodeError, match="not a LoRA adapter folder"):
        executor.run(nodes)
    bad = graph("a red circle")
    bad["la"] = {
        "class_type": "OmniGenLoraLoader",
        "inputs": {"pipe": ["1", 0], "lora_path": str(a), "strength": float("nan")},
    }
    bad["gen"]["inputs"]["pipe"] = ["la", 0]
    with pytest.raises(NodeError, match="strength must be a finite number"):
        executor.run(bad)
