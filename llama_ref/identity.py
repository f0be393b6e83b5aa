"""A model's content identity: a digest that changes when the model could answer differently, read without
its weights, so that an answer cache can be keyed by what the model is rather than what its file is called.

- A catalog name: the catalog's pinned sha256 (resolve_model checks the file against it).
- A GGUF file: its size and the sha256 of everything before the tensor data: the header, the metadata
  (architecture, tokenizer, chat template) and the tensor index (names, shapes, types, offsets).
- A folder (Hugging Face, Meta) or a file read with the files beside it (llama2.c's .bin and its
  tokenizer.bin): each file's name, size and the sha256 of its head: a safetensors file's JSON header; any
  other file whole, or past HEAD_BYTES its first and last HEAD_BYTES / 2 (a .pth is a zip archive: its
  pickled index comes first and its directory last).

No torch here: the explainer computes this on runs that never load the model.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import struct
from pathlib import Path

from llama_ref.catalog import CATALOG, DEFAULT_MODEL

HEAD_BYTES = 16 << 20
# GGUF value types (ggml's gguf.h): the fixed sizes of the scalars, then string and array
_GGUF_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def model_identity(spec: str | os.PathLike | None = None) -> str:
    """The identity of a catalog name (None: the default) or of the checkpoint at a path, as one string."""
    spec = DEFAULT_MODEL if spec is None else spec
    if isinstance(spec, str) and spec in CATALOG:
        return f"sha256:{CATALOG[spec].sha256}"
    path = Path(spec).expanduser().resolve()
    if path.is_file() and _is_gguf(path):
        files = [path]
    else:  # the checkpoint reads the files beside it, or is the folder
        folder = path if path.is_dir() else path.parent
        files = sorted(child for child in folder.iterdir() if child.is_file() and not child.name.startswith("."))
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.name}\0{file.stat().st_size}\0".encode())
        digest.update(_head_digest(file))
    return f"files:{digest.hexdigest()}"


def _is_gguf(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == b"GGUF"


def _head_digest(path: Path) -> bytes:
    size = path.stat().st_size
    with path.open("rb") as f:
        if size == 0:
            return hashlib.sha256().digest()
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            try:
                end = _gguf_index_end(data) if data[:4] == b"GGUF" else _safetensors_header_end(path, data)
            except (struct.error, ValueError, RecursionError):  # not what its name or magic says: hashed as bytes
                end = None
            if end is not None:
                return hashlib.sha256(data[:end]).digest()
            if size <= HEAD_BYTES:
                return hashlib.sha256(data).digest()
            half = HEAD_BYTES // 2
            return hashlib.sha256(data[:half] + data[size - half :]).digest()


def _safetensors_header_end(path: Path, data) -> int | None:
    if path.suffix != ".safetensors":
        return None
    end = 8 + struct.unpack_from("<Q", data, 0)[0]
    if end > len(data):
        raise ValueError("the header runs past the end of the file")
    return end


def _gguf_index_end(data) -> int:
    """Where a GGUF file's tensor index ends: past the magic, version, counts, metadata and tensor infos."""
    version, tensors, entries = struct.unpack_from("<IQQ", data, 4)
    if version < 2:
        raise ValueError(f"GGUF version {version} counts in 32 bits")
    position = 24
    for _ in range(entries):
        position = _skip_string(data, position)
        (value_type,) = struct.unpack_from("<I", data, position)
        position = _skip_value(data, position + 4, value_type)
    for _ in range(tensors):
        position = _skip_string(data, position)
        (dims,) = struct.unpack_from("<I", data, position)
        position += 4 + 8 * dims + 4 + 8  # the dimensions, the type, the data offset
    if position > len(data):
        raise ValueError("the tensor index runs past the end of the file")
    return position


def _skip_string(data, position: int) -> int:
    (length,) = struct.unpack_from("<Q", data, position)
    end = position + 8 + length
    if end > len(data):
        raise ValueError("a string runs past the end of the file")
    return end


def _skip_value(data, position: int, value_type: int) -> int:
    if value_type in _GGUF_SIZES:
        return position + _GGUF_SIZES[value_type]
    if value_type == _GGUF_STRING:
        return _skip_string(data, position)
    if value_type != _GGUF_ARRAY:
        raise ValueError(f"unknown GGUF value type {value_type}")
    element_type, count = struct.unpack_from("<IQ", data, position)
    position += 12
    if element_type in _GGUF_SIZES:
        position += count * _GGUF_SIZES[element_type]
        if position > len(data):
            raise ValueError("an array runs past the end of the file")
        return position
    for _ in range(count):  # strings or arrays, one by one; each at least 8 bytes, so the file bounds the loop
        position = _skip_value(data, position, element_type)
    return position
