"""Streaming offload: decoder weights and condition keys/values kept on the host and brought to the
compute device one layer at a time, the copy of layer i+1 overlapping the compute of layer i.

This module owns every host<->device move of the decoder's weights (``offload_model``) and of an
offloaded ``ConditionCache`` (``offload_kv_cache``); the layer loop of ``omnigen.model.runner.Runner``
(which holds the ``OffloadedWeights``) asks ``stream_layers`` for each layer in turn. It does not decide where anything else lives (``omnigen.model.placement``).

- Weights: ``OffloadedWeights`` keeps one host master copy of each parameter and buffer of the decoder
  layers, pinned when CUDA is available (so the copies can run asynchronously). At rest the layers'
  tensors *are* the masters. For its turn a layer's tensors point to device copies; afterwards they
  point back to the masters and the device copies are dropped, never copied back (inference does not
  change weights).
- Keys/values: at the prefill, ``Streamer.to_host`` writes each layer's keys/values to the host on the
  side stream while the next layer computes; at each step they stream back with the weights.
- On CUDA, copies to the device run on a side stream: layer i+1's are issued before layer i's compute,
  the compute stream waits for them on an event, and ``record_stream`` keeps the allocator from reusing
  their memory early. The host waits for layer i-1 to finish before issuing layer i+1's copies, so at
  most three layers are on the device (one computing, one ready, one arriving). Elsewhere (CPU, MPS) there are no streams and no pinning:
  copies are plain ``.to`` calls (none at all on the CPU).

Legend: K kv heads, Lc condition length, E head dim.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

KV = tuple[torch.Tensor, torch.Tensor]
MAX_RESIDENT_LAYERS = 3  # streamed layers on a CUDA device at once: one computing, one ready, one arriving
Slot = tuple[nn.Module, str, bool]  # (module, attribute name, is a parameter)


def pin(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in pinned host memory when CUDA is available; otherwise (or if it cannot be pinned,
    e.g. a tensor subclass) as it is."""
    if not torch.cuda.is_available() or tensor.device.type != "cpu" or tensor.is_pinned():
        return tensor
    try:
        return tensor.pin_memory()
    except (RuntimeError, NotImplementedError):
        return tensor


def copy_to(tensor: torch.Tensor, device: torch.device, non_blocking: bool) -> torch.Tensor:
    """The one host->device copy of this module (a no-op when ``tensor`` is already on ``device``)."""
    return tensor.to(device, non_blocking=non_blocking)


def _slots(layer: nn.Module) -> list[Slot]:
    params = [(m, name, True) for m in layer.modules() for name, p in m._parameters.items() if p is not None]
    buffers = [(m, name, False) for m in layer.modules() for name, b in m._buffers.items() if b is not None]
    return params + buffers


def _get(slot: Slot) -> torch.Tensor:
    module, name, is_param = slot
    return module._parameters[name].data if is_param else module._buffers[name]


def _set(slot: Slot, tensor: torch.Tensor) -> None:
    module, name, is_param = slot
    if is_param:
        module._parameters[name].data = tensor
    else:
        module._buffers[name] = tensor


class OffloadedWeights:
    """Host master copies of every layer's parameters and buffers; the layers point to them at rest."""

    def __init__(self, layers: Sequence[nn.Module]) -> None:
        self.slots = [_slots(layer) for layer in layers]
        self.masters = [[pin(_get(slot).detach().to("cpu")) for slot in slots] for slots in self.slots]
        for index in range(len(self.slots)):
            self.release(index)

    def is_current(self, layers: Sequence[nn.Module]) -> bool:
        """Whether ``layers`` still have exactly these tensors at rest (no ``.to``, LoRA or quantization
        since)."""
        if len(layers) != len(self.slots):
            return False
        for layer, slots, masters in zip(layers, self.slots, self.masters):
            current = _slots(layer)
            if len(current) != len(slots) or any(
                a[0] is not b[0] or a[1] != b[1] for a, b in zip(current, slots)
            ):
                return False
            if any(_get(slot).data_ptr() != master.data_ptr() for slot, master in zip(slots, masters)):
                return False
        return True

    def install(self, index: int, tensors: Sequence[torch.Tensor]) -> None:
        for slot, tensor in zip(self.slots[index], tensors, strict=True):
            _set(slot, tensor)

    def release(self, index: int) -> None:
        """Point layer ``index`` back to its masters; its device copies are dropped, not copied back."""
        self.install(index, self.masters[index])


def offload_layers(layers: Sequence[nn.Module], current: OffloadedWeights | None = None) -> OffloadedWeights:
    """Keep ``layers``' weights on the host: ``current`` while the layers still point to its masters (they
    are made once and reused), else new masters."""
    if current is not None and current.is_current(layers):
        return current
    return OffloadedWeights(layers)


@dataclass
class _Transfer:
    tensors: list[torch.Tensor]
    ready: torch.cuda.Event | None  # recorded on the side stream after the copies (CUDA only)


class Streamer:
    """The side streams of one forward pass, one per CUDA device (none elsewhere)."""

    def __init__(self) -> None:
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def _side(self, device: torch.device) -> torch.cuda.Stream | None:
        if device.type != "cuda":
            return None
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def to_device(self, tensors: list[torch.Tensor], device: torch.device) -> _Transfer:
        """Start copying ``tensors`` to ``device`` (on the side stream on CUDA)."""
        side = self._side(device)
        if side is None:
            return _Transfer([copy_to(t, device, non_blocking=False) for t in tensors], None)
        with torch.cuda.stream(side):
            copies = [copy_to(t, device, non_blocking=True) for t in tensors]
            ready = torch.cuda.Event()
            ready.record(side)
        return _Transfer(copies, ready)

    def wait(self, transfer: _Transfer, device: torch.device) -> list[torch.Tensor]:
        """The transferred tensors, usable on the compute stream."""
        if transfer.ready is not None:
            compute = torch.cuda.current_stream(device)
            compute.wait_event(transfer.ready)
            for tensor in transfer.tensors:
                tensor.record_stream(compute)
        return transfer.tensors

    def done(self, device: torch.device) -> torch.cuda.Event | None:
        """An event marking the end of the work queued so far on ``device``'s compute stream (CUDA)."""
        if device.type != "cuda":
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))
        return event

    def to_host(self, kv: KV) -> KV:
        """One layer's keys/values on the host; on CUDA copied on the side stream after the compute that
        made them (the destination is pinned by torch). Call ``finish`` before reading them on the host."""
        device = kv[0].device
        side = self._side(device)
        if side is None:
            return kv[0].to("cpu"), kv[1].to("cpu")
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            host = kv[0].to("cpu", non_blocking=True), kv[1].to("cpu", non_blocking=True)
        for tensor in kv:
            tensor.record_stream(side)
        return host

    def finish(self) -> None:
        """Wait for every copy issued on the side streams."""
        for stream in self._streams.values():
            stream.synchronize()


def stream_layers(
    indices: Sequence[int],
    devices: Sequence[torch.device],
    streamer: Streamer,
    weights: OffloadedWeights | None = None,
    past: list[KV] | None = None,
    stream: bool = True,
) -> Iterator[tuple[int, KV | None]]:
    """Yield (index, that layer's past keys/values on ``devices[index]``) for each layer index in order, with the
    layer's weights installed from ``weights`` (when offloaded) for the duration of its turn. The next
    layer's tensors are on their way while the caller runs the current one. With nothing on the host
    (no ``weights``, ``past`` on its devices: ``stream=False``) it only hands out the layers' keys/values."""
    if not stream:
        for index in indices:
            yield index, None if past is None else past[index]
        return

    def start(index: int) -> _Transfer:
        host = [] if weights is None else list(weights.masters[index])
        return streamer.to_device(host + ([] if past is None else list(past[index])), devices[index])

    pending = start(indices[0]) if indices else None
    finished: list[torch.cuda.Event | None] = []
    for position, index in enumerate(indices):
        device = devices[index]
        tensors = streamer.wait(pending, device)
        if len(finished) >= 2 and finished[-2] is not None:
            finished[-2].synchronize()  # the layer before last is done: its memory can take the next one
        pending = start(indices[position + 1]) if position + 1 < len(indices) else None
        split = 0 if weights is None else len(weights.masters[index])
        if weights is not None:
            weights.install(index, tensors[:split])
        try:
            yield index, (None if past is None else (tensors[split], tensors[split + 1]))
        finally:
            if weights is not None:
                weights.release(index)
            finished.append(streamer.done(device))
