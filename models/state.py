"""Reading what the untrusted steps left behind, in the trusted scorer. Numpy only, no pickle.

The train step saves the model's state as safetensors: an 8-byte little-endian header length,
a JSON header naming each tensor's dtype, shape and byte range, then the raw bytes. Counting
its elements needs the header alone, checked against the file so that no tensor is hidden.
"""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path

import numpy as np

MAX_HEADER_BYTES = 16 * 2**20
# Tensor names can carry data past the count: they must look like state-dict keys, and the
# characters of a name beyond the first FREE_NAME_CHARS count, four to a parameter.
TENSOR_NAME = re.compile(r"^[A-Za-z0-9_.]{1,128}$")
FREE_NAME_CHARS = 32
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2,
                "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


class StateError(Exception):
    """An output of an untrusted step is missing or malformed; the message says how."""


def count_elements(path: Path) -> int:
    """How many numbers the saved state holds: every tensor, parameters and buffers alike."""
    try:
        with open(path, "rb") as handle:
            raw_length = handle.read(8)
            if len(raw_length) != 8:
                raise StateError(f"{path.name} is not a safetensors file (too short)")
            (length,) = struct.unpack("<Q", raw_length)
            if length > MAX_HEADER_BYTES:
                raise StateError(f"{path.name} has a {length}-byte header")
            header = json.loads(handle.read(length))
            data_bytes = path.stat().st_size - 8 - length
    except FileNotFoundError:
        raise StateError(f"the train step saved no model state ({path.name})") from None
    except (OSError, ValueError) as exc:
        raise StateError(f"{path.name} is unreadable: {exc}") from None
    if not isinstance(header, dict):
        raise StateError(f"{path.name} has no tensor table")
    total, covered = 0, 0
    for name, entry in header.items():
        if name == "__metadata__":  # free text: our train step never writes any
            raise StateError(f"{path.name} carries metadata")
        if not TENSOR_NAME.match(name):
            raise StateError(f"{path.name}: {name[:40]!r} is not a tensor name")
        try:
            shape, (begin, end) = entry["shape"], entry["data_offsets"]
            count = math.prod(int(size) for size in shape)
            width = _DTYPE_BYTES[entry["dtype"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise StateError(f"{path.name}: tensor {name!r} is malformed ({exc!r})") from None
        if end - begin != count * width or begin < 0 or end > data_bytes:
            raise StateError(f"{path.name}: tensor {name!r} does not match its bytes")
        if count == 0:
            raise StateError(f"{path.name}: tensor {name!r} is empty")
        total += count + max(0, math.ceil((len(name) - FREE_NAME_CHARS) / 4))
        covered += end - begin
    if covered != data_bytes:
        raise StateError(f"{path.name}: {data_bytes - covered} bytes belong to no tensor")
    return total


def load_predictions(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """The predict step's output: a float array of exactly `shape` (no pickle, no objects)."""
    try:
        prediction = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise StateError(f"the predict step wrote no predictions ({path.name})") from None
    except (OSError, ValueError) as exc:
        raise StateError(f"{path.name} is unreadable: {exc}") from None
    if not isinstance(prediction, np.ndarray) or prediction.dtype.kind != "f":
        raise StateError(f"{path.name} does not hold floating-point numbers")
    if prediction.shape != shape:
        raise StateError(f"{path.name} has shape {prediction.shape}, expected {shape}")
    return prediction
