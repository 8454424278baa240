"""Batch generation from a JSONL of requests (``omnigen batch``): resumable, sharded across ranks."""

from omnigen.batch.requests import PARAMETERS, BadLine, Request, RequestError, read_requests
from omnigen.batch.runner import BatchReport, default_layout, run_batch

__all__ = [
    "PARAMETERS",
    "BadLine",
    "BatchReport",
    "Request",
    "RequestError",
    "default_layout",
    "read_requests",
    "run_batch",
]
