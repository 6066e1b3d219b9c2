"""Conversions against the real PyTorch and safetensors of .venv: torch.save files both ways
(torch.load with its default weights_only=True accepts what dsd writes; dsd imports what
torch.save wrote: OrderedDict, every dtype, views sharing storage, nested dicts), consolidated
Hugging Face safetensors (load_file reads every shard, the index is right, the size cap holds,
import gives the state back), and dsd.convert between checkpoint formats, also from a sharded
DCP checkpoint written at world 4."""
import collections
import json
import warnings

import pytest
import safetensors.torch
import torch
import torch.distributed.checkpoint as dcp

import dcp_engine_workers as w
import dsd
import mp_util

warnings.simplefilter("ignore")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# Every dtype dsd stores.
DTYPES = [
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16,
    torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128,
    torch.float8_e4m3fn, torch.float8_e5m2, torch.uint16, torch.uint32, torch.uint64,
]


def sample_tensor(dtype, shape=(3, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_complex:
        return torch.randn(shape, generator=g, dtype=dtype)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    return torch.randint(0, 100, shape, generator=g).to(dtype)


def tensor_bytes(t):
    return bytes(t.detach().resolve_conj().resolve_neg().contiguous().reshape(-1).view(torch.uint8).numpy())


def assert_equal(got, want, where="root", ordered=True):
    """Same structure, types, values and tensor bytes. ordered=False ignores the order of dict
    keys (DCP does not keep it across ranks; safetensors files are laid out by dtype)."""
    if isinstance(want, dict):
        assert isinstance(got, dict), f"{where}: {type(got)}"
        if ordered:
            assert list(got) == list(want), f"{where}: {list(got)} vs {list(want)}"
        else:
            assert sorted(got) == sorted(want), f"{where}: {sorted(got)} vs {sorted(want)}"
        for k in want:
            assert_equal(got[k], want[k], f"{where}.{k}", ordered)
    elif isinstance(want, (list, tuple)):
        assert type(got) is type(want) and len(got) == len(want), f"{where}: {got!r} vs {want!r}"
        for i, (a, b) in enumerate(zip(got, want)):
            assert_equal(a, b, f"{where}.{i}", ordered)
    elif isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), f"{where}: {type(got)}"
        assert got.dtype == want.dtype and got.shape == want.shape, f"{where}: {got.dtype}{list(got.shape)}"
        assert tensor_bytes(got) == tensor_bytes(want), where
    else:
        assert type(got) is type(want) and got == want, f"{where}: {got!r} vs {want!r}"


def full_state():
    """A model + optimizer state with every dtype, nesting, int-keyed optimizer state and values."""
    model = collections.OrderedDict()
    for i, dtype in enumerate(DTYPES):
        model[f"layer{i}.{str(dtype).removeprefix('torch.')}"] = sample_tensor(dtype, seed=i)
    model["scalar"] = torch.tensor(2.5)
    model["empty"] = torch.empty(0, 3)
    return {
        "model": model,
        "optim": {
            "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(3, 4)}, 1: {"step": torch.tensor(1.0)}},
            "param_groups": [{"lr": 0.01, "betas": (0.9, 0.999), "params": [0, 1], "name": "g"}],
        },
        "epoch": 4,
        "tag": "run-1",
        "blob": b"\x00\xff",
    }


# ---- torch.save ---------------------------------------------------------------------------------


def test_import_a_torch_save_file(tmp_path):
    sd = collections.OrderedDict()
    for i, dtype in enumerate(DTYPES):
        sd[f"t.{str(dtype).removeprefix('torch.')}"] = sample_tensor(dtype, seed=i)
    base = torch.arange(24.0).reshape(4, 6)
    sd["view.base"] = base
    sd["view.row"] = base[1]
    sd["view.corner"] = base[2:, 3:]
    sd["view.t"] = base.t()
    sd["param"] = torch.nn.Parameter(torch.randn(3))
    sd["nested"] = {"a": {"b": torch.ones(2), "n": 3}, "l": [1, 2.5, "x", None, True], "tup": (1, 2)}
    sd["linear"] = torch.nn.Linear(2, 2).state_dict()
    torch.save(sd, tmp_path / "sd.pt")
    back = dsd.import_torch_save(tmp_path / "sd.pt")
    want = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in sd.items()}
    want["linear"] = dict(sd["linear"])
    assert_equal(back, want)
    # Views still share memory.
    assert back["view.row"].data_ptr() == back["view.base"].data_ptr() + 6 * 4
    assert back["view.corner"].stride() == (6, 1)


def test_import_refuses_what_it_must_not_run(tmp_path):
    class Evil:
        def __reduce__(self):
            import os
            return (os.system, ("true",))
    torch.save({"w": torch.zeros(1), "e": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(dsd.UnsupportedError, match="system"):
        dsd.import_torch_save(tmp_path / "evil.pt")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(dsd.UnsupportedError, match="not a state dict"):
        dsd.import_torch_save(tmp_path / "tensor.pt")


def test_export_torch_save_loads_with_weights_only(tmp_path):
    sd = full_state()
    dsd.export_torch_save(sd, tmp_path / "out.pt")
    back = torch.load(tmp_path / "out.pt")  # weights_only=True is the default
    assert type(back) is collections.OrderedDict
    assert_equal(dict(back), sd)
    with pytest.raises(dsd.Error) as e:
        dsd.export_torch_save(sd, tmp_path / "out.pt")
    assert e.value.code_name == "exists"
    dsd.export_torch_save({"x": torch.ones(1)}, tmp_path / "out.pt", overwrite=True)
    assert list(torch.load(tmp_path / "out.pt")) == ["x"]


def test_checkpoints_convert_to_torch_save_both_ways(tmp_path):
    sd = full_state()
    dsd.save(sd, tmp_path / "ck")
    dsd.convert(tmp_path / "ck", tmp_path / "ck.pt", "torch")
    assert_equal(dict(torch.load(tmp_path / "ck.pt")), sd)
    torch.save(sd, tmp_path / "in.pt")
    dsd.convert(tmp_path / "in.pt", tmp_path / "from_pt", "dsd")
    assert_equal(dsd.load_full(tmp_path / "from_pt"), sd)
    dsd.convert(tmp_path / "in.pt", tmp_path / "from_pt_dcp", "dcp")
    fresh = {"model": {k: torch.zeros_like(v) for k, v in sd["model"].items()},
             "optim": {"state": {0: {"step": torch.zeros(()), "exp_avg": torch.zeros(3, 4)},
                                 1: {"step": torch.zeros(())}},
                       "param_groups": [{"lr": None, "betas": None, "params": None, "name": None}]},
             "epoch": None, "tag": None, "blob": None}
    dcp.load(fresh, checkpoint_id=tmp_path / "from_pt_dcp", no_dist=True)
    assert_equal(fresh["model"], sd["model"])
    assert fresh["optim"]["param_groups"] == sd["optim"]["param_groups"] and fresh["blob"] == b"\x00\xff"


# ---- Hugging Face safetensors -----------------------------------------------------------------


def model_state(n=12):
    g = torch.Generator().manual_seed(3)
    return {f"layers.{i}.weight": torch.randn(16, 8 + i, generator=g) for i in range(n)} | \
        {"embed": torch.randn(32, 8, generator=g).to(torch.bfloat16), "step": torch.tensor(5)}


def test_export_safetensors_consolidated_and_capped(tmp_path):
    sd = model_state()
    cap = 2000
    dsd.export_safetensors(sd, tmp_path / "hf", max_shard_size=cap)
    files = sorted(p.name for p in (tmp_path / "hf").glob("*.safetensors"))
    n = len(files)
    assert n > 1 and files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in sd.values())
    assert sorted(index["weight_map"]) == sorted(sd)
    assert set(index["weight_map"].values()) == set(files)
    seen = {}
    for f in files:
        shard = safetensors.torch.load_file(tmp_path / "hf" / f)
        data = sum(t.nbytes for t in shard.values())
        assert data <= cap or len(shard) == 1, (f, data)  # only a tensor bigger than the cap stands alone
        for k, t in shard.items():
            assert index["weight_map"][k] == f
            seen[k] = t
    assert_equal({k: seen[k] for k in sd}, sd)
    assert_equal(dsd.import_safetensors(tmp_path / "hf"), sd)
    # One file when the cap allows it.
    dsd.export_safetensors(sd, tmp_path / "one")
    assert [p.name for p in (tmp_path / "one").glob("*.safetensors")] == ["model-00001-of-00001.safetensors"]
    # An existing export is not replaced without overwrite; with it, stale shards go.
    with pytest.raises(dsd.Error, match="pass overwrite"):
        dsd.export_safetensors(sd, tmp_path / "hf")
    dsd.export_safetensors(sd, tmp_path / "hf", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "hf").glob("*.safetensors")) == ["model-00001-of-00001.safetensors"]


def test_safetensors_keep_nesting_and_values_for_dsd(tmp_path):
    sd = full_state()
    with pytest.raises(dsd.UnsupportedError, match="'model.layer11.complex128' is complex128"):
        dsd.export_safetensors(sd, tmp_path / "c128")
    del sd["model"]["layer11.complex128"]
    dsd.export_safetensors(sd, tmp_path / "hf", max_shard_size=300)
    assert_equal(dsd.import_safetensors(tmp_path / "hf"), sd)
    # Other readers see flat keys and tensors only.
    flat = {}
    for f in (tmp_path / "hf").glob("*.safetensors"):
        flat |= safetensors.torch.load_file(f)
    assert torch.equal(flat["optim.state.0.exp_avg"], sd["optim"]["state"][0]["exp_avg"])
    assert "epoch" not in flat


def test_import_safetensors_written_by_the_library(tmp_path):
    sd = model_state(4)
    safetensors.torch.save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    assert dsd.detect_format(tmp_path / "model.safetensors") == "safetensors"
    assert_equal(dsd.import_safetensors(tmp_path / "model.safetensors"), sd, ordered=False)
    # A sharded directory with a hand-written index.
    d = tmp_path / "sharded"
    d.mkdir()
    keys = list(sd)
    parts = {"a.safetensors": keys[:2], "b.safetensors": keys[2:]}
    for name, ks in parts.items():
        safetensors.torch.save_file({k: sd[k] for k in ks}, d / name)
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 0}, "weight_map": {k: f for f, ks in parts.items() for k in ks}}))
    got = dsd.import_safetensors(d)
    assert sorted(got) == sorted(sd)
    assert_equal({k: got[k] for k in sd}, sd)
    # An index that names a tensor its file lacks is corrupt.
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["weight_map"]["ghost"] = "a.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(dsd.Error, match="ghost") as e:
        dsd.import_safetensors(d)
    assert e.value.code_name == "corrupt"


def test_sharded_dcp_checkpoint_consolidates_to_safetensors(tmp_path):
    ckpt = tmp_path / "ckpt"
    mp_util.spawn(w.dcp_save_worker, 4, 4, str(tmp_path / "store"), str(ckpt))
    dsd.convert(ckpt, tmp_path / "hf", "safetensors", max_shard_size=100)
    want = w.global_state()
    shards = {}
    for f in (tmp_path / "hf").glob("model-*.safetensors"):
        shards |= safetensors.torch.load_file(f)
    for k, v in want["model"].items():
        assert torch.equal(shards[f"model.{k}"], v), k
    # To torch.save and to a one-process dsd checkpoint, too.
    dsd.convert(ckpt, tmp_path / "full.pt", "torch")
    assert_equal(dict(torch.load(tmp_path / "full.pt")), want, ordered=False)
    dsd.convert(ckpt, tmp_path / "dsd", "dsd")
    assert_equal(dsd.load_full(tmp_path / "dsd"), want, ordered=False)
