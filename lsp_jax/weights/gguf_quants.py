"""GGML tensor types: how many bytes a tensor takes, and its float32 values, dequantized
whole or only in the quant blocks that hold chosen rows (any type `gguf.quants` knows)."""

import dataclasses
import math

import numpy as np

from lsp_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: `shape` in numpy order (rows last-but-one), ggml type id."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int
    nbytes: int


def _ggml_type_name(ggml_type: int) -> str:
    import gguf

    try:
        return gguf.GGMLQuantizationType(ggml_type).name
    except ValueError:
        return f"unknown type {ggml_type}"


def tensor_nbytes(shape, ggml_type) -> int:
    """Bytes of a tensor of `shape` stored as `ggml_type` (0 for a type gguf does not know)."""
    import gguf

    try:
        block_size, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        # Unknown types are reported when the tensor is read; size them as empty.
        return 0
    return math.prod(shape) // block_size * type_size


def _block_layout(info: TensorInfo, path: str) -> tuple[int, int]:
    """(values per quant block, bytes per block) of a tensor's type; blocks run along
    the innermost axis, so every row is an independent run of whole blocks."""
    import gguf

    try:
        block_size, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(info.ggml_type)]
    except (ValueError, KeyError):
        raise _unsupported_type(info, path) from None
    if info.shape[-1] % block_size:
        raise _unsupported_type(info, path)
    return block_size, type_size


def read_rows(buffer, info: TensorInfo, rows, col_start: int, col_stop: int, *, path: str = ""):
    """Float32 values [len(rows), col_stop - col_start] of the given rows (indices into
    the tensor viewed as [rows, innermost]) and columns, reading and dequantizing only
    the quant blocks that hold them. `buffer`: the whole file's bytes (GGUFFile.buffer)."""
    block_size, type_size = _block_layout(info, path)
    num_rows = math.prod(info.shape[:-1])
    row_bytes = info.shape[-1] // block_size * type_size
    data = np.frombuffer(buffer, np.uint8, count=info.nbytes, offset=info.offset)
    first, last = col_start // block_size, -(-col_stop // block_size)
    raw = data.reshape(num_rows, row_bytes)[np.asarray(rows), first * type_size : last * type_size]
    part = dataclasses.replace(info, shape=(len(raw), (last - first) * block_size), offset=0)
    values = dequantize(raw, part, path=path)
    return values[:, col_start - first * block_size : col_stop - first * block_size]


def dequantize(raw_bytes: np.ndarray, info: TensorInfo, *, path: str = "") -> np.ndarray:
    """Float32 values of one tensor from its raw bytes (any type gguf.quants knows)."""
    import gguf

    block_size, type_size = _block_layout(info, path)
    ggml_type = gguf.GGMLQuantizationType(info.ggml_type)
    rows = raw_bytes.reshape(*info.shape[:-1], info.shape[-1] // block_size * type_size)
    try:
        values = gguf.quants.dequantize(rows, ggml_type)
    except NotImplementedError:
        raise _unsupported_type(info, path) from None
    return np.asarray(values, np.float32).reshape(info.shape)


def _unsupported_type(info: TensorInfo, path: str) -> UserError:
    return UserError(
        f"Tensor {info.name!r} in {path} has GGML type {_ggml_type_name(info.ggml_type)}, "
        f"which lsp_jax cannot dequantize (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, "
        f"Q8_0, K-quants and the other types of the installed `gguf` package). Convert the "
        f"model to another type with llama.cpp's llama-quantize, or load its safetensors."
    )
