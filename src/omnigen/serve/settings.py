"""The service's limits and knobs, validated once at construction."""

from __future__ import annotations

from dataclasses import dataclass


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
    timeout_s: float = 300.0  # from arrival to answer, queueing included
    api_key: str | None = None
    model_name: str = "omnigen"

    def __post_init__(self) -> None:
        for name in ("queue_size", "max_upload_bytes", "max_pixels", "max_input_pixels", "max_steps"):
            self._positive_int(name)
        for name in ("max_images", "max_outputs", "max_prompt_chars"):
            self._positive_int(name, allow_zero=name == "max_images")
        if not isinstance(self.timeout_s, (int, float)) or not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be a positive number, got {self.timeout_s!r}")
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key.strip()):
            raise ValueError("api_key must be a non-empty string or None")

    def _positive_int(self, name: str, allow_zero: bool = False) -> None:
        value = getattr(self, name)
        low = 0 if allow_zero else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")

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
            "timeout_s",
        )
        return {name: getattr(self, name) for name in names}
