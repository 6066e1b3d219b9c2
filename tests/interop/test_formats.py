"""core/formats against the real PyTorch of .venv: torch.save files and DCP checkpoints, both ways.

dsd's side runs through the formats_tool executable (formats_tool.cpp), which prints JSON in the
tagged form that describe() below builds from Python objects, so the two can be compared whole.
"""
import collections
import io
import json
import math
import os
import pickle
import shutil
import subprocess
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

import dcp_workers
import mp_util

warnings.simplefilter("ignore")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TOOL = os.path.join(os.environ.get("DSD_BUILD_DIR", "build"), "tests", "interop", "formats_tool")

# Every dtype dsd stores (core/tensor/dtype.h).
DTYPES = [
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16,
    torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128,
    torch.float8_e4m3fn, torch.float8_e5m2, torch.uint16, torch.uint32, torch.uint64,
]


def tool(*args):
    proc = subprocess.run([TOOL, *map(str, args)], capture_output=True, text=True, timeout=300)
    out = json.loads(proc.stdout)
    assert proc.returncode == 0, out
    return out


def tool_error(*args):
    proc = subprocess.run([TOOL, *map(str, args)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    return json.loads(proc.stdout)["error"]


def fnv1a(data: bytes) -> str:
    h = 1469598103934665603
    for b in data:
        h = ((h ^ b) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().resolve_conj().resolve_neg().contiguous().clone()
    return bytes(t.untyped_storage())


def describe(obj, layout=True, storages=None):
    """The tagged JSON formats_tool prints for a Value tree. layout=False leaves out strides and
    storage identity (for DCP, which saves whole tensors, not views)."""
    storages = {} if storages is None else storages
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return obj
    if isinstance(obj, float):
        if math.isnan(obj):
            return {"float": "nan"}
        if math.isinf(obj):
            return {"float": "inf" if obj > 0 else "-inf"}
        return {"float": obj}
    if isinstance(obj, (bytes, bytearray)):
        return {"bytes": bytes(obj).hex()}
    if isinstance(obj, torch.Tensor):
        d = {"dtype": str(obj.dtype).removeprefix("torch."), "shape": list(obj.shape),
             "fnv": fnv1a(tensor_bytes(obj))}
        if layout:
            key = obj.untyped_storage().data_ptr()
            d.update(stride=list(obj.stride()), storage_offset=obj.storage_offset(),
                     storage=storages.setdefault(key, len(storages)))
        return {"tensor": d}
    if isinstance(obj, tuple):
        return {"tuple": [describe(x, layout, storages) for x in obj]}
    if isinstance(obj, list):
        return {"list": [describe(x, layout, storages) for x in obj]}
    if isinstance(obj, dict):
        int_keys = bool(obj) and all(isinstance(k, int) for k in obj)
        return {"dict": [[str(k), describe(v, layout, storages)] for k, v in obj.items()], "int_keys": int_keys}
    raise TypeError(type(obj))


def without_layout(d):
    """Drops stride / storage identity from formats_tool output, and sorts dict items (DCP does
    not keep the order of keys across ranks)."""
    if isinstance(d, list):
        return [without_layout(x) for x in d]
    if isinstance(d, dict):
        if "tensor" in d:
            return {"tensor": {k: v for k, v in d["tensor"].items() if k not in ("stride", "storage_offset", "storage")}}
        if "dict" in d:
            return {"dict": sorted(([k, without_layout(v)] for k, v in d["dict"]), key=lambda kv: kv[0]),
                    "int_keys": d["int_keys"]}
        return {k: without_layout(v) for k, v in d.items()}
    return d


def all_tensors(obj):
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return [t for x in obj for t in all_tensors(x)]
    return []


def sample_tensor(dtype, shape=(2, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype in (torch.uint16, torch.uint32, torch.uint64):
        return torch.randint(0, 1000, shape, generator=g).to(dtype)
    if not dtype.is_floating_point and not dtype.is_complex:
        return torch.randint(-100, 100, shape, generator=g).to(dtype) if dtype != torch.uint8 else \
            torch.randint(0, 255, shape, generator=g).to(dtype)
    if dtype.is_complex:
        return torch.randn(shape, generator=g, dtype=dtype)
    return torch.randn(shape, generator=g).to(dtype)


def sample_state_dict():
    """A model + optimizer-like state with every dtype, views sharing storage, nested containers,
    nn.Parameter and the scalars a state dict holds."""
    sd = collections.OrderedDict()
    for i, dtype in enumerate(DTYPES):
        sd[f"dtype.{str(dtype).removeprefix('torch.')}"] = sample_tensor(dtype, seed=i)
    base = torch.arange(24.0).reshape(4, 6)
    sd["view.base"] = base
    sd["view.row"] = base[1]
    sd["view.column"] = base[:, 2]  # strided
    sd["view.transposed"] = base.t()
    sd["view.corner"] = base[2:, 3:]  # offset + strides
    sd["param"] = torch.nn.Parameter(torch.randn(3))
    sd["scalar"] = torch.tensor(3.5)
    sd["empty"] = torch.empty(0, 4)
    sd["nested"] = {
        "list": [1, 2.5, "x", None, True, b"\x00\xff"],
        "tuple": (1, (2, 3)),
        "state": {0: {"step": torch.tensor(1.0), "exp_avg": torch.zeros(3)}, 1: {"step": torch.tensor(2.0)}},
        "big": 2**62, "neg": -7, "nan": float("nan"), "inf": float("-inf"), "empty_bytes": b"",
    }
    sd["linear"] = torch.nn.Linear(2, 2).state_dict()  # an OrderedDict with _metadata
    return sd


# ---- torch.save files ---------------------------------------------------------------------


def test_torch_save_file_reads_identically(tmp_path):
    sd = sample_state_dict()
    path = tmp_path / "sd.pt"
    torch.save(sd, path)
    assert tool("torch-load", path) == describe(sd)


def test_views_keep_sharing_one_storage(tmp_path):
    sd = sample_state_dict()
    torch.save(sd, tmp_path / "sd.pt")
    out = dict(tool("torch-load", tmp_path / "sd.pt")["dict"])
    views = [out[k]["tensor"] for k in ("view.base", "view.row", "view.column", "view.transposed", "view.corner")]
    assert len({v["storage"] for v in views}) == 1
    assert views[4]["storage_offset"] == 15 and views[4]["stride"] == [6, 1]
    assert out["param"]["tensor"]["storage"] != views[0]["storage"]


@pytest.mark.parametrize("ordered", [True, False])
@pytest.mark.parametrize("crc", [True, False])
def test_dsd_written_file_loads_with_weights_only(tmp_path, ordered, crc):
    sd = sample_state_dict()
    torch.save(sd, tmp_path / "in.pt")
    args = ["torch-save-roundtrip", tmp_path / "in.pt", tmp_path / "out.pt"]
    args += ["--ordered"] if ordered else []
    args += [] if crc else ["--no-crc"]
    tool(*args)
    back = torch.load(tmp_path / "out.pt")  # weights_only=True is the default
    assert type(back) is (collections.OrderedDict if ordered else dict)
    assert describe(back) == describe(sd)
    # Views still share one storage after the round trip, and it was written once.
    assert back["view.row"].untyped_storage().data_ptr() == back["view.base"].untyped_storage().data_ptr()
    assert back["view.corner"].stride() == (6, 1)
    import zipfile
    names = zipfile.ZipFile(tmp_path / "out.pt").namelist()
    assert names[:4] == ["archive/data.pkl", "archive/.format_version", "archive/.storage_alignment",
                         "archive/byteorder"]
    assert "archive/version" in names and "archive/.data/serialization_id" in names
    storages = {t.untyped_storage().data_ptr() for t in all_tensors(sd)}
    assert len([n for n in names if n.startswith("archive/data/")]) == len(storages)


def test_empty_bytes_load_with_weights_only_once_rewritten(tmp_path):
    # torch.save pickles b"" as builtins.bytes(), which torch's weights-only unpickler refuses;
    # dsd writes _codecs.encode("", "latin1") instead.
    torch.save({"blob": b"", "x": b"\x80"}, tmp_path / "in.pt")
    with pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "in.pt")
    tool("torch-save-roundtrip", tmp_path / "in.pt", tmp_path / "out.pt")
    assert torch.load(tmp_path / "out.pt") == {"blob": b"", "x": b"\x80"}


def test_conj_and_neg_views_are_resolved(tmp_path):
    x = torch.randn(3, dtype=torch.complex64)
    torch.save({"conj": x.conj(), "neg": torch._neg_view(x)}, tmp_path / "c.pt")
    out = dict(tool("torch-load", tmp_path / "c.pt")["dict"])
    assert out["conj"]["tensor"]["fnv"] == fnv1a(tensor_bytes(x.conj()))
    assert out["neg"]["tensor"]["fnv"] == fnv1a(tensor_bytes(-x))


def test_archive_inside_a_larger_file(tmp_path):
    buf = io.BytesIO()
    sd = {"w": torch.arange(6.0), "n": 3}
    torch.save(sd, buf)
    data = buf.getvalue()
    (tmp_path / "blob").write_bytes(b"x" * 100 + data + b"y" * 50)
    assert tool("torch-load", tmp_path / "blob", 100, len(data)) == describe(sd)
    err = tool_error("torch-load", tmp_path / "blob", 100, len(data) + 51)
    assert err["code"] == "corrupt" and "runs past the end of the file" in err["message"]


class Evil:
    """Unpickling this with pickle would run a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_disallowed_globals_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"w": torch.zeros(1), "evil": Evil(marker)}, tmp_path / "evil.pt")
    err = tool_error("torch-load", tmp_path / "evil.pt")
    assert err["code"] == "unsupported"
    assert f"global '{os.system.__module__}.system', which is not allowed here" in err["message"]
    assert not marker.exists()

    # The same inside a DCP .metadata (which PyTorch itself reads with plain pickle.load).
    ckpt = tmp_path / "ckpt"
    dcp.save({"w": torch.zeros(2)}, checkpoint_id=ckpt)
    md = pickle.load(open(ckpt / ".metadata", "rb"))
    md.planner_data["evil"] = Evil(marker)
    pickle.dump(md, open(ckpt / ".metadata", "wb"))
    err = tool_error("dcp-metadata", ckpt)
    assert err["code"] == "unsupported" and f"'{os.system.__module__}.system'" in err["message"]
    assert not marker.exists()

    (tmp_path / "eval.pkl").write_bytes(pickle.dumps(eval, protocol=2))
    err = tool_error("pickle-load", tmp_path / "eval.pkl", "torch")
    assert "'builtins.eval'" in err["message"]


def test_allowed_but_unrepresentable_objects_are_named(tmp_path):
    torch.save({"s": {1, 2}}, tmp_path / "set.pt")
    err = tool_error("torch-load", tmp_path / "set.pt")
    assert err["code"] == "unsupported" and "'s' holds a set" in err["message"]
    torch.save({"d": torch.device("cpu")}, tmp_path / "dev.pt")
    err = tool_error("torch-load", tmp_path / "dev.pt")
    assert "an object of class torch.device" in err["message"]


def test_corrupt_archives_fail_cleanly(tmp_path):
    torch.save({"w": torch.arange(100.0)}, tmp_path / "ok.pt")
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    assert tool_error("torch-load", tmp_path / "cut.pt")["code"] == "corrupt"
    (tmp_path / "junk.pt").write_bytes(b"not a zip at all" * 10)
    assert tool_error("torch-load", tmp_path / "junk.pt")["code"] == "corrupt"
    assert tool_error("torch-load", tmp_path / "missing.pt")["code"] == "not_found"


def test_other_torch_formats_are_named(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    err = tool_error("torch-load", tmp_path / "legacy.pt")
    assert err["code"] == "unsupported" and "legacy (pre-1.6, non-zip) format" in err["message"]
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), tmp_path / "scripted.pt")
    err = tool_error("torch-load", tmp_path / "scripted.pt")
    assert err["code"] == "unsupported" and "is a TorchScript archive" in err["message"]


# ---- DCP checkpoints written by PyTorch -----------------------------------------------------


def py_metadata_json(md):
    """formats_tool's JSON for a Metadata object that pickle.load returned."""
    sd = []
    for fqn, m in md.state_dict_metadata.items():
        if hasattr(m, "chunks"):
            p = m.properties
            sd.append([fqn, {"tensor": {
                "dtype": str(p.dtype).removeprefix("torch."), "layout": str(p.layout),
                "requires_grad": p.requires_grad, "memory_format": 0 if p.memory_format == torch.contiguous_format else
                1 if p.memory_format == torch.channels_last else 2, "pin_memory": p.pin_memory,
                "size": list(m.size),
                "chunks": [{"offsets": list(c.offsets), "sizes": list(c.sizes)} for c in m.chunks]}}])
        else:
            sd.append([fqn, {"bytes": {}}])
    storage = [[{"fqn": k.fqn, "offset": None if k.offset is None else list(k.offset), "index": k.index},
                {"relative_path": v.relative_path, "offset": v.offset, "length": v.length,
                 "transform_descriptors": v.transform_descriptors}] for k, v in md.storage_data.items()]
    sm = md.storage_meta
    return {
        "version": md.version,
        "state_dict_metadata": sd,
        "planner_data": [[k, list(v)] for k, v in md.planner_data.items()],
        "storage_data": storage,
        "storage_meta": {"checkpoint_id": str(sm.checkpoint_id), "save_id": sm.save_id, "load_id": sm.load_id,
                         "modules": list(sm.modules)},
    }


def world1_state():
    state = {"model": {f"t.{str(d).removeprefix('torch.')}": sample_tensor(d, (3, 2), i) for i, d in enumerate(DTYPES)}}
    state["model"]["scalar"] = torch.tensor(2.0)
    state["optim"] = {"step": 5, "lr": 1e-3, "betas": (0.9, 0.99), "names": ["a", "b"], "blob": b"\x01", "none": None,
                      "flag": True}
    return state


def test_dcp_world1_metadata_and_items(tmp_path):
    state = world1_state()
    ckpt = tmp_path / "ckpt"
    dcp.save(state, checkpoint_id=ckpt)
    md = pickle.load(open(ckpt / ".metadata", "rb"))
    assert tool("dcp-metadata", ckpt) == py_metadata_json(md)
    assert without_layout(tool("dcp-read", ckpt)) == without_layout(describe(state, layout=False))


def test_dcp_chunk_raw_bytes_are_located(tmp_path):
    state = world1_state()
    ckpt = tmp_path / "ckpt"
    dcp.save(state, checkpoint_id=ckpt)
    md = pickle.load(open(ckpt / ".metadata", "rb"))
    checked = 0
    for index, info in md.storage_data.items():
        if index.offset is None:
            continue
        path = ckpt / info.relative_path
        out = tool("torch-locate", path, info.offset, info.length)
        chunk = torch.load(io.BytesIO(path.read_bytes()[info.offset: info.offset + info.length]))
        assert out["dtype"] == str(chunk.dtype).removeprefix("torch.")
        assert out["shape"] == list(chunk.shape) and out["contiguous"]
        assert out["storage_fnv"] == fnv1a(bytes(chunk.untyped_storage()))
        checked += 1
    assert checked == len(DTYPES) + 1


def test_dcp_metadata_written_back_is_read_by_pytorch(tmp_path):
    state = world1_state()
    ckpt = tmp_path / "ckpt"
    dcp.save(state, checkpoint_id=ckpt)
    original = pickle.load(open(ckpt / ".metadata", "rb"))
    tool("dcp-metadata-roundtrip", ckpt, tmp_path / "rewritten")
    shutil.copy(tmp_path / "rewritten", ckpt / ".metadata")
    md = FileSystemReader(ckpt).read_metadata()
    assert md.state_dict_metadata == original.state_dict_metadata
    assert md.planner_data == original.planner_data
    assert md.storage_data == original.storage_data
    assert [k.index for k in md.storage_data] == [k.index for k in original.storage_data]
    assert md.version == original.version and md.storage_meta.save_id == original.storage_meta.save_id
    fresh = world1_state()
    fresh["model"] = {k: torch.zeros_like(v) for k, v in fresh["model"].items()}
    fresh["optim"] = {k: None for k in fresh["optim"]}
    dcp.load(fresh, checkpoint_id=ckpt)
    assert describe(fresh, layout=False) == describe(state, layout=False)


def run_world4(fn, *args):
    mp_util.spawn(fn, dcp_workers.WORLD, *args)


def test_dcp_world4_sharded_checkpoint(tmp_path):
    ckpt = tmp_path / "ckpt"
    run_world4(dcp_workers.save_worker, str(tmp_path / "store"), str(ckpt))
    assert sorted(p.name for p in ckpt.iterdir()) == [".metadata"] + [f"__{r}_0.distcp" for r in range(4)]
    md = pickle.load(open(ckpt / ".metadata", "rb"))
    ours = tool("dcp-metadata", ckpt)
    assert ours == py_metadata_json(md)
    sizes = {fqn: [c["sizes"] for c in m["tensor"]["chunks"]] for fqn, m in ours["state_dict_metadata"] if "tensor" in m}
    assert sizes["model.w"] == [[3, 3], [3, 3], [3, 3], [1, 3]]
    assert sizes["model.few"] == [[1, 2], [1, 2], [1, 2], [0, 2]]  # an empty shard
    expected = describe(dcp_workers.global_state(), layout=False)
    assert without_layout(tool("dcp-read", ckpt)) == without_layout(expected)


# ---- DCP checkpoints written by dsd ---------------------------------------------------------


def dsd_checkpoint(tmp_path, chunks, files):
    state = dcp_workers.global_state()
    state["optim"]["blob"] = b""
    state["lists"] = {"tensors": [torch.ones(2), torch.full((3,), 2.0)], "ints": [1, 2]}
    torch.save(state, tmp_path / "in.pt")
    ckpt = tmp_path / "dsd_ckpt"
    ckpt.mkdir()
    tool("dcp-write", tmp_path / "in.pt", ckpt, "--chunks", chunks, "--files", files)
    return state, ckpt


def zeroed(state):
    def zero(v):
        if isinstance(v, torch.Tensor):
            return torch.zeros_like(v)
        if isinstance(v, dict):
            return {k: zero(x) for k, x in v.items()}
        if isinstance(v, list) and any(isinstance(x, torch.Tensor) for x in v):
            return [zero(x) for x in v]
        return None
    return zero(state)


def test_dsd_written_dcp_checkpoint_loads_in_pytorch(tmp_path):
    state, ckpt = dsd_checkpoint(tmp_path, chunks=3, files=2)
    md = FileSystemReader(ckpt).read_metadata()
    assert md.version == "1.0.0"
    assert [list(c.sizes) for c in md.state_dict_metadata["model.w"].chunks] == [[4, 3], [4, 3], [2, 3]]
    fresh = zeroed(state)
    dcp.load(fresh, checkpoint_id=ckpt)
    assert describe(fresh, layout=False) == describe(state, layout=False)
    # planner_data lets PyTorch rebuild the nesting without a template.
    loaded = _load_state_dict_from_keys(checkpoint_id=ckpt)
    assert without_layout(describe(loaded, layout=False)) == without_layout(describe(state, layout=False))
    # And dsd reads its own checkpoint back.
    assert without_layout(tool("dcp-read", ckpt)) == without_layout(describe(state, layout=False))


def test_dsd_written_dcp_checkpoint_reshards_in_pytorch_world4(tmp_path):
    state, ckpt = dsd_checkpoint(tmp_path, chunks=3, files=3)
    results = tmp_path / "results"
    results.mkdir()
    run_world4(dcp_workers.load_worker, str(tmp_path / "store"), str(ckpt), str(results))
    expected = dcp_workers.global_state()
    for rank in range(4):
        got = torch.load(results / f"rank{rank}.pt")
        assert describe(got, layout=False) == describe(expected, layout=False), rank
