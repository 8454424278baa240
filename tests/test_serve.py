"""The HTTP service: schema, generation, every bad input, auth, queueing, cancellation and a load test.

Single requests go through FastAPI's TestClient; everything concurrent runs against a real uvicorn
server on 127.0.0.1 (a free port) with bounded waits everywhere.
"""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import io
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)
pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from live import free_port, live_process, live_server  # noqa: E402
from omnigen.serve.app import create_app  # noqa: E402
from omnigen.serve.settings import ServeSettings  # noqa: E402
from omnigen.serve.worker import JobQueue, QueueFull, Worker, WorkerStopped  # noqa: E402

URL = "/v1/images/generations"
BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "load_serve.py"


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@contextmanager
def client_for(pipe, **settings):
    with TestClient(create_app(pipe, ServeSettings(**settings))) as client:
        yield client


class GatedPipeline:
    """The pipeline, but the first call waits until `gate` is set (bounded); counts calls."""

    def __init__(self, pipe) -> None:
        self._pipe, self.gate, self.started, self.calls = pipe, threading.Event(), threading.Event(), 0

    def __getattr__(self, name: str):
        return getattr(self._pipe, name)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        self.started.set()
        assert self.gate.wait(30), "gate never opened"
        return self._pipe(*args, **kwargs)


@contextmanager
def serving(app):
    """A plain uvicorn server for `app` (``live.live_server``): yields its base URL."""
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2)
    with live_server(lambda _port: uvicorn.Server(config)) as (base, _server, _thread):
        yield base


def wait_until(predicate, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


# ------------------------------------------------------------------------------------------ schema


def test_openapi_schema_documents_every_parameter(pipeline):
    from omnigen import generation

    with client_for(pipeline) as client:
        schema = client.get("/openapi.json").json()
        assert client.get("/docs").status_code == 404  # its page loads from a CDN: off unless asked for
    with client_for(pipeline, docs=True) as client:
        assert client.get("/docs").status_code == 200
    assert {"/health", "/v1/models", URL, "/v1/images/edits"} <= set(schema["paths"])
    post = schema["paths"][URL]["post"]
    content = post["requestBody"]["content"]
    assert set(content) == {"application/json", "multipart/form-data"}
    properties = set(content["application/json"]["schema"]["properties"])
    parameters = {"prompt", *generation.names("request")}
    assert parameters <= properties, parameters - properties
    assert not set(generation.names("operator")) & properties  # memory modes are serve flags
    assert {"images", "response_format"} <= properties
    assert content["multipart/form-data"]["schema"]["properties"]["images"]["items"]["format"] == "binary"
    assert "image/png" in post["responses"]["200"]["content"]
    assert {"400", "401", "404", "413", "429", "500", "504"} <= set(post["responses"])
    assert "ErrorResponse" in schema["components"]["schemas"]
    edit_form = schema["paths"]["/v1/images/edits"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert {"image", "mask", "prompt", "n", "size", *generation.names("request")} <= set(
        edit_form["schema"]["properties"]
    )


def test_health_and_models(pipeline):
    with client_for(pipeline, model_name="tiny", max_steps=7) as client:
        health = client.get("/health").json()
        models = client.get("/v1/models").json()
    assert health["status"] == "ok" and health["queue_size"] == 8 and health["jobs"]["accepted"] == 0
    (card,) = models["data"]
    assert models["object"] == "list" and card["object"] == "model" and isinstance(card["created"], int)
    assert card["id"] == "tiny" and card["defaults"]["height"] == pipeline.defaults.height
    assert card["limits"]["max_steps"] == 7 and card["image_multiple"] == 4


# ------------------------------------------------------------------------------------------ generation


def test_png_response_equals_the_pipeline(pipeline):
    with client_for(pipeline) as client:
        body = {"prompt": "a red circle", "seed": 5, "width": 24, "response_format": "png"}
        response = client.post(URL, json=body)
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert response.headers["x-seed"] == "5"
    image = Image.open(io.BytesIO(response.content))
    assert image.size == (24, 32)
    (expected,) = pipeline("a red circle", seed=5, width=24, progress=False)
    assert image.tobytes() == expected.tobytes()


def test_json_base64_and_multipart_uploads_agree(pipeline, rgb_image):
    source = png_bytes(rgb_image(20, 24, seed=3))
    fields = {
        "prompt": "make it blue <img><|image_1|></img>",
        "seed": 3,
        "num_images_per_prompt": 2,
        "response_format": "b64_json",
        "guidance_scale": 2.5,
        "use_input_image_size_as_output": True,
    }
    with client_for(pipeline) as client:
        as_json = client.post(URL, json={**fields, "images": ["data:image/png;base64," + b64(source)]})
        form = {key: str(value) for key, value in fields.items()}
        as_form = client.post(URL, data=form, files=[("images", ("in.png", source, "image/png"))])
    assert as_json.status_code == 200 and as_form.status_code == 200, (as_json.text, as_form.text)
    body = as_json.json()
    assert [item["seed"] for item in body["data"]] == [3, 4]
    assert body["data"] == as_form.json()["data"]
    images = [Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))) for item in body["data"]]
    expected = pipeline(
        fields["prompt"],
        input_images=[rgb_image(20, 24, seed=3)],
        seed=3,
        num_images_per_prompt=2,
        guidance_scale=2.5,
        use_input_image_size_as_output=True,
        progress=False,
    )
    assert [i.size for i in images] == [(20, 24)] * 2
    assert [i.tobytes() for i in images] == [e.tobytes() for e in expected]


def test_unset_seed_is_random_and_reported(pipeline):
    with client_for(pipeline) as client:
        unset = [client.post(URL, json={"prompt": "a cat", "response_format": "png"}) for _ in range(3)]
        seeds = [int(response.headers["x-seed"]) for response in unset]
        again = client.post(URL, json={"prompt": "a cat", "seed": seeds[0], "response_format": "png"})
    assert all(response.status_code == 200 for response in unset)
    assert len(set(seeds)) == 3  # drawn per request (from 2**31 seeds: a repeat is a one-in-10**8 event)
    assert len({response.content for response in unset}) == 3  # other noise, other pictures
    assert again.content == unset[0].content  # the reported seed is the one that was used


# ------------------------------------------------------------------------------------------ bad inputs

NOISE = Image.frombytes("RGB", (64, 64), __import__("random").Random(0).randbytes(64 * 64 * 3))  # ~12 kB PNG


@pytest.mark.parametrize(
    ("request_kwargs", "settings", "status", "code", "limit", "message"),
    [
        ({"json": {"prompt": "<img><|image_1|></img>", "images": ["%%%not base64"]}}, {}, 400, "invalid_base64", None, "images[0] is not valid base64"),
        ({"json": {"prompt": "<img><|image_1|></img>", "images": [b64(b"hello, not an image")]}}, {}, 400, "invalid_image", None, "images[0] is not a readable image"),
        ({"data": {"prompt": "<img><|image_1|></img>"}, "files": [("images", ("notes.txt", b"plain text", "text/plain"))]}, {}, 400, "invalid_image", None, "(notes.txt) is not a readable image"),
        ({"data": {"prompt": "<img><|image_1|></img>"}, "files": [("images", ("big.png", png_bytes(NOISE), "image/png"))]}, {"max_upload_bytes": 2000}, 413, "limit_exceeded", "max_upload_bytes", "more than 2000"),
        ({"json": {"prompt": "<img><|image_1|></img>", "images": [b64(png_bytes(NOISE))]}}, {"max_upload_bytes": 2000}, 413, "limit_exceeded", "max_upload_bytes", "images[0] decodes to more than 2000"),
        ({"content": b"{" + b" " * 300_000 + b"}", "headers": {"content-type": "application/json"}}, {"max_upload_bytes": 1000, "max_images": 1}, 413, "limit_exceeded", "max_upload_bytes", "request body"),
        ({"json": {"prompt": "x", "images": [b64(png_bytes(NOISE))] * 4}}, {}, 400, "limit_exceeded", "max_images", "4 input images given; at most 3"),
        ({"data": {"prompt": "x"}, "files": [("images", ("a.png", png_bytes(NOISE), "image/png"))] * 4}, {}, 400, "limit_exceeded", "max_images", "at most 3"),
        ({"json": {"prompt": "<img><|image_1|></img>", "images": [b64(png_bytes(NOISE))]}}, {"max_input_pixels": 1000}, 400, "limit_exceeded", "max_input_pixels", "more than 1000 pixels"),
        ({"json": {"prompt": "a cat", "colour": "red"}}, {}, 400, "unknown_parameter", None, "unknown field 'colour'"),
        ({"data": {"prompt": "a cat", "colour": "red"}}, {}, 400, "unknown_parameter", None, "unknown field 'colour'"),
        ({"json": {"height": 32}}, {}, 400, "invalid_value", None, "prompt: Field required"),
        ({"json": {"prompt": "a cat", "height": "tall"}}, {}, 400, "invalid_value", None, "height:"),
        ({"json": {"prompt": "a cat", "height": 30}}, {}, 400, "invalid_value", None, "must be a positive multiple of 4"),
        ({"json": {"prompt": "a cat", "num_inference_steps": 8}}, {"max_steps": 7}, 400, "limit_exceeded", "max_steps", "max_steps=7"),
        ({"json": {"prompt": "a cat", "height": 64, "width": 64}}, {"max_pixels": 32 * 32}, 400, "limit_exceeded", "max_pixels", "max_pixels=1024"),
        ({"json": {"prompt": "a cat", "num_images_per_prompt": 5, "response_format": "b64_json"}}, {}, 400, "limit_exceeded", "max_outputs", "max_outputs=4"),
        ({"json": {"prompt": "a cat", "num_images_per_prompt": 2, "response_format": "png"}}, {}, 400, "invalid_value", None, "use 'b64_json'"),
        ({"json": {"prompt": "make <img><|image_1|></img> blue"}}, {}, 400, "invalid_value", None, "image tags do not match 0 input image(s)"),
        ({"json": {"prompt": "a" * 50}}, {"max_prompt_chars": 10}, 400, "limit_exceeded", "max_prompt_chars", "max_prompt_chars is 10"),
        ({"json": {"prompt": "a cat", "model": "other"}}, {}, 404, "model_not_found", None, "'other' is not served"),
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, {}, 400, "invalid_json", None, "not valid JSON"),
        ({"content": b"prompt=a cat", "headers": {"content-type": "text/plain"}}, {}, 415, "unsupported_media_type", None, "multipart/form-data"),
    ],
)  # fmt: skip
def test_bad_inputs_are_rejected_with_a_named_error(
    pipeline, request_kwargs, settings, status, code, limit, message
):
    with client_for(pipeline, **settings) as client:
        response = client.post(URL, **request_kwargs)
        stats = client.get("/health").json()
    assert response.status_code == status, response.text[:300]
    error = response.json()["error"]
    assert {"message", "type", "param", "code"} <= set(error)  # OpenAI's error shape
    assert error["type"] == "invalid_request_error" and error["code"] == code and error.get("limit") == limit
    assert message in error["message"]
    assert stats["jobs"]["accepted"] == 0  # rejected before taking a queue slot


@pytest.mark.parametrize("prompt", ["", "   "])
def test_empty_prompt_is_refused_as_everywhere(pipeline, prompt):
    """The rule of omnigen.plan (Python, CLI and batch refuse it too): a 400 naming the prompt."""
    with client_for(pipeline) as client:
        response = client.post(URL, json={"prompt": prompt})
        form = client.post(URL, data={"prompt": prompt})
        image = [("image", ("in.png", png_bytes(NOISE), "image/png"))]
        edit = client.post("/v1/images/edits", data={"prompt": prompt}, files=image)  # not tagged into one
        stats = client.get("/health").json()
    assert stats["jobs"]["accepted"] == 0
    for answer in (response, form, edit):
        assert answer.status_code == 400, answer.text[:300]
        error = answer.json()["error"]
        assert error["param"] == "prompt" and "prompt is empty" in error["message"]


def test_max_pixels_counts_the_exact_output_of_an_input_sized_request(pipeline, rgb_image):
    """A 40x37 input at max_input_image_size 32 comes out 32x28 = 896 pixels (resized and cropped as the
    pipeline prepares it): allowed at max_pixels=896, refused at 895 with the exact count."""
    body = {
        "prompt": "make it blue <img><|image_1|></img>",
        "images": [b64(png_bytes(rgb_image(40, 37)))],
        "use_input_image_size_as_output": True,
        "num_inference_steps": 1,
        "response_format": "png",
    }
    with client_for(pipeline, max_pixels=896) as client:
        ok = client.post(URL, json=body)
    with client_for(pipeline, max_pixels=895) as client:
        refused = client.post(URL, json=body)
    assert ok.status_code == 200, ok.text[:300]
    assert Image.open(io.BytesIO(ok.content)).size == (32, 28)
    assert refused.status_code == 400 and "output of 896 pixels" in refused.json()["error"]["message"]


# ------------------------------------------------------------------------------------------ masks

MASK_PROMPT = "make it blue <img><|image_1|></img>"


def box_mask_png(size=(32, 32), box=(4, 4, 20, 24), mode="L") -> bytes:
    mask = Image.new(mode, size, 0)
    mask.paste(255 if mode == "L" else (255, 255, 255, 255), box)
    return png_bytes(mask)


@pytest.mark.parametrize("transport", ["json", "data_url", "multipart"])
def test_mask_keeps_every_pixel_outside_it(pipeline, rgb_image, transport):
    import numpy as np

    source, mask = rgb_image(32, 32, seed=6), box_mask_png()
    fields = {"prompt": MASK_PROMPT, "seed": 2, "mask_blur": 0, "response_format": "png"}
    with client_for(pipeline) as client:
        if transport == "multipart":
            files = [
                ("images", ("in.png", png_bytes(source), "image/png")),
                ("mask", ("m.png", mask, "image/png")),
            ]
            response = client.post(URL, data={k: str(v) for k, v in fields.items()}, files=files)
        else:
            prefix = "data:image/png;base64," if transport == "data_url" else ""
            body = {**fields, "images": [b64(png_bytes(source))], "mask": prefix + b64(mask)}
            response = client.post(URL, json=body)
    assert response.status_code == 200, response.text
    out = np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"))
    keep = np.asarray(Image.open(io.BytesIO(mask))) == 0
    assert out.shape == (32, 32, 3)
    assert np.array_equal(out[keep], np.asarray(source)[keep])
    assert (out[~keep] != np.asarray(source)[~keep]).any()
    expected = pipeline(MASK_PROMPT, [source], mask=Image.open(io.BytesIO(mask)), seed=2, progress=False)[0]
    assert out.tobytes() == expected.tobytes()


@pytest.mark.parametrize(
    ("body", "status", "code", "message"),
    [
        ({"prompt": "make it blue", "images": [], "mask": b64(box_mask_png())}, 400, "invalid_value", "a mask needs an input image"),
        ({"mask": "%%% not base64"}, 400, "invalid_base64", "mask is not valid base64"),
        ({"mask": b64(b"not an image")}, 400, "invalid_image", "mask is not a readable image"),
        ({"mask": b64(box_mask_png(box=(0, 0, 0, 0)))}, 400, "invalid_value", "all black"),
        ({"mask": b64(box_mask_png(size=(32, 16)))}, 400, "invalid_value", "aspect ratios differ"),
        ({"mask": b64(box_mask_png()), "height": 16, "width": 16}, 400, "invalid_value", "the canvas's size 32x32"),
        ({"mask": b64(box_mask_png()), "mask_blur": -1}, 400, "invalid_value", "mask_blur"),
    ],
)  # fmt: skip
def test_bad_masks_are_rejected_before_queueing(pipeline, rgb_image, body, status, code, message):
    full = {"prompt": MASK_PROMPT, "images": [b64(png_bytes(rgb_image(32, 32)))], **body}
    with client_for(pipeline) as client:
        response = client.post(URL, json=full)
        stats = client.get("/health").json()
    assert response.status_code == status, response.text[:300]
    error = response.json()["error"]
    assert error["code"] == code and message in error["message"], error
    assert stats["jobs"]["accepted"] == 0


def test_api_key_is_required_everywhere_but_health(pipeline):
    with client_for(pipeline, api_key="s3cret") as client:
        assert client.get("/health").status_code == 200
        for method, path in (("get", "/v1/models"), ("get", "/openapi.json"), ("post", URL)):
            missing = getattr(client, method)(path)
            error = missing.json()["error"]
            assert missing.status_code == 401 and error["code"] == "invalid_api_key"
            assert error["type"] == "authentication_error"
            assert missing.headers["www-authenticate"] == "Bearer"
        assert client.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert client.get("/v1/models", headers={"X-API-Key": "s3cret"}).status_code == 200
        body = {"prompt": "a cat", "seed": 1, "response_format": "png"}
        ok = client.post(URL, json=body, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and ok.headers["content-type"] == "image/png"


def test_settings_and_queue_units():
    with pytest.raises(ValueError, match="queue_size must be an int >= 1"):
        ServeSettings(queue_size=0)
    with pytest.raises(ValueError, match="timeout_s"):
        ServeSettings(timeout_s=0)
    worker = Worker(lambda **kwargs: [], 2)
    jobs = [worker.submit({"k": k}) for k in range(2)]
    with pytest.raises(QueueFull):
        worker.submit({"k": 2})
    jobs[0].cancel()
    assert len(worker.queue) == 1 and jobs[0].future.cancelled() and worker.counts["cancelled"] == 1
    worker.stop()
    assert isinstance(jobs[1].future.exception(timeout=1), WorkerStopped)
    assert len(worker.queue) == 0 and worker.counts["rejected"] == 1
    queue = JobQueue(1)
    assert queue.get(timeout=0.01) is None and not queue.remove(jobs[1])


# ------------------------------------------------------------------------------------------ concurrency


def test_queue_full_gets_429_with_retry_after(pipeline):
    gated = GatedPipeline(pipeline)
    app = create_app(gated, ServeSettings(queue_size=1))
    with serving(app) as base, httpx.Client(base_url=base, timeout=30) as client:
        results: list = []

        def send(seed: int) -> None:
            results.append(client.post(URL, json={"prompt": "a cat", "seed": seed}))

        pool = [threading.Thread(target=send, args=(seed,)) for seed in (1, 2)]
        pool[0].start()
        assert gated.started.wait(10)
        pool[1].start()
        wait_until(lambda: client.get("/health").json()["waiting"] == 1, what="a waiting job")
        full = client.post(URL, json={"prompt": "a cat"})
        gated.gate.set()
        for thread in pool:
            thread.join(30)
    assert full.status_code == 429 and int(full.headers["retry-after"]) >= 1
    error = full.json()["error"]
    assert error == {**error, "type": "rate_limit_error", "code": "queue_full", "limit": "queue_size"}
    assert sorted(r.status_code for r in results) == [200, 200]


def test_client_disconnect_cancels_queued_work(pipeline):
    gated = GatedPipeline(pipeline)
    app = create_app(gated, ServeSettings(queue_size=2))
    with serving(app) as base, httpx.Client(base_url=base, timeout=30) as client:
        results: list = []
        first = threading.Thread(
            target=lambda: results.append(client.post(URL, json={"prompt": "a cat", "seed": 1}))
        )
        first.start()
        assert gated.started.wait(10)
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection
            httpx.post(base + URL, json={"prompt": "a dog", "seed": 2}, timeout=httpx.Timeout(30, read=0.5))
        wait_until(lambda: client.get("/health").json()["jobs"]["cancelled"] == 1, what="the cancellation")
        assert client.get("/health").json()["waiting"] == 0
        gated.gate.set()
        first.join(30)
        stats = client.get("/health").json()["jobs"]
    assert [r.status_code for r in results] == [200]
    assert gated.calls == 1  # the abandoned job never ran
    assert stats == {**stats, "accepted": 2, "completed": 1, "cancelled": 1, "failed": 0}


def test_timeout_answers_504_and_stops_the_job(pipeline):
    gated = GatedPipeline(pipeline)
    with client_for(gated, timeout_s=0.5) as client:
        response = client.post(URL, json={"prompt": "a cat"})
        gated.gate.set()
        wait_until(lambda: client.get("/health").json()["jobs"]["cancelled"] == 1, what="the cancellation")
        stats = client.get("/health").json()
    assert response.status_code == 504
    assert response.json()["error"]["limit"] == "timeout_s"
    assert stats["jobs"]["completed"] == 0 and not stats["running"]


def test_load_50_clients_against_a_queue_of_8(pipeline):
    """Every request is answered (200 or 429), none hangs or is lost, every image is correct."""
    prompts = ["a red circle", "a blue square"]
    expected = {
        (p, s): png_bytes(pipeline(p, seed=s, num_inference_steps=2, progress=False)[0])
        for p in prompts
        for s in range(3)
    }
    gated = GatedPipeline(pipeline)  # holds the first job until all 50 requests are in
    app = create_app(gated, ServeSettings(queue_size=8, timeout_s=60))

    async def run(base: str) -> list:
        limits = httpx.Limits(max_connections=60)
        async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as client:

            async def one(i: int):
                body = {
                    "prompt": prompts[i % 2],
                    "seed": i % 3,
                    "num_inference_steps": 2,
                    "response_format": "png",
                }
                return i, await client.post(URL, json=body)

            async def release_when_all_arrived() -> None:
                while True:
                    jobs = (await client.get("/health")).json()["jobs"]
                    if jobs["accepted"] + jobs["rejected"] == 50:
                        gated.gate.set()
                        return
                    await asyncio.sleep(0.02)

            tasks = [one(i) for i in range(50)]
            *answers, _ = await asyncio.wait_for(asyncio.gather(*tasks, release_when_all_arrived()), 90)
            return answers, (await client.get("/health")).json()

    with serving(app) as base:
        answers, stats = asyncio.run(run(base))
    assert sorted(i for i, _ in answers) == list(range(50))
    codes = [r.status_code for _, r in answers]
    assert set(codes) <= {200, 429}, codes
    assert codes.count(200) == 9 and codes.count(429) == 41  # 1 running + 8 waiting
    for i, response in answers:
        if response.status_code == 200:
            assert response.content == expected[(prompts[i % 2], i % 3)], f"request {i}: wrong image"
        else:
            assert (
                int(response.headers["retry-after"]) >= 1 and response.json()["error"]["code"] == "queue_full"
            )
    assert stats["jobs"] == {"accepted": 9, "rejected": 41, "completed": 9, "failed": 0, "cancelled": 0}
    assert stats["waiting"] == 0 and not stats["running"]


def test_benchmark_script_reports_percentiles(pipeline, capsys):
    spec = importlib.util.spec_from_file_location("load_serve", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    app = create_app(pipeline, ServeSettings(queue_size=2))
    with serving(app) as base:
        assert (
            module.main(["--url", base, "--clients", "4", "--requests", "8", "--steps", "1", "--retry"]) == 0
        )
    out = capsys.readouterr().out
    assert "requests 8" in out and "p50" in out and "p99" in out and "throughput" in out
    assert "status 200: 8" in out


def test_serve_subcommand_wiring(model_folder, monkeypatch):
    """`omnigen serve` loads the model, builds the settings (API key from the env) and runs uvicorn with
    the connection limits and the draining shutdown."""
    import argparse

    from omnigen.serve import cli
    from omnigen.serve.server import DrainingServer

    seen = {}

    def run(server):
        config = server.config
        seen.update(app=config.app, host=config.host, port=config.port, config=config, server=server)

    monkeypatch.setattr(DrainingServer, "run", run)
    monkeypatch.setenv("OMNIGEN_API_KEY", "from-env")
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    argv = ["serve", "--model", str(model_folder), "--port", "8123", "--queue-size", "2"]
    argv += ["--shutdown-grace", "7", "--keep-alive", "3", "--max-connections", "9", "--header-timeout", "4"]
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    assert (seen["host"], seen["port"]) == ("127.0.0.1", 8123)
    config = seen["config"]
    assert (config.timeout_keep_alive, config.limit_concurrency, config.timeout_graceful_shutdown) == (
        3,
        9,
        10,
    )
    assert config.http.header_timeout_s == 4 and seen["server"].grace_s == 7
    settings = seen["app"].state.settings
    assert (settings.queue_size, settings.api_key) == (2, "from-env")
    with TestClient(seen["app"]) as client:
        key = {"Authorization": "Bearer from-env"}
        assert client.get("/v1/models").status_code == 401
        assert client.get("/v1/models", headers=key).json()["data"][0]["defaults"]["num_inference_steps"] == 2


@pytest.mark.slow
def test_omnigen_serve_command(model_folder, tmp_path):
    """The console script end to end: model folder, port, queue size and the API key from the env."""
    import os

    port = free_port()
    env = {**os.environ, "OMNIGEN_API_KEY": "from-env"}
    command = ["omnigen", "serve", "--model", str(model_folder), "--port", str(port), "--queue-size", "2"]
    base = f"http://127.0.0.1:{port}"

    def ready():
        return httpx.get(base + "/health", timeout=1).json()["queue_size"] == 2

    with live_process(command, tmp_path / "serve.log", ready, (httpx.HTTPError,), env):
        assert httpx.get(base + "/v1/models", timeout=5).status_code == 401
        key = {"Authorization": "Bearer from-env"}
        body = {"prompt": "a cat", "seed": 0, "response_format": "png"}
        response = httpx.post(base + URL, json=body, headers=key, timeout=30)
        assert response.status_code == 200 and Image.open(io.BytesIO(response.content)).size == (32, 32)


# ------------------------------------------------------------------------------------------ per-request LoRA


@pytest.fixture(scope="module")
def lora_service(model, tokenizer, tmp_path_factory):
    """A --lora-dir with adapters "style" and "ink" (and a folder that is not an adapter)."""
    pytest.importorskip("peft")
    import copy

    from conftest import save_random_adapters

    folder = tmp_path_factory.mktemp("loras")
    save_random_adapters(lambda: copy.deepcopy(model), folder, ("style", "ink"))
    (folder / "not-an-adapter").mkdir()
    return folder


def lora_pipeline(model, tokenizer):
    """Its own pipeline (a copy of the model), so the shared one never gets adapters."""
    import copy

    from conftest import tiny_pipeline

    return tiny_pipeline(copy.deepcopy(model), tokenizer, num_inference_steps=3)


def test_lora_requests_interleaved_equal_sequential_runs(model, tokenizer, lora_service):
    from omnigen.weights import lora

    pipe = lora_pipeline(model, tokenizer)
    order = [
        ("style", 1.0),
        ("style", 0.5),
        ("ink", 0.5),
        (None, None),
        ("style", 0.5),
        ("ink", 0.5),
        ("style", 1.0),
    ]
    expected = {}
    for name, scale in set(order):  # each adapter alone, straight through the pipeline
        lora.apply_loras(pipe.model, [] if name is None else [(lora_service / name, scale)])
        (image,) = pipe("a red circle", seed=3, progress=False)
        expected[name, scale] = png_bytes(image)
    lora.apply_loras(pipe.model, [])
    assert len(set(expected.values())) == len(expected)  # every adapter and scale matters
    with client_for(pipe, lora_dir=str(lora_service)) as client:
        got = []
        for name, scale in order:
            body = {"prompt": "a red circle", "seed": 3, "response_format": "png"}
            body |= {} if name is None else {"lora": name, "lora_scale": scale}
            response = client.post(URL, json=body)
            assert response.status_code == 200, response.text[:300]
            got.append(Image.open(io.BytesIO(response.content)))
        health = client.get("/health").json()
        form = client.post(
            URL,
            data={
                "prompt": "a red circle",
                "seed": "3",
                "lora": "ink",
                "lora_scale": "0.5",
                "response_format": "png",
            },
        )
    for (name, scale), image in zip(order, got):
        assert png_bytes(image) == expected[name, scale], (name, scale)
    assert png_bytes(Image.open(io.BytesIO(form.content))) == expected["ink", 0.5]  # a form field too
    # each adapter is loaded once; every request changed the active adapters or their scale
    assert health["loras"] == ["ink", "style"] and health["lora_loads"] == 2
    assert health["lora_switches"] == 7 and health["lora_switch_mean_s"] > 0


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"lora": "../style"}, "name of one of the service's adapters"),
        ({"lora": "sub/style"}, "name of one of the service's adapters"),
        ({"lora": ".."}, "name of one of the service's adapters"),
        ({"lora": "nope"}, "no LoRA adapter named 'nope'; available: ['ink', 'style']"),
        ({"lora": "not-an-adapter"}, "no LoRA adapter named 'not-an-adapter'"),
        ({"lora_scale": 0.5}, "lora_scale given without lora"),
        ({"lora": "style", "lora_scale": 50}, "less than or equal to 10"),
    ],
)
def test_bad_lora_requests_are_refused(pipeline, lora_service, body, message):
    with client_for(pipeline, lora_dir=str(lora_service)) as client:
        response = client.post(URL, json={"prompt": "a red circle", **body})
        stats = client.get("/health").json()
    assert response.status_code == 400 and message in response.json()["error"]["message"]
    assert stats["jobs"]["accepted"] == 0


def test_img2img_strength_without_an_image_is_refused_before_queueing(pipeline):
    with client_for(pipeline) as client:
        response = client.post(URL, json={"prompt": "a red circle", "strength": 0.5})
        stats = client.get("/health").json()
    assert response.status_code == 400 and response.json()["error"]["param"] == "strength"
    assert "starts from the first input image" in response.json()["error"]["message"]
    assert stats["jobs"]["accepted"] == 0


def test_lora_needs_a_lora_dir(pipeline, lora_service, tmp_path):
    with client_for(pipeline) as client:
        response = client.post(URL, json={"prompt": "a red circle", "lora": "style"})
    assert response.status_code == 400 and "--lora-dir" in response.json()["error"]["message"]
    with pytest.raises(ValueError, match="is not a folder"):
        ServeSettings(lora_dir=str(tmp_path / "missing"))


def test_lora_on_the_openai_edit_route(model, tokenizer, lora_service, rgb_image):
    pipe = lora_pipeline(model, tokenizer)
    with client_for(pipe, lora_dir=str(lora_service)) as client:
        answers = [
            client.post(
                "/v1/images/edits",
                data={"prompt": "make it blue", "seed": "2", **extra},
                files={"image": ("a.png", png_bytes(rgb_image()), "image/png")},
            )
            for extra in ({}, {"lora": "style"}, {})
        ]
    assert all(a.status_code == 200 for a in answers), answers[0].text[:300]
    plain, styled, again = (a.json()["data"][0]["b64_json"] for a in answers)
    assert plain == again and styled != plain


def test_adapter_switch_evicts_and_stays_exact(model, tokenizer, lora_service):
    from omnigen.serve.adapters import AdapterSwitch
    from omnigen.weights import lora

    reference, pipe = lora_pipeline(model, tokenizer), lora_pipeline(model, tokenizer)
    expected = {}
    for name in ("style", "ink"):
        lora.apply_loras(reference.model, [(lora_service / name, 0.7)])
        expected[name] = reference("a red circle", seed=1, progress=False, output_type="latent")
    switch = AdapterSwitch(pipe.model, max_resident=1)
    for name in ("style", "ink", "style"):
        switch.apply(((str(lora_service / name), 0.7),))
        got = pipe("a red circle", seed=1, progress=False, output_type="latent")
        torch.testing.assert_close(got, expected[name], atol=0, rtol=0)
    assert switch.stats()["lora_loads"] == 3 and len(lora.adapter_names(pipe.model)) == 1  # evicted
    switch.apply(())  # no adapter: the plain model's output
    plain = lora_pipeline(model, tokenizer)("a red circle", seed=1, progress=False, output_type="latent")
    torch.testing.assert_close(
        pipe("a red circle", seed=1, progress=False, output_type="latent"), plain, atol=0, rtol=0
    )


def test_adapter_switch_keeps_the_startup_adapters(model, tokenizer, lora_service):
    """``--lora`` adapters given at start stay under every request's own."""
    from omnigen.serve.adapters import AdapterSwitch
    from omnigen.weights import lora

    style, ink = str(lora_service / "style"), str(lora_service / "ink")
    reference, pipe = lora_pipeline(model, tokenizer), lora_pipeline(model, tokenizer)
    lora.apply_loras(reference.model, [(style, 0.5), (ink, 0.7)])
    both = reference("a red circle", seed=1, progress=False, output_type="latent")
    lora.apply_loras(reference.model, [(style, 0.5)])
    base_only = reference("a red circle", seed=1, progress=False, output_type="latent")
    lora.apply_loras(pipe.model, [(style, 0.5)])  # what --lora does at start
    switch = AdapterSwitch(pipe.model)
    switch.apply(((ink, 0.7),))
    got = pipe("a red circle", seed=1, progress=False, output_type="latent")
    torch.testing.assert_close(got, both, atol=1e-6, rtol=0)
    switch.apply(())
    torch.testing.assert_close(
        pipe("a red circle", seed=1, progress=False, output_type="latent"), base_only, atol=0, rtol=0
    )
