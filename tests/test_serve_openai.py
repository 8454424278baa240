"""OpenAI's Images API on `omnigen serve`, with the official `openai` package as the client.

The live tests share one `omnigen serve` process on 127.0.0.1 (a free port) with the shipped model, an API
key and a queue of one; requests ask for 2 steps through `extra_body` (our extension fields). Each image
is compared byte for byte with the same request through our own route (our field names, a PNG answer).
The in-process tests (FastAPI's TestClient, the tiny pipeline) cover the mapping rules and the mask.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import sys
import time
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)
pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from live import free_port, live_process  # noqa: E402
from omnigen.serve.app import create_app  # noqa: E402
from omnigen.serve.openai import tagged_prompt  # noqa: E402
from omnigen.serve.settings import ServeSettings  # noqa: E402

KEY = "test-key"
GENERATIONS, EDITS = "/v1/images/generations", "/v1/images/edits"
EXAMPLES = Path(__file__).resolve().parents[1] / "src" / "omnigen" / "assets" / "examples"
FEW_STEPS = {"num_inference_steps": 2}
SERVER_START_S = 180


def example(name: str) -> bytes:
    return (EXAMPLES / name).read_bytes()


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def decoded_png(b64_json: str) -> bytes:
    """The PNG of a b64_json answer, checked to be a valid PNG."""
    data = base64.b64decode(b64_json, validate=True)
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        image.verify()
    return data


# ------------------------------------------------------------------------------------------ live server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`omnigen serve` with the shipped model: key KEY, queue of 1, at most 256 output pixels (16x16)."""
    port = free_port()
    command = [sys.executable, "-m", "omnigen", "serve", "--port", str(port), "--api-key", KEY]
    command += ["--queue-size", "1", "--max-steps", "999", "--max-pixels", "256", "--max-outputs", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    base = f"http://127.0.0.1:{port}"

    def ready():
        return httpx.get(base + "/health", timeout=2).status_code == 200

    with live_process(command, log_path, ready, (httpx.HTTPError,), env, SERVER_START_S):
        yield base


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def own(server):
    """Our own route: our field names, with the key as a header."""
    with httpx.Client(base_url=server, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as c:
        yield c


def own_png(own, data=None, **kwargs) -> bytes:
    response = own.post(GENERATIONS, data=data, **kwargs)
    assert response.status_code == 200 and response.headers["content-type"] == "image/png", response.text
    return response.content


def test_models_list_and_retrieve(client):
    (card,) = client.models.list().data
    assert (card.id, card.object, card.owned_by) == ("omnigen", "model", "omnigen")
    assert isinstance(card.created, int) and card.created > 0
    assert card.model_extra["limits"]["max_steps"] == 999  # our details as extra fields
    assert card.model_extra["defaults"]["height"] == 16
    assert client.models.retrieve("omnigen").id == "omnigen"
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("dall-e-3")
    assert caught.value.code == "model_not_found"


def test_generate_equals_our_route(client, own):
    prompt = "a red circle in the top left on a white background"
    answer = client.images.generate(prompt=prompt, size="16x16", extra_body={"seed": 3, **FEW_STEPS})
    (image,) = answer.data
    assert isinstance(answer.created, int) and image.model_extra["seed"] == 3
    fields = {"prompt": prompt, "seed": 3, "height": 16, "width": 16, **FEW_STEPS}
    assert decoded_png(image.b64_json) == own_png(own, json={**fields, "response_format": "png"})
    pair = client.images.generate(
        prompt=prompt, n=2, extra_body={"seed": 5, "guidance_scale": 2.5, **FEW_STEPS}
    )
    ours = own.post(
        GENERATIONS, json={**fields, "seed": 5, "guidance_scale": 2.5, "num_images_per_prompt": 2}
    )
    assert ours.status_code == 200, ours.text
    assert [decoded_png(d.b64_json) for d in pair.data] == [
        decoded_png(d["b64_json"]) for d in ours.json()["data"]
    ]
    assert [d.model_extra["seed"] for d in pair.data] == [5, 6]
    with Image.open(io.BytesIO(decoded_png(pair.data[0].b64_json))) as first:
        assert first.size == (16, 16)


def test_edit_with_one_image_equals_our_route(client, own):
    source = example("02_edit_recolour_1.png")
    prompt = "please turn the orange circle green"
    answer = client.images.edit(
        image=("in.png", source, "image/png"), prompt=prompt, extra_body={"seed": 1, **FEW_STEPS}
    )
    (image,) = answer.data
    tagged = "<img><|image_1|></img> " + prompt
    assert image.revised_prompt == tagged
    form = {"prompt": tagged, "seed": "1", "use_input_image_size_as_output": "true", "response_format": "png"}
    form.update({k: str(v) for k, v in FEW_STEPS.items()})
    expected = own_png(own, data=form, files=[("images", ("in.png", source, "image/png"))])
    assert decoded_png(image.b64_json) == expected


def test_edit_with_two_images_equals_our_route(client, own):
    first, second = example("06_subject_pair_1.png"), example("06_subject_pair_2.png")
    prompt = "put the triangle in the middle right and the circle at the centre"
    answer = client.images.edit(
        image=[("a.png", first, "image/png"), ("b.png", second, "image/png")],  # sent as image[]
        prompt=prompt,
        size="16x16",
        extra_body={"seed": 2, **FEW_STEPS},
    )
    tagged = "<img><|image_1|></img> <img><|image_2|></img> " + prompt
    assert answer.data[0].revised_prompt == tagged
    form = {"prompt": tagged, "seed": "2", "height": "16", "width": "16", "response_format": "png"}
    form.update({k: str(v) for k, v in FEW_STEPS.items()})
    files = [("images", ("a.png", first, "image/png")), ("images", ("b.png", second, "image/png"))]
    assert decoded_png(answer.data[0].b64_json) == own_png(own, data=form, files=files)


def test_bad_key_is_an_authentication_error(server):
    with openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError) as caught:
            bad.images.generate(prompt="a cat")
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    assert caught.value.status_code == 401 and caught.value.code == "invalid_api_key"
    assert caught.value.type == "authentication_error"


@pytest.mark.parametrize(
    ("kwargs", "code", "param", "message"),
    [
        ({"size": "32x32"}, "invalid_value", "size", "[16] only (trained_sizes)"),  # the model says so first
        ({"n": 3}, "limit_exceeded", "n", "max_outputs=2"),
        ({"extra_body": {"num_inference_steps": 1000}}, "limit_exceeded", "num_inference_steps", "max_steps=999"),
        ({"prompt": "a" * 4001}, "limit_exceeded", "prompt", "max_prompt_chars"),
        ({"response_format": "url"}, "unsupported_value", "response_format", "keeps no images to link to"),
        ({"size": "big"}, "invalid_value", "size", "is not 'WxH'"),
        ({"output_format": "jpeg"}, "invalid_value", "output_format", "'png'"),
        ({"extra_body": {"colour": "red"}}, "unknown_parameter", "colour", "unknown field 'colour'"),
    ],
)  # fmt: skip
def test_oversized_or_invalid_request_is_a_bad_request_error(client, kwargs, code, param, message):
    kwargs = {"prompt": "a cat", **kwargs}
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(**kwargs)
    error = caught.value
    assert (error.status_code, error.code, error.param, error.type) == (
        400,
        code,
        param,
        "invalid_request_error",
    )
    assert message in error.message


def test_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.images.generate(prompt="a cat", model="dall-e-3")
    assert caught.value.code == "model_not_found" and "'omnigen'" in caught.value.message


def test_full_queue_is_a_rate_limit_error(server):
    """One slow job runs, one waits (queue of 1): the next request gets 429; then both are abandoned."""
    slow = {"prompt": "a red circle", "num_inference_steps": 999, "response_format": "png"}

    async def scenario() -> tuple[openai.RateLimitError, dict]:
        headers = {"Authorization": f"Bearer {KEY}"}
        async with httpx.AsyncClient(base_url=server, headers=headers, timeout=120) as http:

            async def health_until(predicate) -> dict:
                deadline = time.monotonic() + 60
                while not predicate(health := (await http.get("/health")).json()):
                    assert time.monotonic() < deadline, health
                    await asyncio.sleep(0.05)
                return health

            before = (await http.get("/health")).json()["jobs"]
            running = asyncio.create_task(http.post(GENERATIONS, json={**slow, "seed": 1}))
            await health_until(lambda h: h["running"])
            waiting = asyncio.create_task(http.post(GENERATIONS, json={**slow, "seed": 2}))
            await health_until(lambda h: h["waiting"] == 1)
            async with openai.AsyncOpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0) as c:
                with pytest.raises(openai.RateLimitError) as caught:
                    await c.images.generate(prompt="a cat", extra_body=FEW_STEPS)
            for task in (running, waiting):
                task.cancel()  # the client goes away: the server cancels both jobs
            await asyncio.gather(running, waiting, return_exceptions=True)
        async with httpx.AsyncClient(base_url=server, timeout=30) as http:
            after = await health_until(lambda h: not h["running"] and h["waiting"] == 0)
        assert after["jobs"]["cancelled"] - before["cancelled"] == 2
        return caught.value, after

    error, _ = asyncio.run(asyncio.wait_for(scenario(), 150))
    assert error.status_code == 429 and error.code == "queue_full" and error.type == "rate_limit_error"
    assert int(error.response.headers["retry-after"]) >= 1


# ------------------------------------------------------------------------------------------ in process


class MaskingPipeline:
    """The pipeline with a `mask` parameter (as the masked edit has): records the masks it is given."""

    def __init__(self, pipe) -> None:
        self._pipe, self.masks = pipe, []

    def __getattr__(self, name: str):
        return getattr(self._pipe, name)

    def __call__(self, prompt, input_images=None, mask=None, **kwargs):
        self.masks.append(mask)
        return self._pipe(prompt, input_images=input_images, **kwargs)


class NoMaskPipeline(MaskingPipeline):
    """A pipeline without masked editing (no `mask` parameter)."""

    def __call__(self, *args, **kwargs):
        return self._pipe(*args, **kwargs)


class FailingPipeline(MaskingPipeline):
    def __call__(self, *args, **kwargs):
        raise RuntimeError("out of memory")


def rgba_mask(width: int = 32, height: int = 32) -> bytes:
    """Transparent (edit here, OpenAI's convention) on the left half, opaque on the right."""
    mask = Image.new("RGBA", (width, height), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, width // 2, height))
    return png_bytes(mask)


def edit_parts(rgb_image, mask: bytes | None = None) -> list:
    files = [("image", ("in.png", png_bytes(rgb_image(32, 32, seed=4)), "image/png"))]
    return files + ([("mask", ("mask.png", mask, "image/png"))] if mask is not None else [])


def test_mask_becomes_the_pipelines_white_is_regenerate_mask(pipeline, rgb_image):
    masking = MaskingPipeline(pipeline)
    with TestClient(create_app(masking, ServeSettings())) as http:
        response = http.post(EDITS, data={"prompt": "make it blue"}, files=edit_parts(rgb_image, rgba_mask()))
        no_alpha = png_bytes(Image.new("L", (32, 32), 255))
        refused = http.post(EDITS, data={"prompt": "make it blue"}, files=edit_parts(rgb_image, no_alpha))
    assert response.status_code == 200, response.text
    (mask,) = masking.masks
    assert mask.mode == "L" and mask.size == (32, 32)
    assert mask.getpixel((0, 0)) == 255 and mask.getpixel((31, 31)) == 0  # transparent -> white
    assert refused.status_code == 400 and "no alpha channel" in refused.json()["error"]["message"]


def test_mask_is_refused_by_a_pipeline_without_masked_editing(pipeline, rgb_image):
    with TestClient(create_app(NoMaskPipeline(pipeline), ServeSettings())) as http:
        response = http.post(EDITS, data={"prompt": "make it blue"}, files=edit_parts(rgb_image, rgba_mask()))
        stats = http.get("/health").json()
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "mask" and "mask not supported" in error["message"]
    assert stats["jobs"]["accepted"] == 0


def test_masked_edit_keeps_the_opaque_pixels(pipeline, rgb_image):
    """Through the real pipeline (omnigen.sampling.inpaint): the opaque half is kept exactly."""
    source = rgb_image(32, 32, seed=4)
    with TestClient(create_app(pipeline, ServeSettings())) as http:
        data = {"prompt": "make it blue", "seed": "1", "response_format": "png"}
        response = http.post(EDITS, data=data, files=edit_parts(rgb_image, rgba_mask()))
    assert response.status_code == 200, response.text
    with Image.open(io.BytesIO(response.content)) as out:
        assert out.size == (32, 32)
        kept = (16, 0, 32, 32)  # the mask's opaque right half
        assert out.convert("RGB").crop(kept).tobytes() == source.crop(kept).tobytes()


def test_prompt_tags_are_prepended_only_when_missing():
    assert tagged_prompt("make it blue", 1) == "<img><|image_1|></img> make it blue"
    two = tagged_prompt("mix them", 2)
    assert two == "<img><|image_1|></img> <img><|image_2|></img> mix them"
    written = "<img><|image_2|></img> onto <img><|image_1|></img>"
    assert tagged_prompt(written, 2) == written
    assert tagged_prompt("a cat", 0) == "a cat"


def test_openai_fields_map_onto_ours(pipeline, rgb_image):
    base = {"prompt": "a red circle", "seed": 4, "response_format": "png"}
    with TestClient(create_app(pipeline, ServeSettings())) as http:
        ours = http.post(GENERATIONS, json={**base, "width": 24, "height": 16}).content
        theirs = http.post(GENERATIONS, json={**base, "size": "24x16", "quality": "hd", "style": "vivid"})
        agreeing = http.post(GENERATIONS, json={**base, "size": "24x16", "width": 24, "user": "u1"})
        clash = http.post(GENERATIONS, json={**base, "n": 2, "num_images_per_prompt": 3})
        streamed = http.post(GENERATIONS, json={**base, "stream": True})
        edit = {"prompt": "make it blue", "seed": "4"}
        edit_default = http.post(EDITS, data=edit, files=edit_parts(rgb_image))
        no_image = http.post(EDITS, data={"prompt": "make it blue"})
        tagged = http.post(
            EDITS, data={**edit, "prompt": "<img><|image_1|></img> make it blue"}, files=edit_parts(rgb_image)
        )
    assert theirs.status_code == 200 and theirs.content == ours  # quality/style: accepted, ignored
    assert agreeing.content == ours
    assert clash.status_code == 400 and clash.json()["error"]["param"] == "n"
    assert streamed.status_code == 400 and streamed.json()["error"]["param"] == "stream"
    body = edit_default.json()
    assert (body["data"][0]["width"], body["data"][0]["height"], body["size"]) == (32, 32, "32x32")
    assert body["data"][0]["revised_prompt"] == "<img><|image_1|></img> make it blue"
    assert "revised_prompt" not in tagged.json()["data"][0]  # the client's prompt is used as written
    assert tagged.json()["data"][0]["b64_json"] == body["data"][0]["b64_json"]
    assert no_image.status_code == 400 and no_image.json()["error"]["param"] == "image"


def test_failures_are_server_errors_in_openai_shape(pipeline):
    with TestClient(create_app(FailingPipeline(pipeline), ServeSettings())) as http:
        response = http.post(GENERATIONS, json={"prompt": "a cat"})
        missing = http.get("/v1/nothing")
    assert response.status_code == 500
    assert response.json()["error"] == {
        "message": "RuntimeError: out of memory",
        "type": "server_error",
        "param": None,
        "code": "generation_failed",
    }
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "invalid_request_error"


def test_fully_opaque_or_misshapen_edit_mask_is_a_400(pipeline, rgb_image):
    opaque = png_bytes(Image.new("RGBA", (32, 32), (0, 0, 0, 255)))  # nothing transparent: nothing to edit
    with TestClient(create_app(pipeline, ServeSettings())) as http:
        black = http.post(EDITS, data={"prompt": "make it blue"}, files=edit_parts(rgb_image, opaque))
        wide = http.post(
            EDITS, data={"prompt": "make it blue"}, files=edit_parts(rgb_image, rgba_mask(32, 16))
        )
        stats = http.get("/health").json()
    assert black.status_code == 400 and "all black" in black.json()["error"]["message"]
    assert wide.status_code == 400 and "aspect ratios differ" in wide.json()["error"]["message"]
    assert black.json()["error"]["param"] == "mask" and stats["jobs"]["accepted"] == 0
