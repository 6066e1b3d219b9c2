"""Conversions between dsd checkpoints, PyTorch DCP checkpoints, torch.save files and
Hugging Face safetensors: dsd.detect_format, dsd.convert, dsd.export_torch_save, ..."""
from __future__ import annotations

from collections.abc import Mapping

from . import _capi
from ._capi import ConvertOptions
from ._tree import take_python, tree_of

FORMATS = tuple(_capi.FORMATS)  # "dsd", "dcp", "torch", "safetensors"


def detect_format(path: str) -> str:
    """"dsd", "dcp", "torch" or "safetensors": what is at `path`."""
    return _capi.format_detect(path)


def convert(src: str, dst: str, to: str, *, overwrite: bool = False, thread_count: int = 0,
            max_shard_size: int | None = None) -> None:
    """Converts `src` (any of dsd, dcp, torch, safetensors; detected) to `dst` in format `to`,
    tensor by tensor."""
    _capi.format_convert(src, dst, to, ConvertOptions(overwrite, thread_count, max_shard_size))


def export_torch_save(state_dict: Mapping, path: str, *, overwrite: bool = False) -> None:
    """Writes `state_dict` (full tensors) as a torch.save file that torch.load reads with
    weights_only=True."""
    with tree_of(state_dict) as sd:
        _capi.torch_save_export(sd, path, ConvertOptions(overwrite))


def import_torch_save(path: str) -> dict:
    """The state dict of a torch.save file, read without executing any pickle."""
    return take_python(_capi.torch_save_import(path))


def export_safetensors(state_dict: Mapping, path: str, *, overwrite: bool = False,
                       max_shard_size: int | None = None, thread_count: int = 0) -> None:
    """Writes `state_dict` (full tensors) as a Hugging Face safetensors directory:
    model-0000i-of-0000N.safetensors + model.safetensors.index.json, flat keys."""
    with tree_of(state_dict) as sd:
        _capi.safetensors_export(sd, path, ConvertOptions(overwrite, thread_count, max_shard_size))


def import_safetensors(path: str) -> dict:
    """The state dict of a safetensors directory or file (nested again when dsd wrote it)."""
    return take_python(_capi.safetensors_import(path))
