"""The service's limits and knobs, validated once at construction."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omnigen.generation import MAX_CONDITION_TOKENS
from omnigen.util.checks import check_float, check_int


@dataclass(frozen=True)
class ServeSettings:
    """``queue_size``: jobs that may wait while one runs (more get 429). Limits are per request."""

    queue_size: int = 8
    max_upload_bytes: int = 8 * 1024 * 1024  # per input image, decoded
    max_pixels: int = 1024 * 1024  # output height * width
    max_input_pixels: int = 4096 * 4096  # per input image, before it is resized
    max_steps: int = 100
    max_images: int = 3  # input images
    max_outputs: int = 4  # num_images_per_prompt
    max_prompt_chars: int = 4000
    max_condition_tokens: int = MAX_CONDITION_TOKENS  # prompt text + every input image, after resizing
    timeout_s: float = 300.0  # from arrival to answer, queueing included
    # Decoding uploads (``decode``): threads, and the pixels and bytes that may be in flight at once.
    decode_workers: int = 2
    decode_pixels: int = 4 * 4096 * 4096
    decode_bytes: int = 1024 * 1024 * 1024
    # Slow or many clients: a request's headers and each chunk of its body must arrive within these
    # seconds; idle keep-alive connections close; more open connections than max_connections get 503.
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    keep_alive_s: float = 5.0
    max_connections: int = 64
    max_header_bytes: int = 64 * 1024
    shutdown_grace_s: float = 30.0  # on SIGTERM: how long the running job may take to finish
    docs: bool = False  # serve /docs and /redoc (their pages load scripts from a CDN); /openapi.json always
    api_key: str | None = None
    model_name: str = "omnigen"
    lora_dir: str | None = None  # the adapters a request may name (``adapters``); None: no per-request LoRA

    def __post_init__(self) -> None:
        positive = ("queue_size", "max_upload_bytes", "max_pixels", "max_input_pixels", "max_steps")
        counts = ("decode_workers", "decode_pixels", "decode_bytes", "max_connections", "max_header_bytes")
        for name in (*positive, "max_outputs", "max_prompt_chars", "max_condition_tokens", *counts):
            check_int(name, getattr(self, name), 1)
        check_int("max_images", self.max_images, 0)
        for name in ("timeout_s", "header_timeout_s", "body_timeout_s", "keep_alive_s"):
            check_float(name, getattr(self, name), 0, low_open=True)
        check_float("shutdown_grace_s", self.shutdown_grace_s, 0)
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key.strip()):
            raise ValueError("api_key must be a non-empty string or None")
        if self.lora_dir is not None and not Path(self.lora_dir).is_dir():
            raise ValueError(f"lora_dir {self.lora_dir!r} is not a folder")

    def limits(self) -> dict[str, int | float]:
        """The request limits as published by GET /v1/models."""
        names = (
            "max_upload_bytes",
            "max_pixels",
            "max_input_pixels",
            "max_steps",
            "max_images",
            "max_outputs",
            "max_prompt_chars",
            "max_condition_tokens",
            "timeout_s",
        )
        return {name: getattr(self, name) for name in names}
