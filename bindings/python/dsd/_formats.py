"""Conversions between dsd checkpoints, PyTorch DCP checkpoints, torch.save files and
Hugging Face safetensors: dsd.detect_format, dsd.convert, dsd.export_torch_save, ..."""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from . import _capi
from ._capi import ConvertOptions, LoadOptions
from ._tree import take_python, tree_of

if TYPE_CHECKING:
    import torch

FORMATS = tuple(_capi.FORMATS)  # "dsd", "dcp", "torch", "safetensors"


def _dtype_name(dtype: torch.dtype | str | None) -> str | None:
    """The dtype's name: "torch.bfloat16" for torch.bfloat16, a string as it is."""
    if dtype is None or isinstance(dtype, str):
        return dtype
    name = str(dtype)
    if not name.startswith("torch."):
        raise TypeError(f"dtype must be a torch.dtype or its name, not {type(dtype).__name__}")
    return name


def detect_format(path: str) -> str:
    """"dsd", "dcp", "torch" or "safetensors": what is at `path`."""
    return _capi.format_detect(path)


def inspect(path: str, *, allow_external_files: bool = False) -> dict:
    """What is at `path` (a dsd or DCP checkpoint, a torch.save file, safetensors), from its
    metadata alone: no tensor data is read.

    Returns ``{"format": "dsd" | "dcp" | "torch" | "safetensors", "world_size": int,
    "entries": {flat_key: entry}}``, each entry ``{"kind": "tensor" | "value", "path": [...]}``
    (the nested path: str keys, int list indices) and, for tensors, ``"dtype"`` (torch's name,
    "float32"), ``"shape"``, ``"nbytes"`` and ``"chunks"``: the saved pieces as
    ``{"offsets": [...], "sizes": [...]}``. `allow_external_files` lets a dsd checkpoint's
    data files be symbolic links (as for dsd.load).

    Raises dsd.NotFoundError (nothing at `path`), dsd.CorruptError (a malformed manifest,
    metadata or header, naming the file) and dsd.UnsupportedError (a file of another kind).
    """
    options = LoadOptions(allow_external_files=allow_external_files) if allow_external_files else None
    return take_python(_capi.format_inspect(path, options))


def convert(src: str, dst: str, to: str, *, overwrite: bool = False, thread_count: int = 0,
            max_shard_size: int | None = None, select: str | None = None, strip_prefix: bool = False,
            dtype: torch.dtype | str | None = None, dequantize: bool = False,
            materialize: bool = False) -> None:
    """Converts `src` (any of dsd, dcp, torch, safetensors; detected) to `dst` in format `to`,
    tensor by tensor.

    `dequantize` writes FP8 block-scaled weights (a float8 `X.weight` with a float32
    `X.weight_scale_inv`, one scale per 128x128 block, as DeepSeek-V3 ships) as `dtype`
    (bfloat16 by default), as PyTorch's QuantizedHuggingFaceStorageReader, dropping the
    scales. `materialize` (to="dsd", no other option) copies a dsd checkpoint as it is, with
    the files an incremental checkpoint references in its bases copied in, so it stands
    alone; `dst` may be `src` (in place).

    `select` writes only the entries whose flat key is that prefix or starts with it and a
    dot ("model" and "model." select everything under the key "model"); `strip_prefix`
    drops the prefix from the written keys; `dtype` (a torch.dtype or its name, "bfloat16")
    casts every floating tensor as Tensor.to would, keeping integer and bool tensors. The
    model of a training checkpoint {"model": ..., "optim": ..., "step": N} as Hugging Face
    weights that from_pretrained loads (with the model's config.json beside them)::

        dsd.convert("ckpt", "hf", "safetensors", select="model", strip_prefix=True,
                    dtype=torch.bfloat16, max_shard_size=2_000_000_000)

    Raises dsd.NotFoundError when `select` matches nothing, dsd.InvalidArgumentError for
    strip_prefix without select or a non-floating dtype, ValueError for an unknown dtype
    name, and the errors of reading `src` and writing `dst`.
    """
    _capi.format_convert(src, dst, to, ConvertOptions(overwrite, thread_count, max_shard_size, select,
                                                      strip_prefix, _dtype_name(dtype), dequantize,
                                                      materialize))


def export_torch_save(state_dict: Mapping, path: str, *, overwrite: bool = False,
                      select: str | None = None, strip_prefix: bool = False,
                      dtype: torch.dtype | str | None = None) -> None:
    """Writes `state_dict` (full tensors) as a torch.save file that torch.load reads with
    weights_only=True; `select`, `strip_prefix` and `dtype` choose what is written, as for
    dsd.convert."""
    with tree_of(state_dict) as sd:
        _capi.torch_save_export(sd, path, ConvertOptions(overwrite, select=select,
                                                         strip_prefix=strip_prefix,
                                                         dtype=_dtype_name(dtype)))


def import_torch_save(path: str) -> dict:
    """The state dict of a torch.save file, read without executing any pickle."""
    return take_python(_capi.torch_save_import(path))


def export_safetensors(state_dict: Mapping, path: str, *, overwrite: bool = False,
                       max_shard_size: int | None = None, thread_count: int = 0,
                       select: str | None = None, strip_prefix: bool = False,
                       dtype: torch.dtype | str | None = None) -> None:
    """Writes `state_dict` (full tensors) as a Hugging Face safetensors directory:
    model-0000i-of-0000N.safetensors + model.safetensors.index.json, flat keys; `select`,
    `strip_prefix` and `dtype` choose what is written, as for dsd.convert."""
    with tree_of(state_dict) as sd:
        _capi.safetensors_export(sd, path, ConvertOptions(overwrite, thread_count, max_shard_size,
                                                          select, strip_prefix, _dtype_name(dtype)))


def import_safetensors(path: str) -> dict:
    """The state dict of a safetensors directory or file (nested again when dsd wrote it)."""
    return take_python(_capi.safetensors_import(path))
