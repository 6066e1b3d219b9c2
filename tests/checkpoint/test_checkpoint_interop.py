"""dsd checkpoints from Python, checked against the real PyTorch in .venv: the safetensors
library opens every data file, DCP's HuggingFaceStorageReader loads a dsd checkpoint with
dcp.load, flat keys match DCP's flatten_state_dict, and the Python API round-trips."""
from __future__ import annotations

import glob
import json
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from torch.distributed.checkpoint import HuggingFaceStorageReader
from torch.distributed.checkpoint._nested_dict import flatten_state_dict

import dsd


def sample():
    torch.manual_seed(0)
    return {
        "model": {
            "layer.weight": torch.randn(16, 8),
            "layer.bias": torch.randn(8, dtype=torch.float64),
            "emb": torch.randn(10, 4).to(torch.bfloat16),
            "mask": torch.rand(5) > 0.5,
            "count": torch.tensor(7, dtype=torch.int64),
        },
        "optim": {
            "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(16, 8)}},
            "param_groups": [{"lr": 0.01, "betas": (0.9, 0.999), "params": [0], "name": "g"}],
        },
        "epoch": 4,
        "nan": float("nan"),
        "blob": b"\x00\x01\xff",
    }


def zeros_like_tree(obj):
    if isinstance(obj, dict):
        return {k: zeros_like_tree(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [zeros_like_tree(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return torch.zeros_like(obj)
    return None


def assert_tree_equal(a, b, path="root"):
    assert type(a) is type(b), f"{path}: {type(a)} vs {type(b)}"
    if isinstance(a, dict):
        assert list(a) == list(b), path
        for k in a:
            assert_tree_equal(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_tree_equal(x, y, f"{path}.{i}")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b), path
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), path
    else:
        assert a == b, path


def test_round_trip_through_the_python_api(tmp_path):
    sd = sample()
    dsd.save(sd, tmp_path / "ck")
    dst = zeros_like_tree(sd)
    report = dsd.load(dst, tmp_path / "ck")
    assert report.missing_keys == [] and report.unexpected_keys == []
    assert_tree_equal(sd, dst)
    assert_tree_equal(sd, dsd.load_full(tmp_path / "ck"))


def test_flat_keys_match_dcp_flattening(tmp_path):
    sd = sample()
    dsd.save(sd, tmp_path / "ck")
    with open(tmp_path / "ck" / "checkpoint.json") as f:
        manifest = json.load(f)
    flat, mapping = flatten_state_dict(sd)
    assert [e["key"] for e in manifest["entries"]] == list(flat)
    for e in manifest["entries"]:
        assert tuple(e["path"]) == tuple(mapping[e["key"]])


def test_safetensors_opens_every_data_file(tmp_path):
    sd = sample()
    dsd.save(sd, tmp_path / "ck", thread_count=2)
    files = sorted(glob.glob(str(tmp_path / "ck" / "*.safetensors")))
    assert len(files) == 2
    flat, _ = flatten_state_dict(sd)
    seen = {}
    for path in files:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata()
            assert meta["format"] == "pt" and meta["DCP_VERSION"] == "1.0"
            sharding = json.loads(meta["DCP_SHARDING_INFO"])
            for key in f.keys():
                assert sharding[key]["saved_offsets"] == [0] * flat[key].dim()
                seen[key] = f.get_tensor(key)
    tensors = {k: v for k, v in flat.items() if isinstance(v, torch.Tensor)}
    assert sorted(seen) == sorted(tensors)
    for k, v in tensors.items():
        assert torch.equal(seen[k], v), k


def test_dcp_huggingface_reader_loads_a_dsd_checkpoint(tmp_path):
    model = {"w": torch.randn(6, 4), "b": torch.randn(4).to(torch.bfloat16),
             "i": torch.arange(5, dtype=torch.int32)}
    dsd.save(model, tmp_path / "ck")
    target = {k: torch.zeros_like(v) for k, v in model.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(target, storage_reader=HuggingFaceStorageReader(str(tmp_path / "ck")), no_dist=True)
    for k in model:
        assert torch.equal(target[k], model[k]), k


def test_async_save_and_its_errors(tmp_path):
    sd = {"w": torch.ones(128, 128), "step": 1}
    fut = dsd.async_save(sd, tmp_path / "a")
    assert fut.staged()
    sd["w"].fill_(5.0)  # after staging: not in the checkpoint
    fut.result(timeout=60)
    assert fut.done()
    assert torch.equal(dsd.load_full(tmp_path / "a")["w"], torch.ones(128, 128))
    again = dsd.async_save(sd, tmp_path / "a")
    with pytest.raises(dsd.Error) as e:
        again.result()
    assert e.value.code_name == "exists"
    assert str(tmp_path / "a") in str(e.value)


def test_async_checkpointer(tmp_path):
    sd = {"w": torch.ones(64, 64), "step": 1}
    with dsd.AsyncCheckpointer() as ckpt:
        first = ckpt.save(sd, tmp_path / "a")
        sd["w"].fill_(2.0)  # staged already
        sd["step"] = 2
        second = ckpt.save(sd, tmp_path / "b", sync_files=False)  # waits for the first
        first.result(timeout=60)
        second.result(timeout=60)
    assert torch.equal(dsd.load_full(tmp_path / "a")["w"], torch.ones(64, 64))
    b = dsd.load_full(tmp_path / "b")
    assert b["step"] == 2 and torch.equal(b["w"], torch.full((64, 64), 2.0))
    ckpt.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        ckpt.save(sd, tmp_path / "c")
    with pytest.raises(TypeError):
        dsd.AsyncCheckpointer().save(sd, tmp_path / "d", no_such_option=True)
    with pytest.raises(ValueError, match="unknown format 'zip'"):
        dsd.async_save(sd, tmp_path / "e", format="zip")


def test_a_save_in_flight_commits_before_the_interpreter_exits(tmp_path):
    code = f"import dsd, torch; dsd.async_save({{'w': torch.ones(1 << 22)}}, {str(tmp_path / 'x')!r})"
    subprocess.run([sys.executable, "-c", code], check=True, env=os.environ, timeout=120)
    assert torch.equal(dsd.load_full(tmp_path / "x")["w"], torch.ones(1 << 22))


def test_async_save_and_manager_over_a_communicator(tmp_path):
    comm = dsd.Communicator.local()
    assert comm.async_checkpointer is None
    dsd.async_save({"w": torch.ones(4)}, tmp_path / "a", comm=comm).result(timeout=60)
    ckpt = comm.async_checkpointer  # one per communicator, made on first use
    assert isinstance(ckpt, dsd.AsyncCheckpointer)
    dsd.async_save({"w": torch.ones(4)}, tmp_path / "b", comm=comm).result(timeout=60)
    assert comm.async_checkpointer is ckpt
    assert torch.equal(dsd.load_full(tmp_path / "b")["w"], torch.ones(4))
    mgr = dsd.CheckpointManager(tmp_path / "run", keep_last=1, comm=comm)
    mgr.save({"w": torch.full((2,), 1.0)}, 1)
    mgr.async_save({"w": torch.full((2,), 2.0)}, 2).result(timeout=60)
    dst = {"w": torch.zeros(2)}
    assert mgr.load_latest(dst) == 2 and torch.equal(dst["w"], torch.full((2,), 2.0))
    assert sorted(os.listdir(tmp_path / "run")) == ["latest", "step_2"]


def test_strict_and_partial_loads(tmp_path):
    dsd.save({"a": torch.ones(2), "b": 1}, tmp_path / "ck")
    with pytest.raises(dsd.NotFoundError, match="Missing key in checkpoint state_dict: c"):
        dsd.load({"a": torch.zeros(2), "c": torch.zeros(1)}, tmp_path / "ck")
    dst = {"a": torch.zeros(2), "c": torch.zeros(1)}
    report = dsd.load(dst, tmp_path / "ck", strict=False)
    assert report.missing_keys == ["c"] and report.unexpected_keys == ["b"]
    assert torch.equal(dst["a"], torch.ones(2))
    with pytest.raises(dsd.ShapeMismatchError, match="Size mismatch"):
        dsd.load({"a": torch.zeros(3)}, tmp_path / "ck", strict=False)


def test_verify_names_the_damaged_file(tmp_path):
    dsd.save({"w": torch.randn(1000)}, tmp_path / "ck")
    dsd.verify(tmp_path / "ck")
    (path,) = glob.glob(str(tmp_path / "ck" / "*.safetensors"))
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) - 100)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 1]))
    with pytest.raises(dsd.Error) as e:
        dsd.verify(tmp_path / "ck")
    assert e.value.code_name == "corrupt" and os.path.basename(path) in str(e.value) and "'w'" in str(e.value)
    with pytest.raises(dsd.Error, match="checksum mismatch"):
        dsd.load({"w": torch.zeros(1000)}, tmp_path / "ck")


def test_checkpoint_manager(tmp_path):
    mgr = dsd.CheckpointManager(tmp_path / "run", keep_last=2)
    assert mgr.latest_step() is None
    for step in (1, 2, 3):
        mgr.save({"w": torch.full((3,), float(step)), "step": step}, step)
    fut = mgr.async_save({"w": torch.full((3,), 4.0), "step": 4}, 4)
    fut.result()
    assert mgr.latest_step() == 4
    assert sorted(os.listdir(tmp_path / "run")) == ["latest", "step_3", "step_4"]
    dst = {"w": torch.zeros(3), "step": 0}
    assert mgr.load_latest(dst) == 4
    assert dst["step"] == 4 and torch.equal(dst["w"], torch.full((3,), 4.0))
