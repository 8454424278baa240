"""Uploaded images: base64 and header checks, and the bounded pool that decodes them off the event loop.

Decoding a large PNG (a 4096 x 4096 16-bit one takes a second) or preparing a mask must not block the
event loop that answers ``/health`` and every other client, nor may a burst of such requests hold
unbounded memory. So a request's images are first measured from their headers (PIL's lazy open reads
the size without decoding pixels), its cost (pixels and bytes) is admitted against the service's decode
budget (``ServeSettings.decode_pixels`` / ``decode_bytes``, waiting while others use it), and only then
decoded and prepared in ``DecodePool``'s threads (``ServeSettings.decode_workers``). Only PNG, JPEG and
WebP are ever decoded (``IMAGE_FORMATS``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from PIL import Image, UnidentifiedImageError

from omnigen.serve.errors import ApiError
from omnigen.serve.settings import ServeSettings
from omnigen.text.processor import IMAGE_FORMATS

T = TypeVar("T")
NOT_AN_IMAGE = "is not a readable image (PNG, JPEG or WebP only)"


def too_large(what: str, field: str | None = None) -> ApiError:
    return ApiError(
        413, "limit_exceeded", f"{what} (limit max_upload_bytes)", limit="max_upload_bytes", field=field
    )


def decode_base64(text: str, field: str, settings: ServeSettings) -> bytes:
    if text.startswith("data:"):
        header, _, text = text.partition(",")
        if not header.endswith(";base64"):
            raise ApiError(400, "invalid_base64", f"{field}: a data URL must be base64 encoded", field=field)
    text = "".join(text.split())
    if len(text) * 3 // 4 > settings.max_upload_bytes + 2:
        raise too_large(f"{field} decodes to more than {settings.max_upload_bytes} bytes", field)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ApiError(400, "invalid_base64", f"{field} is not valid base64: {err}", field=field) from err


def _pixels_error(field: str, settings: ServeSettings) -> ApiError:
    message = f"{field} has more than {settings.max_input_pixels} pixels (limit max_input_pixels)"
    return ApiError(400, "limit_exceeded", message, limit="max_input_pixels", field=field)


def open_header(data: bytes, field: str, settings: ServeSettings) -> Image.Image:
    """The lazily opened image (header read, no pixels decoded) after the byte and pixel limits."""
    if len(data) > settings.max_upload_bytes:
        raise too_large(f"{field} is {len(data)} bytes, more than {settings.max_upload_bytes}", field)
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as err:
        raise _pixels_error(field, settings) from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ApiError(400, "invalid_image", f"{field} {NOT_AN_IMAGE}", field=field) from err
    if image.width * image.height > settings.max_input_pixels:
        raise _pixels_error(field, settings)
    return image


def image_cost(blobs: list[tuple[str, bytes]], settings: ServeSettings) -> tuple[int, int]:
    """(pixels, bytes) that decoding ``blobs`` (name, data) takes, from their headers; checks each."""
    pixels = nbytes = 0
    for name, data in blobs:
        with open_header(data, name, settings) as image:
            count = image.width * image.height
            bands = len(image.getbands())
            depth = 2 if image.mode.startswith("I;16") else (4 if image.mode in ("I", "F") else 1)
        pixels += count
        nbytes += len(data) + count * max(3, bands * depth)  # the upload, its decoded pixels, its RGB copy
    return pixels, nbytes


def decode_image(data: bytes, field: str, settings: ServeSettings, mode: str | None = "RGB") -> Image.Image:
    """The image (converted to ``mode``; None: as stored) from uploaded bytes; size limits are checked
    before pixels are decoded. Blocking: call it in ``DecodePool.run``."""
    image = open_header(data, field, settings)
    try:
        image.load()
        return image if mode is None else image.convert(mode)
    except (OSError, SyntaxError, ValueError) as err:
        raise ApiError(
            400, "invalid_image", f"{field} is a truncated or corrupt image: {err}", field=field
        ) from err


class DecodePool:
    """Threads that decode and prepare requests' images, under a budget of pixels and bytes in flight.

    A request whose cost fits waits (up to its deadline, then 504) while others hold the budget; a single
    request larger than the budget runs alone. The event loop only awaits."""

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self._executor = ThreadPoolExecutor(settings.decode_workers, thread_name_prefix="omnigen-decode")
        self._pixels = self._bytes = 0
        self._changed: asyncio.Condition | None = None  # made on the event loop, at first use

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a pool thread (its exceptions, ApiError included, propagate)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def in_flight(self) -> dict[str, int]:
        return {"decode_pixels": self._pixels, "decode_bytes": self._bytes}

    @asynccontextmanager
    async def budget(self, pixels: int, nbytes: int, deadline: float):
        """Hold ``pixels`` and ``nbytes`` of the decode budget for the body of the ``async with``."""
        if self._changed is None:
            self._changed = asyncio.Condition()
        limits = self.settings
        async with self._changed:
            while self._pixels and (
                self._pixels + pixels > limits.decode_pixels or self._bytes + nbytes > limits.decode_bytes
            ):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    message = f"no decode capacity within timeout_s={limits.timeout_s:g} s"
                    raise ApiError(504, "timeout", message, limit="timeout_s")
                try:
                    await asyncio.wait_for(self._changed.wait(), remaining)
                except TimeoutError:
                    continue
            self._pixels += pixels
            self._bytes += nbytes
        try:
            yield
        finally:
            async with self._changed:
                self._pixels -= pixels
                self._bytes -= nbytes
                self._changed.notify_all()
