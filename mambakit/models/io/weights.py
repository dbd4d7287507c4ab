"""Reading the weights of a checkpoint folder: model.safetensors, sharded safetensors, pytorch_model.bin or sharded
.bin, as a whole or (safetensors) only their headers.

A safetensors header gives every tensor's shape and dtype without reading the data, so a config can be checked
against the file before anything is allocated (`WeightFiles.headers`). A .bin file has no such header: it is read
whole (its size is the file's, never the config's), with ``torch.load(weights_only=True)``: never arbitrary pickle.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, TypeVar, Union

import safetensors.torch
import torch
from safetensors import safe_open

from mambakit.errors import CheckpointError, name_list
from mambakit.models.io.folder import read_json
from mambakit.models.io.names import BIN_INDEX_NAME, BIN_NAME, SAFETENSORS_INDEX_NAME, SAFETENSORS_NAME

V = TypeVar("V")

# safetensors dtype names -> torch dtypes (names torch lacks are left out: such a tensor reads as dtype None)
_SAFETENSORS_DTYPES = {name: getattr(torch, attr) for name, attr in (
    ("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"), ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"), ("C64", "complex64"), ("I64", "int64"), ("I32", "int32"), ("I16", "int16"),
    ("I8", "int8"), ("U8", "uint8"), ("BOOL", "bool")) if hasattr(torch, attr)}


@dataclass(frozen=True)
class TensorInfo:
    """Shape and dtype of a stored tensor (dtype None: a dtype torch does not know)."""

    shape: tuple[int, ...]
    dtype: Optional[torch.dtype]

    @classmethod
    def of(cls, t: torch.Tensor) -> "TensorInfo":
        return cls(tuple(t.shape), t.dtype)


def _cannot_read(path: Path, exc: Exception, how: str = "") -> CheckpointError:
    return CheckpointError(f"cannot read {path.name} in {str(path.parent)!r}{how}: {exc}")


def _safetensors_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises SafetensorError, OSError, ...
        raise _cannot_read(path, exc) from exc


def _safetensors_headers(path: Path) -> dict[str, TensorInfo]:
    try:
        with safe_open(str(path), framework="pt") as f:
            infos = {}
            for key in f.keys():
                part = f.get_slice(key)
                infos[key] = TensorInfo(tuple(part.get_shape()), _SAFETENSORS_DTYPES.get(part.get_dtype()))
            return infos
    except Exception as exc:  # SafetensorError for a damaged header, OSError, ...
        raise _cannot_read(path, exc) from exc


def _bin_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors of many types, including refused (non-tensor) objects
        raise _cannot_read(path, exc, " as a tensor state dict (read with weights_only=True, never arbitrary "
                                      "pickle)") from exc
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict) and len(obj) <= 4:
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise CheckpointError(f"{str(path)!r} does not hold a flat state dict (name -> tensor)")
    return dict(obj)


def _inside(directory: Path, name: str) -> bool:
    """Whether the shard file `name` of an index lies in `directory` (a relative path without '..', no link out)."""
    if not name or os.path.isabs(name) or Path(name).drive or ".." in Path(name).parts or "\\" in name:
        return False
    try:
        return (directory / name).resolve().is_relative_to(directory.resolve())
    except (OSError, RuntimeError):  # a link loop
        return False


def _sharded(directory: Path, index_name: str, read: Callable[[Path], dict[str, V]]) -> dict[str, V]:
    """read(shard) of every shard an index names, merged; CheckpointError naming every inconsistency."""
    index_path = directory / index_name
    weight_map = read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{str(index_path)!r} has no 'weight_map'")
    files = sorted(set(weight_map.values()), key=str)
    outside = [f for f in files if isinstance(f, str) and not _inside(directory, f)]
    if outside:
        raise CheckpointError(f"{str(index_path)!r} names shard files outside the checkpoint folder (absolute, "
                              f"'..' or a link leaving it): {outside}; shards must lie in the folder itself")
    missing_files = [f for f in files if not isinstance(f, str) or not (directory / f).is_file()]
    if missing_files:
        raise CheckpointError(f"{str(index_path)!r} names shard files that are not in the folder: {missing_files}")
    merged: dict[str, V] = {}
    problems = []
    for f in files:
        part = read(directory / f)
        absent = {k for k, v in weight_map.items() if v == f} - set(part)
        if absent:
            problems.append(f"{f} lacks tensors that the index places there, {name_list(absent)}")
        for k, v in part.items():
            if k in merged:
                problems.append(f"tensor {k!r} appears in more than one shard")
            merged[k] = v
    if problems:
        raise CheckpointError.listing(f"sharded checkpoint {str(directory)!r}", problems)
    return merged


class WeightFiles:
    """The weights of one checkpoint folder: `source` is the file read (model.safetensors, pytorch_model.bin) or
    the index of its shards. Nothing is read until `headers` or `tensors` is called."""

    def __init__(self, directory: Path, source: str):
        self.directory, self.source = directory, source
        self.safetensors = source in (SAFETENSORS_NAME, SAFETENSORS_INDEX_NAME)
        self._tensors: Optional[dict[str, torch.Tensor]] = None

    def _read(self, read: Callable[[Path], dict[str, V]]) -> dict[str, V]:
        if self.source.endswith(".index.json"):
            return _sharded(self.directory, self.source, read)
        return read(self.directory / self.source)

    def headers(self) -> dict[str, TensorInfo]:
        """Shape and dtype of every stored tensor: from the headers for safetensors (no tensor data read), else
        from the tensors, read once and kept for `tensors`."""
        if self.safetensors:
            return self._read(_safetensors_headers)
        return {k: TensorInfo.of(t) for k, t in self.tensors().items()}

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every stored tensor, on the CPU, under its file name."""
        if self._tensors is not None:
            return self._tensors
        tensors = self._read(_safetensors_tensors if self.safetensors else _bin_tensors)
        if not self.safetensors:
            self._tensors = tensors
        return tensors


def find_weights(path: Union[str, os.PathLike]) -> WeightFiles:
    """The weights of a folder, preferring model.safetensors, then the sharded safetensors index, then
    pytorch_model.bin, then its sharded index; CheckpointError when it holds none of them."""
    directory = Path(path)
    for name in (SAFETENSORS_NAME, SAFETENSORS_INDEX_NAME, BIN_NAME, BIN_INDEX_NAME):
        if (directory / name).is_file():
            return WeightFiles(directory, name)
    raise CheckpointError(f"checkpoint {str(directory)!r} holds no weights: expected {SAFETENSORS_NAME}, "
                          f"{SAFETENSORS_INDEX_NAME}, {BIN_NAME} or {BIN_INDEX_NAME}")


def read_weights(path: Union[str, os.PathLike]) -> tuple[dict[str, torch.Tensor], str]:
    """The raw tensors of a checkpoint folder (file key names) and the file they came from (see `find_weights`)."""
    weights = find_weights(path)
    return weights.tensors(), weights.source


def write_safetensors(state: dict[str, torch.Tensor], path: Path) -> None:
    """Write a state dict of contiguous CPU tensors that share no memory as a safetensors file."""
    safetensors.torch.save_file(state, str(path), metadata={"format": "pt"})
