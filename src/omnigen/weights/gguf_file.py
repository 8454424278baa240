"""GGUF files: the header read with the ``gguf`` package (optional: ``pip install 'omnigen-unified[gguf]'``),
tensors read by offset, and ``write`` (``omnigen export --dtype q8_0``).

What the community's diffusion GGUF files hold (city96's ComfyUI-GGUF convention): the tensors under the
original checkpoint's key names (optionally behind a ``model.diffusion_model.`` prefix, stripped here),
``general.architecture`` naming the model family (ours writes ``omnigen``), 1-D and small tensors in
F32, the rest in F16/BF16 or quantized (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, the K-quants), shapes in ggml's
order (reversed against torch's), and for a tensor reshaped to rows of 256 a
``comfy.gguf.orig_shape.<name>`` array with its real shape. Both of our key layouts are read: official
names (``llm.layers...``), or diffusers' (renamed through ``keymap`` by the loader).

The header is parsed once (``read_header``); each tensor is then read with a plain file read at its
offset, so no mapping of the whole file stays alive while the model loads.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from omnigen.weights import ggml

logger = logging.getLogger(__name__)

SUFFIX = ".gguf"
WEIGHTS = "model.gguf"  # the file name ``write`` is given by ``omnigen export``
ARCH = "omnigen"
PREFIX = "model.diffusion_model."
ORIG_SHAPE = "comfy.gguf.orig_shape."
WRITE_TYPES = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1")  # what the gguf package quantizes


@dataclass(frozen=True)
class GgufTensor:
    """Where a tensor lives in a GGUF file: its bytes, their GGML type, and its torch-order shape."""

    file: Path
    key: str
    shape: tuple[int, ...]
    stored_shape: tuple[int, ...]  # the file's own (differs when ``comfy.gguf.orig_shape`` reshaped it)
    qtype: str
    offset: int
    nbytes: int


def _gguf():
    try:
        import gguf
    except ImportError as err:
        raise ValueError(
            "reading or writing GGUF files needs the gguf package: pip install 'omnigen-unified[gguf]'"
        ) from err
    return gguf


def _string_field(reader, name: str) -> str | None:
    field = reader.get_field(name)
    return None if field is None else bytes(field.parts[field.data[-1]]).decode("utf-8")


def _orig_shape(reader, name: str) -> tuple[int, ...] | None:
    field = reader.get_field(ORIG_SHAPE + name)
    return None if field is None else tuple(int(field.parts[i][0]) for i in field.data)


def read_header(file: Path) -> dict[str, GgufTensor]:
    """Our key (prefix stripped) -> ``GgufTensor`` for every tensor of ``file``. ValueError, naming the
    tensor, for a GGML type omnigen cannot dequantize (before anything is loaded)."""
    gguf = _gguf()
    reader = gguf.GGUFReader(str(file))
    if reader.byte_order != "I":  # tensors are read by offset, as stored: the host's byte order only
        raise ValueError(
            f"{file} is a GGUF file of the other byte order ({reader.endianess.name}); not supported"
        )
    arch = _string_field(reader, "general.architecture")
    if arch not in (None, ARCH):
        logger.warning(
            "%s: general.architecture is %r, not %r; reading its tensors by name", file, arch, ARCH
        )
    prefixed = any(t.name.startswith(PREFIX) for t in reader.tensors)
    tensors: dict[str, GgufTensor] = {}
    for t in reader.tensors:
        if prefixed and not t.name.startswith(PREFIX):
            continue
        qtype = getattr(t.tensor_type, "name", str(t.tensor_type))
        ggml.check_type(qtype, f"{file}: tensor {t.name!r}")
        stored = tuple(int(d) for d in reversed(t.shape.tolist()))
        shape = _orig_shape(reader, t.name) or stored
        key = t.name.removeprefix(PREFIX) if prefixed else t.name
        tensors[key] = GgufTensor(file, t.name, shape, stored, qtype, int(t.data_offset), int(t.n_bytes))
    del reader  # its memory map of the file
    types: dict[str, int] = {}
    for t in tensors.values():
        types[t.qtype] = types.get(t.qtype, 0) + 1
    logger.info("%s: %d tensors (%s)", file, len(tensors), ", ".join(f"{k} {v}" for k, v in types.items()))
    return tensors


def _read_bytes(t: GgufTensor) -> torch.Tensor:
    with open(t.file, "rb") as handle:
        handle.seek(t.offset)
        data = bytearray(handle.read(t.nbytes))
    if len(data) != t.nbytes:
        raise ValueError(f"{t.file}: tensor {t.key!r} is cut short ({len(data)} of {t.nbytes} bytes)")
    return torch.frombuffer(data, dtype=torch.uint8)


def is_packable(parts: tuple) -> bool:
    """Whether these stored parts (one tensor, or to_q/to_k/to_v to fuse) can stay packed as one
    ``ggml.GgufLinear`` weight: all quantized alike, 2-D, rows as stored."""
    first = parts[0]
    return all(
        isinstance(p, GgufTensor)
        and p.qtype in ggml.BLOCKS
        and p.qtype == first.qtype
        and len(p.shape) == 2
        and p.shape == p.stored_shape
        and p.shape[1] == first.shape[1]
        for p in parts
    )


def read_packed(parts: tuple[GgufTensor, ...], device: torch.device | str) -> tuple[torch.Tensor, str]:
    """(uint8 blocks (rows, bytes per row), GGML type) of packable parts, concatenated along rows."""
    rows = [_read_bytes(p).reshape(ggml.packed_shape(p.shape, p.qtype)) for p in parts]
    packed = rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)
    return packed.to(device), parts[0].qtype


def read_dense(t: GgufTensor) -> torch.Tensor:
    """One tensor as a torch tensor: float types as stored, quantized ones dequantized to float32."""
    raw = _read_bytes(t)
    if t.qtype in ggml.FLOATS:
        return raw.view(ggml.FLOATS[t.qtype]).reshape(t.shape)
    return ggml.dequantize(raw, t.qtype, t.shape)


def pack(weight: torch.Tensor, qtype: str) -> torch.Tensor:
    """A 2-D float tensor quantized to ``qtype`` (one of ``WRITE_TYPES``) by the gguf package: uint8 blocks."""
    gguf = _gguf()
    kind = gguf.GGMLQuantizationType[qtype.upper()]
    return torch.from_numpy(gguf.quants.quantize(weight.detach().float().cpu().numpy(), kind))


def packed_linear(linear: nn.Linear, qtype: str) -> ggml.GgufLinear:
    """``linear`` with its weight quantized to ``qtype`` and kept packed (for measurements and tests)."""
    packed = pack(linear.weight, qtype).to(linear.weight.device)
    return ggml.GgufLinear(packed, qtype.upper(), linear.in_features, linear.bias)


def write(path: Path, state: dict[str, torch.Tensor], quantized: set[str], qtype: str) -> None:
    """A GGUF file of ``state``: the 2-D ``quantized`` keys whose rows hold whole blocks in ``qtype``
    (one of ``WRITE_TYPES``), every other tensor in its own float type (F32, F16 or BF16)."""
    if qtype not in WRITE_TYPES:
        raise ValueError(f"GGUF export types are {', '.join(WRITE_TYPES)}, got {qtype!r}")
    gguf = _gguf()
    name = qtype.upper()
    kind = gguf.GGMLQuantizationType[name]
    writer = gguf.GGUFWriter(path=None, arch=ARCH)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(getattr(gguf.LlamaFileType, f"MOSTLY_{name}"))
    block, _ = ggml.BLOCKS[name]
    for key, value in state.items():
        value = value.detach().cpu().contiguous()
        if key in quantized and value.dim() == 2 and value.shape[1] % block == 0:
            writer.add_tensor(key, pack(value, qtype).numpy(), raw_dtype=kind)
        elif value.dtype == torch.bfloat16:
            raw = value.view(torch.int16).numpy().view("uint8").reshape(*value.shape[:-1], -1)
            writer.add_tensor(key, raw, raw_dtype=gguf.GGMLQuantizationType.BF16)
        elif value.dtype in (torch.float32, torch.float16):
            writer.add_tensor(key, value.numpy())
        else:
            raise ValueError(
                f"{key} is {value.dtype}; a GGUF export holds float32, float16 or bfloat16 tensors"
            )
    writer.write_header_to_file(path=str(path))
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
