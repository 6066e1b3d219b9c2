"""dsd.dcp (issue 12, "DCP plugin"): PyTorch DCP's dcp.save / dcp.async_save / dcp.load with
dsd's StorageWriter and StorageReader. World 2 under torchrun (dcp_plugin_worker.py), then
in this process at world 1: the reshard of what the 2 ranks saved, and the errors."""
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp

import dsd
import dsd.dcp

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """OUT_DIR of the 2-rank worker: dsd/ (dcp.save with the writer), full.pt (the full model)."""
    out = tmp_path_factory.mktemp("dcp_plugin")
    env = dict(os.environ, OMP_NUM_THREADS="1", DSD_TIMEOUT_S="60")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc-per-node", "2", os.path.join(HERE, "dcp_plugin_worker.py"), str(out)],
                       capture_output=True, text=True, timeout=280, env=env)
    text = p.stdout + p.stderr
    assert p.returncode == 0, text[-6000:]
    assert p.stdout.count("dcp plugin ok") == 2, text[-3000:]
    return out


def _load(state, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, storage_reader=dsd.dcp.StorageReader(path), no_dist=True)


def test_world2_save_load_async_under_torchrun(saved):
    for name in ("dsd", "async", "async2"):
        assert dsd.detect_format(str(saved / name)) == "dsd"
        dsd.verify(str(saved / name))


def test_reshard_world2_to_world1_full_state_dict(saved):
    from dcp_plugin_worker import make_model
    full = torch.load(str(saved / "full.pt"), weights_only=True)
    model = make_model()
    state = {"model": {k: torch.zeros_like(v) for k, v in model.state_dict().items()},
             "extra": {"step": -1, "tag": "", "scale": -1.0}}
    assert state["model"].keys() == full.keys()
    _load(state, str(saved / "dsd"))
    for k, v in full.items():
        assert torch.equal(state["model"][k], v), k
    assert state["extra"] == {"step": 3, "tag": "run-1", "scale": 0.25}


def test_world1_writer_round_trip_and_dsd_load(tmp_path):
    torch.manual_seed(1)
    sd = {"w": torch.randn(4, 3), "n": {"k": 2, "t": (1, 2.5), "obj": torch.Size([2, 3])}}
    path = str(tmp_path / "ck")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(sd, storage_writer=dsd.dcp.StorageWriter(path), no_dist=True)
    dsd.verify(path)
    # dsd.load reads it as the nested state it was (plain values as values).
    back = dsd.load_full(path)
    assert torch.equal(back["w"], sd["w"]) and back["n"]["k"] == 2 and back["n"]["t"] == (1, 2.5)
    got = {"w": torch.zeros(4, 3), "n": {"k": 0, "t": (0, 0.0), "obj": None}}
    _load(got, path)
    assert torch.equal(got["w"], sd["w"])
    assert got["n"] == {"k": 2, "t": (1, 2.5), "obj": torch.Size([2, 3])}
    assert type(got["n"]["obj"]) is torch.Size and type(got["n"]["t"]) is tuple


def test_reader_missing_path_raises_not_found(tmp_path):
    missing = str(tmp_path / "nothing")
    with pytest.raises(dsd.NotFoundError):
        dsd.dcp.StorageReader(missing).read_metadata()
    # DCP gathers the rank's error into a CheckpointException (a BaseException).
    with pytest.raises(BaseException) as e:
        _load({"w": torch.zeros(2)}, missing)
    assert "nothing' does not exist" in str(e.value), str(e.value)


def test_reader_corrupt_checkpoint_raises(saved, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(saved / "dsd", bad)
    with open(bad / "checkpoint.json", "w") as f:
        f.write("{ not json")
    with pytest.raises(dsd.CorruptError):
        dsd.dcp.StorageReader(str(bad)).read_metadata()

    damaged = tmp_path / "damaged"
    shutil.copytree(saved / "dsd", damaged)
    for name in os.listdir(damaged):
        if name.endswith(".safetensors"):
            with open(damaged / name, "r+b") as f:  # every data byte (after the header)
                header = int.from_bytes(f.read(8), "little")
                size = os.fstat(f.fileno()).st_size
                f.seek(8 + header)
                f.write(b"\x7f" * (size - 8 - header))
    from dcp_plugin_worker import make_model
    state = {"model": {k: torch.zeros_like(v) for k, v in make_model().state_dict().items()}}
    with pytest.raises(BaseException) as e:
        _load(state, str(damaged))
    assert "checksum mismatch in data file" in str(e.value), str(e.value)
