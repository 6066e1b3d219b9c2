"""PyTorch DCP's own format through dsd's checkpoint engine, against the real PyTorch of .venv:

- checkpoints written by dcp.save at world 1 and 4 (DTensor Shard(0)/Shard(1)/Replicate,
  plain tensors, non-tensor values; also a save without collectives, which leaves rank-local
  __<rank>.metadata files) are loaded by dsd.load in place at world 1, 2 and 3, resharding,
  bitwise equal;
- dsd.save(format="dcp") at world 2 is read by dcp.load at world 1 and 3;
- DCP's HuggingFaceStorageReader + dcp.load read a dsd checkpoint saved at world 2;
- errors (strict keys, shapes) raised on one rank surface on every rank.
"""
import os
import pickle
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageReader

import dcp_engine_workers as w
import dsd
import mp_util

warnings.simplefilter("ignore")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def spawn(fn, world, *args):
    mp_util.spawn(fn, world, world, *args)


def tensor_bytes(t):
    return bytes(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())


def assert_state_equal(got, want, where=""):
    assert type(got) is type(want) or (isinstance(want, tuple) and isinstance(got, tuple)), \
        f"{where}: {type(got)} vs {type(want)}"
    if isinstance(want, dict):
        assert sorted(got) == sorted(want), where
        for k in want:
            assert_state_equal(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for i, (a, b) in enumerate(zip(got, want)):
            assert_state_equal(a, b, f"{where}.{i}")
    elif isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype and got.shape == want.shape, where
        assert tensor_bytes(got) == tensor_bytes(want), where  # bitwise
    else:
        assert got == want, where


@pytest.fixture(scope="module")
def dcp_world4(tmp_path_factory):
    root = tmp_path_factory.mktemp("dcp4")
    ckpt = root / "ckpt"
    spawn(w.dcp_save_worker, 4, str(root / "store"), str(ckpt))
    return ckpt


@pytest.fixture(scope="module")
def dcp_world1(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("dcp1") / "ckpt"
    dcp.save(w.global_state(), checkpoint_id=ckpt)
    return ckpt


def load_with_dsd(tmp_path, ckpt, world):
    results = tmp_path / f"results{world}"
    results.mkdir()
    spawn(w.dsd_load_worker, world, str(tmp_path / f"store{world}"), str(ckpt), str(results))
    return [torch.load(results / f"rank{r}.pt") for r in range(world)]


def test_world4_checkpoint_has_sharded_chunks(dcp_world4):
    md = pickle.load(open(dcp_world4 / ".metadata", "rb"))
    assert [list(c.sizes) for c in md.state_dict_metadata["model.w"].chunks] == [[3, 3], [3, 3], [3, 3], [1, 3]]
    assert [list(c.sizes) for c in md.state_dict_metadata["model.col"].chunks] == [[4, 3], [4, 3], [4, 3], [4, 0]]
    assert dsd.detect_format(dcp_world4) == "dcp"


@pytest.mark.parametrize("world", [1, 2, 3])
def test_dsd_loads_dcp_world4_in_place_resharded(tmp_path, dcp_world4, world):
    for rank, got in enumerate(load_with_dsd(tmp_path, dcp_world4, world)):
        assert_state_equal(got, w.global_state(), f"rank{rank}")


@pytest.mark.parametrize("world", [2, 3])
def test_dsd_loads_dcp_world1_in_place_resharded(tmp_path, dcp_world1, world):
    for rank, got in enumerate(load_with_dsd(tmp_path, dcp_world1, world)):
        assert_state_equal(got, w.global_state(), f"rank{rank}")


def test_dsd_loads_dcp_world1_in_one_process(dcp_world1):
    state = w.zeroed(w.global_state())
    report = dsd.load(state, dcp_world1)
    assert report.missing_keys == [] and report.unexpected_keys == []
    assert_state_equal(state, w.global_state())
    assert_state_equal(dsd.load_full(dcp_world1), w.global_state())


def test_dsd_loads_a_save_without_collectives(tmp_path):
    ckpt = tmp_path / "ckpt"
    spawn(w.dcp_save_worker, 4, str(tmp_path / "store"), str(ckpt), False)
    names = sorted(p.name for p in ckpt.iterdir())
    assert ".metadata" not in names and "__0.metadata" in names and "__3.metadata" in names
    # Every rank's own metadata is merged: the whole state comes back, at another world size.
    for rank, got in enumerate(load_with_dsd(tmp_path, ckpt, 2)):
        assert_state_equal(got, w.global_state(), f"rank{rank}")
    assert_state_equal(dsd.load_full(ckpt), w.global_state())


def test_strict_and_partial_loads_of_a_dcp_checkpoint(dcp_world1):
    state = w.zeroed(w.global_state())
    state["model"]["missing"] = torch.zeros(2)
    with pytest.raises(dsd.NotFoundError, match="Missing key in checkpoint state_dict: model.missing"):
        dsd.load(state, dcp_world1)
    report = dsd.load(state, dcp_world1, strict=False)
    assert report.missing_keys == ["model.missing"]
    assert torch.equal(state["model"]["w"], w.global_state()["model"]["w"])
    bad = w.zeroed(w.global_state())
    bad["model"]["w"] = torch.zeros(10, 4)
    with pytest.raises(dsd.ShapeMismatchError, match=r"Size mismatch between saved \[10, 3\] and current: \[10, 4\] "
                                                     r"for 'model.w'"):
        dsd.load(bad, dcp_world1)
    bad = w.zeroed(w.global_state())
    bad["model"]["w"] = torch.zeros(10, 3, dtype=torch.float64)
    with pytest.raises(dsd.DtypeMismatchError, match="model.w"):
        dsd.load(bad, dcp_world1)
    bad = w.zeroed(w.global_state())
    bad["optim"]["step"] = torch.zeros(1)
    with pytest.raises(dsd.HandleError, match="'optim.step' is a tensor in the state dict but a non-tensor value"):
        dsd.load(bad, dcp_world1)


@pytest.mark.parametrize("case,pattern", [("missing", "Missing key in checkpoint state_dict: model.extra"),
                                          ("shape", "Size mismatch between saved [5] and current: [6] for 'model.plain'")])
def test_an_error_on_one_rank_fails_every_rank(tmp_path, dcp_world4, case, pattern):
    results = tmp_path / "results"
    results.mkdir()
    spawn(w.dsd_error_worker, 3, str(tmp_path / "store"), str(dcp_world4), str(results), case)
    outcomes = [(results / f"rank{r}.txt").read_text() for r in range(3)]
    assert len(set(outcomes)) == 1, outcomes
    assert pattern in outcomes[0], outcomes[0]


def test_dsd_wrote_dcp_at_world2_read_by_dcp_load_at_world_1_and_3(tmp_path):
    ckpt = tmp_path / "ckpt"
    spawn(w.dsd_save_worker, 2, str(tmp_path / "save"), str(ckpt), "dcp")
    names = sorted(p.name for p in ckpt.iterdir())
    assert names[0] == ".metadata" and all(n.endswith(".distcp") and n.startswith("__") for n in names[1:]), names
    assert {n.split("_")[2] for n in names[1:]} == {"0", "1"}  # both ranks wrote
    md = pickle.load(open(ckpt / ".metadata", "rb"))
    assert md.version == "1.0.0"
    assert [list(c.sizes) for c in md.state_dict_metadata["model.w"].chunks] == [[5, 3], [5, 3]]
    assert [list(c.sizes) for c in md.state_dict_metadata["model.rep"].chunks] == [[6]]  # replicated: written once
    # World 1: plain tensors, no process group.
    state = w.zeroed(w.global_state())
    dcp.load(state, checkpoint_id=ckpt, no_dist=True)
    assert_state_equal(state, w.global_state())
    # World 3: DTensors.
    results = tmp_path / "results"
    results.mkdir()
    spawn(w.dcp_load_worker, 3, str(tmp_path / "load"), str(ckpt), str(results))
    for r in range(3):
        assert_state_equal(torch.load(results / f"rank{r}.pt"), w.global_state(), f"rank{r}")
    # And dsd reads its own DCP output back at another world size.
    for rank, got in enumerate(load_with_dsd(tmp_path, ckpt, 3)):
        assert_state_equal(got, w.global_state(), f"rank{rank}")


def test_dcp_format_save_overwrites_atomically(tmp_path):
    ckpt = tmp_path / "ckpt"
    dsd.save({"a": torch.ones(3), "n": 1}, ckpt, format="dcp")
    with pytest.raises(dsd.Error, match="a checkpoint already exists") as e:
        dsd.save({"a": torch.ones(3)}, ckpt, format="dcp")
    assert e.value.code_name == "exists"
    before = sorted(p.name for p in ckpt.iterdir())
    dsd.save({"a": torch.full((4,), 2.0), "n": 2}, ckpt, format="dcp", overwrite=True)
    after = sorted(p.name for p in ckpt.iterdir())
    assert not set(before[1:]) & set(after[1:]), (before, after)  # new data files, old ones removed
    state = {"a": torch.zeros(4), "n": None}
    dcp.load(state, checkpoint_id=ckpt, no_dist=True)
    assert torch.equal(state["a"], torch.full((4,), 2.0)) and state["n"] == 2
    # A dsd-format save over it replaces the DCP checkpoint (and the other way round).
    dsd.save({"a": torch.ones(2)}, ckpt, overwrite=True)
    assert dsd.detect_format(ckpt) == "dsd" and not list(ckpt.glob("*.distcp"))
    dsd.save({"a": torch.ones(2)}, ckpt, overwrite=True, format="dcp")
    assert dsd.detect_format(ckpt) == "dcp" and not (ckpt / "checkpoint.json").exists()


def test_dcp_format_saves_with_plan_caching_are_read_by_dcp_load(tmp_path):
    # Saves of one structure over the same (process-wide local) communicator reuse the first
    # one's plan: dcp.load must still read each save's own tensors and values, and each save
    # writes new data files (DCP's numbering continues). A changed shape plans afresh.
    def state(step, cols=4):
        return {"model": {"w": torch.arange(3.0 * cols).view(3, cols) + step,
                          "b": torch.full((5,), float(step), dtype=torch.float64)},
                "step": step, "name": f"run{step}"}

    def blank(cols=4):
        return {"model": {"w": torch.zeros(3, cols), "b": torch.zeros(5, dtype=torch.float64)},
                "step": None, "name": None}

    ckpt = tmp_path / "ckpt"
    files = []
    for step, cols in ((1, 4), (2, 4), (3, 4), (4, 6), (5, 6)):
        dsd.save(state(step, cols), ckpt, format="dcp", enable_plan_caching=True, overwrite=True)
        files.append({p.name for p in ckpt.glob("*.distcp")})
        got = blank(cols)
        dcp.load(got, checkpoint_id=ckpt, no_dist=True)
        assert_state_equal(got, state(step, cols), f"step {step}")
    for a, b in zip(files, files[1:]):
        assert not a & b, files


def test_huggingface_storage_reader_loads_a_dsd_checkpoint_saved_at_world2(tmp_path):
    ckpt = tmp_path / "ckpt"
    spawn(w.dsd_save_worker, 2, str(tmp_path / "save"), str(ckpt), "dsd")
    want = w.global_state()["model"]
    target = {k: torch.zeros_like(v) for k, v in want.items()}
    target = {f"model.{k}": v for k, v in target.items()}
    dcp.load(target, storage_reader=HuggingFaceStorageReader(str(ckpt)), no_dist=True)
    for k, v in want.items():
        assert torch.equal(target[f"model.{k}"], v), k


def test_dcp_verify_and_bad_metadata(tmp_path, dcp_world1):
    dsd.verify(dcp_world1)
    # A .metadata naming a class outside the allow-list is refused without running it.
    ckpt = tmp_path / "evil"
    dcp.save({"w": torch.zeros(2)}, checkpoint_id=ckpt)
    md = pickle.load(open(ckpt / ".metadata", "rb"))
    md.planner_data["x"] = os.system  # a global outside the allow-list
    pickle.dump(md, open(ckpt / ".metadata", "wb"))
    with pytest.raises(dsd.UnsupportedError, match="posix.system|os.system"):
        dsd.load({"w": torch.zeros(2)}, ckpt)
    # A truncated data file is corrupt, naming the file and the key.
    ckpt = tmp_path / "cut"
    dcp.save({"w": torch.arange(1000.0)}, checkpoint_id=ckpt)
    data = ckpt / "__0_0.distcp"
    data.write_bytes(data.read_bytes()[:-2000])
    with pytest.raises(dsd.Error) as e:
        dsd.load({"w": torch.zeros(1000)}, ckpt)
    assert e.value.code_name == "corrupt" and "__0_0.distcp" in str(e.value) and "'w'" in str(e.value)
    with pytest.raises(dsd.Error, match="__0_0.distcp"):
        dsd.verify(ckpt)


def test_save_options_format_field_and_struct_sizes(tmp_path):
    from dsd import ffi, lib
    sd = {"a": torch.arange(4.0)}
    dsd.save(sd, tmp_path / "async_ck", format="dcp")  # and asynchronously:
    dsd.async_save(sd, tmp_path / "async", format="dcp").result(timeout=60)
    assert dsd.detect_format(tmp_path / "async") == "dcp"
    assert torch.equal(dsd.load_full(tmp_path / "async")["a"], sd["a"])
    size = ffi.sizeof("dsd_checkpoint_save_options")
    o = ffi.new("dsd_checkpoint_save_options*")
    lib.dsd_checkpoint_save_options_init(o)
    assert o.format == lib.DSD_FORMAT_DSD and o.struct_size == size
    tree = dsd.StateDict.from_python(sd)

    def save(options, name):
        err = ffi.new("dsd_error**")
        status = lib.dsd_checkpoint_save(ffi.NULL, tree.ptr, str(tmp_path / name).encode(), options, err)
        message = "" if err[0] == ffi.NULL else ffi.string(lib.dsd_error_message(err[0])).decode()
        lib.dsd_error_free(err[0])
        return status, message

    # ABI 1.0 has one version of the struct: a smaller struct_size is none, and refused.
    o.format = lib.DSD_FORMAT_DCP
    o.struct_size = ffi.offsetof("dsd_checkpoint_save_options", "format")
    status, message = save(o, "short")
    assert status == lib.DSD_E_INVALID_ARGUMENT and "struct_size" in message, message
    # A newer header's larger struct is read when the bytes this library does not know are
    # zero, and refused when they are not.
    big = ffi.new("char[]", size + 8)
    o.struct_size = size + 8
    ffi.memmove(big, o, size)
    assert save(ffi.cast("dsd_checkpoint_save_options*", big), "newer") == (lib.DSD_OK, "")
    assert dsd.detect_format(tmp_path / "newer") == "dcp"
    big[size + 3] = b"\x01"
    status, message = save(ffi.cast("dsd_checkpoint_save_options*", big), "unknown")
    assert status == lib.DSD_E_UNSUPPORTED, message
    o.struct_size = size
    o.format = lib.DSD_FORMAT_TORCH
    status, message = save(o, "bad")
    assert status == lib.DSD_E_INVALID_ARGUMENT and "is not DSD_FORMAT_DSD or DSD_FORMAT_DCP" in message
    o.format = 0
    assert save(o, "zero")[0] == lib.DSD_E_INVALID_ARGUMENT  # 0 is never a valid enum value
    with pytest.raises(ValueError, match="unknown format 'zip'"):
        dsd.save(sd, tmp_path / "zip", format="zip")
