"""dsd.inspect (dsd_format_inspect): what a checkpoint holds, from its metadata alone."""
import os
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp

import dsd


def _state():
    torch.manual_seed(0)
    return {"model": {"w": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int32)},
            "step": 7, "groups": [{"lr": 0.5}]}


def test_inspect_dsd_checkpoint(tmp_path):
    path = str(tmp_path / "ck")
    dsd.save(_state(), path)
    info = dsd.inspect(path)
    assert info["format"] == "dsd" and info["world_size"] == 1
    e = info["entries"]
    assert set(e) == {"model.w", "model.b", "step", "groups.0.lr"}
    assert e["model.w"] == {"kind": "tensor", "path": ["model", "w"], "dtype": "float32",
                            "shape": [3, 4], "nbytes": 48,
                            "chunks": [{"offsets": [0, 0], "sizes": [3, 4]}]}
    assert e["model.b"]["dtype"] == "int32" and e["model.b"]["nbytes"] == 20
    assert e["groups.0.lr"] == {"kind": "value", "path": ["groups", 0, "lr"]}
    assert e["step"]["kind"] == "value"


def test_inspect_dcp_checkpoint(tmp_path):
    path = str(tmp_path / "dcp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"a": torch.ones(2, 6, dtype=torch.bfloat16), "n": {"x": 5}}, checkpoint_id=path,
                 no_dist=True)
    info = dsd.inspect(path)
    assert info["format"] == "dcp"
    a = info["entries"]["a"]
    assert (a["kind"], a["dtype"], a["shape"], a["nbytes"]) == ("tensor", "bfloat16", [2, 6], 24)
    assert a["chunks"] == [{"offsets": [0, 0], "sizes": [2, 6]}]
    assert info["entries"]["n.x"]["kind"] == "value"


def test_inspect_reads_no_tensor_data(tmp_path):
    """Tensor bytes are not read: a checkpoint whose data is damaged (verify fails) still inspects."""
    path = str(tmp_path / "ck")
    dsd.save(_state(), path)
    with pytest.raises(dsd.CorruptError):
        data = [f for f in os.listdir(path) if f.endswith(".safetensors")]
        for f in data:
            with open(os.path.join(path, f), "r+b") as fh:
                fh.seek(-4, os.SEEK_END)
                fh.write(b"\xff\xff\xff\xff")
        dsd.verify(path)
    assert "model.w" in dsd.inspect(path)["entries"]


def test_inspect_missing_path(tmp_path):
    with pytest.raises(dsd.NotFoundError) as e:
        dsd.inspect(str(tmp_path / "nothing"))
    assert "nothing" in str(e.value)


def test_inspect_corrupt_manifest(tmp_path):
    path = str(tmp_path / "ck")
    dsd.save(_state(), path)
    with open(os.path.join(path, "checkpoint.json"), "w") as f:
        f.write('{"format_version": 1, "entries": [')
    with pytest.raises(dsd.CorruptError) as e:
        dsd.inspect(path)
    assert "checkpoint.json" in str(e.value)


def test_inspect_not_a_checkpoint(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("hello")
    with pytest.raises(dsd.UnsupportedError):
        dsd.inspect(str(f))
