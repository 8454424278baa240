"""Issue 23's fault campaign, one class of fault per section: every hostile input is refused with a 400 in the
error shape (and the server still answers /health), every numeric generation parameter has a finite range
enforced by the pipeline, the CLI, batch line parsing and the service, decoding runs off the event loop
under a budget, slow clients time out, SIGTERM drains the service, and batch outputs are verified.

Live servers run on 127.0.0.1 with bounded waits: a uvicorn thread for the connection tests, an
``omnigen serve`` subprocess (the shipped model) for the signals.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import pytest
import torch

torch.set_num_threads(1)
pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from live import live_server  # noqa: E402
from omnigen import GenerationConfig, generation  # noqa: E402
from omnigen.serve.app import create_app  # noqa: E402
from omnigen.serve.settings import ServeSettings  # noqa: E402

URL = "/v1/images/generations"
HUGE_BLUR = 2147483584  # segfaulted Pillow's GaussianBlur (exit 139)


def png_bytes(image: Image.Image, format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def assert_error(response, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert {"message", "type", "param", "code"} <= set(error), error
    assert code is None or error["code"] == code, error
    assert param is None or error["param"] == param, error
    return error


@contextmanager
def client_for(pipe, **settings):
    with TestClient(create_app(pipe, ServeSettings(**settings)), raise_server_exceptions=False) as client:
        yield client


# ------------------------------------------------------------------------------------------ 1: ranges

OUT_OF_RANGE = [
    ("mask_blur", HUGE_BLUR),
    ("guidance_scale", 1e308),
    ("img_guidance_scale", 101.0),
    ("time_shift", 5e-324),
    ("time_shift", 1e4),
    ("seed", 2**63),
    ("num_inference_steps", 10**6),
    ("height", 10**6),
    ("max_input_image_size", 10**7),
    ("num_images_per_prompt", 10**6),
    ("step_cache_threshold", 1e300),
]


def test_every_numeric_parameter_has_a_finite_range():
    for name in generation.names():
        param = generation.param(name)
        if param.kind in ("int", "float"):
            assert param.low is not None and param.high is not None, name
            assert math.isfinite(param.low) and math.isfinite(param.high), name


@pytest.mark.parametrize(("name", "value"), OUT_OF_RANGE)
def test_config_refuses_out_of_range_values(name, value):
    with pytest.raises(ValueError, match=name) as info:
        GenerationConfig().replace(**{name: value})
    assert str(value) in str(info.value) or repr(value) in str(info.value)


def test_pipeline_refuses_a_huge_mask_blur_before_blurring(pipeline, rgb_image):
    from omnigen.sampling.inpaint import check_blur

    mask = Image.new("L", (32, 32), 255)
    with pytest.raises(ValueError, match=f"mask_blur .*got {HUGE_BLUR}"):
        pipeline("edit <img><|image_1|></img>", [rgb_image()], mask=mask, mask_blur=HUGE_BLUR, progress=False)
    with pytest.raises(ValueError, match="mask_blur"):
        check_blur(float(HUGE_BLUR))  # the mask helpers' own check has the same range


@pytest.mark.parametrize(
    ("flag", "value", "name"),
    [("--mask-blur", HUGE_BLUR, "mask_blur"), ("--guidance", "1e308", "guidance_scale"), ("--seed", 2**63, "seed")],
)  # fmt: skip
def test_cli_refuses_out_of_range_values_in_one_line(flag, value, name, monkeypatch, tmp_path, caplog):
    import omnigen.cli.args
    from omnigen.cli.main import build_parser, main

    build_parser()  # imports every subcommand's module before the patch (some bind load_pipeline)
    monkeypatch.setattr(omnigen.cli.args, "load_pipeline", lambda *a, **k: pytest.fail("model loaded"))
    argv = ["generate", "a red circle", flag, str(value), "-o", str(tmp_path / "out.png")]
    assert main(argv) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "\n" not in errors[0], errors
    assert name in errors[0] and str(float(value) if name == "guidance_scale" else value) in errors[0]


@pytest.mark.parametrize(
    ("row", "words"),
    [
        ({"seed": 2**63}, ["'seed'", str(2**63)]),
        ({"seed": 2**63 - 1, "n": 2}, ["'seed'", "needs seeds up to"]),
        ({"n": 10**9}, ["'n'", str(10**9)]),
        ({"mask_blur": HUGE_BLUR}, ["'mask_blur'", str(HUGE_BLUR)]),
        ({"guidance_scale": 1e308}, ["'guidance_scale'", "1e+308"]),
        ({"time_shift": 5e-324}, ["'time_shift'", "5e-324"]),
    ],
)
def test_batch_line_parsing_refuses_out_of_range_values(tmp_path, row, words):
    from omnigen.batch import read_requests

    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"prompt": "a cat", **row}) + "\n")
    requests, bad = read_requests(path)
    assert requests == [] and len(bad) == 1
    for word in words:
        assert word in bad[0].reason, bad[0].reason


@pytest.mark.parametrize(("name", "value"), [("mask_blur", HUGE_BLUR), ("guidance_scale", 1e308), ("time_shift", 5e-324)])  # fmt: skip
def test_service_refuses_out_of_range_values(pipeline, rgb_image, name, value):
    mask = png_bytes(Image.new("L", (32, 32), 255))
    body = {
        "prompt": "edit <img><|image_1|></img>",
        "images": [b64(png_bytes(rgb_image()))],
        "mask": b64(mask),
    }
    with client_for(pipeline) as client:
        assert_error(client.post(URL, json={**body, name: value}), 400, param=name)
        assert client.get("/health").status_code == 200


# ------------------------------------------------------------------------------------------ 2: negative prompt


def test_negative_prompt_counts_in_the_prompt_limits(pipeline):
    with client_for(pipeline, max_prompt_chars=100) as client:
        error = assert_error(
            client.post(URL, json={"prompt": "a cat", "negative_prompt": "blurry " * 8572}),
            400,
            "limit_exceeded",
        )
        assert error["limit"] == "max_prompt_chars" and error["param"] == "negative_prompt"
    budget = pipeline.condition_tokens("a red circle", [])
    with client_for(pipeline, max_condition_tokens=budget + 3) as client:
        body = {"prompt": "a red circle", "response_format": "png", "seed": 0}
        assert client.post(URL, json=body).status_code == 200
        error = assert_error(client.post(URL, json={**body, "negative_prompt": "blurry " * 20}), 400)
        assert error["limit"] == "max_condition_tokens" and "negative prompt" in error["message"]


def test_batch_counts_the_negative_prompt_in_the_token_budget(pipeline, tmp_path):
    from omnigen.batch import read_requests, run_batch

    path = tmp_path / "r.jsonl"
    rows = [
        {"id": "a", "prompt": "a red circle"},
        {"id": "b", "prompt": "a red circle", "negative_prompt": "blurry " * 20},
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    requests, _ = read_requests(path)
    budget = pipeline.condition_tokens("a red circle", []) + 3
    report = run_batch(pipeline, requests, tmp_path / "out", max_condition_tokens=budget, progress=False)
    assert report.generated == 1 and [b.line for b in report.bad_lines] == [2]
    assert "negative prompt" in report.bad_lines[0].reason


# ------------------------------------------------------------------------------------------ 4: malformed input

HOSTILE_BODIES = [
    ('{"prompt": ' + "[" * 100000 + "]" * 100000 + "}", "invalid_json"),  # RecursionError in json.loads
    ('{"prompt": "a", "meta": ' + "[" * 40 + "]" * 40 + "}", "invalid_json"),  # deeper than MAX_DEPTH
    ('{"prompt": "a cat", "seed": ' + "7" * 4400 + "}", "invalid_json"),  # more digits than int() takes
    ('{"prompt": "a \\ud800 cat"}', "invalid_json"),  # a lone surrogate
    ('{"prompt": "a cat", "negative_prompt": "\\udfff"}', "invalid_json"),
]


@pytest.mark.parametrize(("body", "code"), HOSTILE_BODIES)
def test_hostile_json_is_a_400_and_the_server_lives(pipeline, body, code):
    with client_for(pipeline) as client:
        response = client.post(URL, content=body, headers={"content-type": "application/json"})
        assert_error(response, 400, code)
        assert client.get("/health").status_code == 200


@pytest.mark.parametrize(("body", "code"), HOSTILE_BODIES)
def test_hostile_batch_lines_are_bad_lines(tmp_path, body, code):
    from omnigen.batch import read_requests

    path = tmp_path / "r.jsonl"
    path.write_text(body + "\n" + json.dumps({"prompt": "a cat"}) + "\n")
    requests, bad = read_requests(path)
    assert len(requests) == 1 and [b.line for b in bad] == [1] and "JSON" in bad[0].reason


# ------------------------------------------------------------------------------------------ 7: formats, schema


@pytest.mark.parametrize("format", ["BMP", "GIF", "TIFF"])
def test_only_png_jpeg_and_webp_are_decoded(pipeline, rgb_image, tmp_path, format):
    from omnigen.text.processor import load_image

    data = png_bytes(rgb_image(), format)
    assert Image.open(io.BytesIO(data)).format == format  # Pillow itself reads it
    body = {"prompt": "edit <img><|image_1|></img>", "images": [b64(data)]}
    with client_for(pipeline) as client:
        assert (
            "PNG, JPEG or WebP" in assert_error(client.post(URL, json=body), 400, "invalid_image")["message"]
        )
    with pytest.raises(ValueError, match="cannot read input image"):
        load_image(data)  # CLI inputs, batch lines, the pipeline's paths and bytes
    for good in ("PNG", "JPEG", "WEBP"):
        assert load_image(png_bytes(rgb_image(), good)).size == (32, 32)


def test_eps_never_reaches_ghostscript(pipeline, monkeypatch):
    from PIL import EpsImagePlugin

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: pytest.fail("Ghostscript ran"))
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nnewpath 0 0 moveto 8 8 lineto stroke\n%%EOF\n"
    body = {"prompt": "edit <img><|image_1|></img>", "images": [b64(eps)]}
    with client_for(pipeline) as client:
        assert_error(client.post(URL, json=body), 400, "invalid_image")


def test_openapi_declares_bearer_and_its_errors_and_docs_are_offline(pipeline):
    with client_for(pipeline, api_key="k") as client:
        schema = client.get("/openapi.json", headers={"Authorization": "Bearer k"}).json()
        assert client.get("/docs").status_code in (401, 404) and client.get("/redoc").status_code in (
            401,
            404,
        )
    assert schema["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": schema["components"]["securitySchemes"]["bearer"]["description"],
    }
    generate = schema["paths"][URL]["post"]
    assert generate["security"] == [{"bearer": []}] and {"401", "404", "429", "503"} <= set(
        generate["responses"]
    )
    model = schema["paths"]["/v1/models/{model_id}"]["get"]
    assert {"401", "404"} <= set(model["responses"]) and "security" not in schema["paths"]["/health"]["get"]


def test_nullable_form_fields_accept_null(pipeline, rgb_image):
    form = {"prompt": "a red circle", "seed": "null", "time_shift": "", "response_format": "png"}
    upload = [("images", ("in.png", png_bytes(rgb_image()), "image/png"))]
    with client_for(pipeline) as client:
        assert client.post(URL, data=form).status_code == 200  # url-encoded
        tagged = {**form, "prompt": "edit <img><|image_1|></img>", "mask_blur": "null"}
        response = client.post(URL, data=tagged, files=upload)  # multipart
        assert response.status_code == 200, response.text
        assert_error(client.post(URL, data={**form, "seed": "x"}), 400, param="seed")


# ------------------------------------------------------------------------------------------ live servers


def serving(app, settings: ServeSettings):
    """``make_server``'s server for ``app`` (``live.live_server``): yields (base URL, server, thread)."""
    from omnigen.serve.server import make_server

    return live_server(lambda port: make_server(app, settings, "127.0.0.1", port, log_level="warning"))


def in_thread(fn, *args, **kwargs) -> dict:
    """Run ``fn`` in a daemon thread; the returned dict gets "result" or "error" and "thread"."""
    out: dict = {}

    def run():
        try:
            out["result"] = fn(*args, **kwargs)
        except Exception as err:  # reported to the test
            out["error"] = err

    out["thread"] = threading.Thread(target=run, daemon=True)
    out["thread"].start()
    return out


def read_response(sock: socket.socket) -> bytes:
    """One HTTP response (headers and its Content-Length of body) from a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {data!r}"
        body += chunk
    return head + b"\r\n\r\n" + body


class SlowDecode:
    """``openai.decode_image`` made to take ``delay`` seconds; counts decodes running at once."""

    def __init__(self, original, delay: float) -> None:
        self.original, self.delay, self.lock = original, delay, threading.Lock()
        self.running = self.most = 0

    def __call__(self, *args, **kwargs):
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            time.sleep(self.delay)
            return self.original(*args, **kwargs)
        finally:
            with self.lock:
                self.running -= 1


# ------------------------------------------------------------------------------------------ 3: decoding


@pytest.mark.parametrize(("decode_pixels", "at_once"), [(1500, 1), (10**6, 2)])
def test_decoding_leaves_the_event_loop_free_within_its_budget(
    pipeline, rgb_image, monkeypatch, decode_pixels, at_once
):
    from omnigen.serve import openai

    slow = SlowDecode(openai.decode_image, 1.5)
    monkeypatch.setattr(openai, "decode_image", slow)
    settings = ServeSettings(decode_pixels=decode_pixels, decode_workers=2)
    body = {"prompt": "edit <img><|image_1|></img>", "images": [b64(png_bytes(rgb_image()))], "seed": 0}
    with serving(create_app(pipeline, settings), settings) as (base, _server, _thread):
        posts = [in_thread(httpx.post, base + URL, json=body, timeout=60) for _ in range(2)]
        deadline = time.monotonic() + 10
        while slow.running == 0:
            assert time.monotonic() < deadline, "no decode started"
            time.sleep(0.01)
        start = time.monotonic()
        assert httpx.get(base + "/health", timeout=5).status_code == 200
        assert time.monotonic() - start < 0.75  # a decode in progress does not hold the event loop
        for post in posts:
            post["thread"].join(60)
            assert post["result"].status_code == 200, post
    assert slow.most == at_once  # two 1024-pixel images: one at a time within a 1500-pixel budget


def test_image_cost_is_read_from_the_header(tmp_path):
    from omnigen.serve.decode import image_cost

    big = Image.new("I;16", (2048, 1024))
    data = png_bytes(big)
    start = time.monotonic()
    pixels, nbytes = image_cost([("images[0]", data)], ServeSettings())
    assert (pixels, time.monotonic() - start < 0.5) == (2048 * 1024, True)
    assert nbytes >= 2048 * 1024 * 3
    with pytest.raises(Exception, match="more than 1000 pixels") as info:
        image_cost([("images[0]", data)], ServeSettings(max_input_pixels=1000))
    assert info.value.status == 400


# ------------------------------------------------------------------------------------------ 6: slow clients


def test_slow_headers_and_bodies_time_out(pipeline):
    settings = ServeSettings(header_timeout_s=1.0, body_timeout_s=1.0)
    with serving(create_app(pipeline, settings), settings) as (base, _server, _thread):
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as slowloris:
            start = time.monotonic()
            closed = False
            for byte in b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 40:
                try:
                    slowloris.sendall(bytes([byte]))
                except OSError:
                    closed = True
                    break
                time.sleep(0.1)  # a byte every 0.1 s: uvicorn's keep-alive timer alone never fires
            if not closed:
                slowloris.settimeout(5)
                closed = slowloris.recv(1024) == b""
            assert closed and time.monotonic() - start < 6, "a slow header held the connection"
        with socket.create_connection(("127.0.0.1", port), timeout=10) as stalled:
            head = f"POST {URL} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
            stalled.sendall(head.encode() + b'{"prompt": ')
            stalled.settimeout(10)
            answer = read_response(stalled)
        status, _, rest = answer.partition(b"\r\n")
        assert b" 408 " in status and b'"code":"timeout"' in rest and b"body_timeout_s" in rest, answer
        assert httpx.get(base + "/health", timeout=5).status_code == 200


# ------------------------------------------------------------------------------------------ 5: shutdown


class GatedPipeline:
    """The pipeline, but each call waits until ``gate`` is set (bounded)."""

    def __init__(self, pipe) -> None:
        self._pipe, self.gate, self.started = pipe, threading.Event(), threading.Event()

    def __getattr__(self, name: str):
        return getattr(self._pipe, name)

    def __call__(self, *args, **kwargs):
        self.started.set()
        assert self.gate.wait(30), "gate never opened"
        return self._pipe(*args, **kwargs)


def test_exit_signal_lets_the_running_job_finish_and_answers_the_waiting_503(pipeline):
    gated = GatedPipeline(pipeline)
    settings = ServeSettings(shutdown_grace_s=30)
    body = {"prompt": "a red circle", "seed": 0, "response_format": "png"}
    with serving(create_app(gated, settings), settings) as (base, server, thread):
        running = in_thread(httpx.post, base + URL, json=body, timeout=60)
        assert gated.started.wait(20)
        waiting = in_thread(httpx.post, base + URL, json=body, timeout=60)
        deadline = time.monotonic() + 10
        while httpx.get(base + "/health", timeout=5).json()["waiting"] != 1:
            assert time.monotonic() < deadline, "the second job never queued"
            time.sleep(0.02)
        server.handle_exit(signal.SIGTERM, None)  # what uvicorn's handler calls on SIGTERM
        waiting["thread"].join(10)
        assert_error(waiting["result"], 503, "shutting_down")
        assert running["thread"].is_alive()  # within the grace: still running
        gated.gate.set()
        running["thread"].join(30)
        assert (
            running["result"].status_code == 200 and running["result"].headers["content-type"] == "image/png"
        )
        thread.join(15)
        assert not thread.is_alive(), "the server did not exit after its last job"


def start_serve(tmp_path, *flags: str) -> tuple[subprocess.Popen, str, object]:
    """``python -m omnigen serve`` (the shipped model) on a free port: (process, base URL, log file)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "omnigen", "serve", "--port", str(port), "--max-steps", "1000", *flags]
    log = (tmp_path / f"serve-{port}.log").open("w")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        assert process.poll() is None, (tmp_path / f"serve-{port}.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "omnigen serve did not come up"
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return process, base, log
        except httpx.HTTPError:
            time.sleep(0.2)


def long_job_running(base: str) -> tuple[dict, dict]:
    """A job of 1000 steps (tens of seconds) running and a second one waiting: their posts."""
    body = {"prompt": "a red circle", "num_inference_steps": 1000, "response_format": "png"}
    running = in_thread(httpx.post, base + URL, json=body, timeout=120)
    deadline = time.monotonic() + 30
    while not httpx.get(base + "/health", timeout=5).json()["running"]:
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(0.05)
    waiting = in_thread(httpx.post, base + URL, json=body, timeout=120)
    while httpx.get(base + "/health", timeout=5).json()["waiting"] != 1:
        assert time.monotonic() < deadline, "the second job never queued"
        time.sleep(0.05)
    return running, waiting


@pytest.mark.parametrize("second_signal", [False, True])
def test_sigterm_drains_within_the_grace_and_exits(tmp_path, second_signal):
    """grace 2 s, one signal: the waiting job 503 at once, the running one 503 at the grace's end; grace 60 s,
    two signals: the second ends the grace. Either way every client is answered and the process exits 0."""
    grace = 60 if second_signal else 2
    process, base, log = start_serve(tmp_path, "--shutdown-grace", str(grace), "--queue-size", "2")
    try:
        running, waiting = long_job_running(base)
        start = time.monotonic()
        process.send_signal(signal.SIGTERM)
        waiting["thread"].join(10)
        assert_error(waiting["result"], 503, "shutting_down")
        assert time.monotonic() - start < 5 and running["thread"].is_alive()
        with pytest.raises(httpx.HTTPError):
            httpx.post(base + URL, json={"prompt": "a cat"}, timeout=5)  # the listener is closed
        if second_signal:
            time.sleep(1.0)
            assert running["thread"].is_alive()  # the grace holds
            process.send_signal(signal.SIGTERM)
        running["thread"].join(30)
        assert "shut down" in assert_error(running["result"], 503, "shutting_down")["message"]
        assert time.monotonic() - start < (10 if second_signal else grace + 10)
        assert process.wait(20) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        log.close()


# ------------------------------------------------------------------------------------------ 10: batch outputs


def test_batch_redoes_outputs_that_do_not_decode_at_their_size(pipeline, tmp_path):
    from omnigen.batch import read_requests, run_batch

    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps({"id": name, "prompt": "a red circle"}) + "\n" for name in "abc"))
    requests, _ = read_requests(path)
    out = tmp_path / "out"
    assert run_batch(pipeline, requests, out, progress=False).generated == 3
    whole = (out / "a" / "0.png").read_bytes()
    (out / "a" / "0.png").write_bytes(whole[: len(whole) // 2])  # truncated, its record intact
    Image.new("RGB", (8, 8)).save(out / "b" / "0.png")  # readable, at the wrong size
    report = run_batch(pipeline, requests, out, progress=False)
    assert (report.already_done, report.generated) == (1, 2)
    assert (out / "a" / "0.png").read_bytes() == whole
    with Image.open(out / "b" / "0.png") as image:
        assert image.size == (32, 32)


def test_batch_cli_with_bad_lines_exits_non_zero_with_the_count(model_folder, tmp_path, caplog):
    from omnigen.cli.main import main

    path = tmp_path / "r.jsonl"
    path.write_text(
        json.dumps({"id": "a", "prompt": "a cat"})
        + "\n{oops\n"
        + json.dumps({"seed": -1, "prompt": "x"})
        + "\n"
    )
    argv = ["batch", str(path), "--out", str(tmp_path / "o"), "--model", str(model_folder), "--no-progress"]
    assert main(argv) == 1
    assert "2 bad line(s) skipped" in caplog.text and (tmp_path / "o" / "a" / "0.png").is_file()


def test_connections_and_header_size_are_capped(pipeline):
    settings = ServeSettings(max_connections=2, max_header_bytes=4096)
    with serving(create_app(pipeline, settings), settings) as (base, _server, _thread):
        port = int(base.rsplit(":", 1)[1])
        huge = f"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: {'a' * 8192}".encode()  # headers still coming
        with socket.create_connection(("127.0.0.1", port), timeout=10) as big:
            big.sendall(huge)
            assert big.recv(1024).split(b"\r\n")[0].split(b" ")[1] in (b"400", b"431")
        idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
        try:
            time.sleep(0.3)
            assert httpx.get(base + "/health", timeout=5).status_code == 503  # uvicorn's limit_concurrency
        finally:
            for sock in idle:
                sock.close()
        deadline = time.monotonic() + 10
        while httpx.get(base + "/health", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, (
                "the service did not recover after the idle connections closed"
            )
            time.sleep(0.1)
