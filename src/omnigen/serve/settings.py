"""The service's limits and knobs, validated once at construction."""

from __future__ import annotations

from dataclasses import dataclass

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
    api_key: str | None = None
    model_name: str = "omnigen"

    def __post_init__(self) -> None:
        positive = ("queue_size", "max_upload_bytes", "max_pixels", "max_input_pixels", "max_steps")
        for name in (*positive, "max_outputs", "max_prompt_chars", "max_condition_tokens"):
            check_int(name, getattr(self, name), 1)
        check_int("max_images", self.max_images, 0)
        check_float("timeout_s", self.timeout_s, 0, low_open=True)
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key.strip()):
            raise ValueError("api_key must be a non-empty string or None")

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
