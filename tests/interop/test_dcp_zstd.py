"""PyTorch DCP checkpoints saved through DCP's ZStandard stream transform
(FileSystemWriter(..., _extensions=[ZStandard()]), which records "stream.zstd/1" in each
item's StorageInfo.transform_descriptors), read by dsd against the .venv's PyTorch:

- dsd.load into a state dict and dsd.load_full are bitwise equal to what was saved;
- dsd.convert to safetensors round-trips; dsd.verify and `dsd verify` pass;
- a flipped byte in a compressed item is dsd.CorruptError naming the file, and
  `dsd verify` reports it;
- an unknown transform descriptor is dsd.UnsupportedError naming it and the key.
"""
import os
import pickle
import subprocess
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load as load_safetensors
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint._extension import ZStandard

import dsd

warnings.simplefilter("ignore")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

DSD = os.path.join(os.environ.get("DSD_BUILD_DIR", "build"), "tools", "dsd")


def tensor_bytes(t):
    return bytes(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())


def state():
    g = torch.Generator().manual_seed(7)
    return {
        "w": torch.randn(256, 300, generator=g),                # several zstd blocks
        "zeros": torch.zeros(1000, dtype=torch.bfloat16),      # compresses to almost nothing
        "ids": torch.arange(77, dtype=torch.int64),
        "flag": torch.tensor([True, False, True]),
        "step": 12,
    }


def save_zstd(path, sd):
    dcp.save(sd, storage_writer=FileSystemWriter(str(path), _extensions=[ZStandard()]), no_dist=True)


def read_metadata(path):
    with open(path / ".metadata", "rb") as f:
        return pickle.load(f)


def storage_of(md, fqn):
    return [(mi, info) for mi, info in md.storage_data.items() if mi.fqn == fqn]


@pytest.fixture
def ckpt(tmp_path):
    path = tmp_path / "zstd"
    save_zstd(path, state())
    md = read_metadata(path)
    # The premise: every item really went through the transform (else this tests raw DCP).
    assert md.storage_data and all(i.transform_descriptors == ["stream.zstd/1"] for i in md.storage_data.values())
    return path


def assert_same(got, want):
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        if isinstance(v, torch.Tensor):
            assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
            assert tensor_bytes(got[k]) == tensor_bytes(v), k
        else:
            assert got[k] == v, k


def test_load_is_bitwise_equal(ckpt):
    want = state()
    sd = {k: torch.empty_like(v) if isinstance(v, torch.Tensor) else 0 for k, v in want.items()}
    dsd.load(sd, ckpt)
    assert_same(sd, want)
    assert_same(dsd.load_full(ckpt), want)


def test_torch_reads_it_back_too(ckpt):
    # The oracle agrees with itself: DCP's reader applies the transform named in the metadata.
    want = state()
    sd = {k: torch.empty_like(v) if isinstance(v, torch.Tensor) else 0 for k, v in want.items()}
    dcp.load(sd, checkpoint_id=str(ckpt), no_dist=True)
    assert_same(sd, want)


def test_convert_to_safetensors_round_trips(ckpt, tmp_path):
    out = tmp_path / "hf"  # a Hugging Face directory: shards and their index
    dsd.convert(str(ckpt), str(out), "safetensors")
    got = {}
    for shard in sorted(out.glob("*.safetensors")):
        got.update(load_safetensors(shard.read_bytes()))
    want = {k: v for k, v in state().items() if isinstance(v, torch.Tensor)}
    assert_same(got, want)
    back = tmp_path / "back"
    dsd.convert(str(out), str(back), "dsd")
    assert_same(dsd.load_full(back), state())  # the value rides in the index metadata


def test_verify_passes(ckpt):
    dsd.verify(ckpt)
    r = subprocess.run([DSD, "verify", str(ckpt)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


def flip_inside(path, info, at):
    file = path / info.relative_path
    data = bytearray(file.read_bytes())
    data[info.offset + at] ^= 0xFF
    file.write_bytes(bytes(data))


@pytest.mark.parametrize("where", ["frame header", "middle", "last block"])
def test_flipped_byte_in_compressed_item_is_corrupt(ckpt, where):
    md = read_metadata(ckpt)
    [(_, info)] = storage_of(md, "w")
    # In the middle, the flip lands in a raw block of random floats: zstd decodes it (DCP's
    # frames have no checksum), and only the archive's record CRC-32 catches it.
    at = {"frame header": 0, "middle": info.length // 2, "last block": info.length - 2}[where]
    flip_inside(ckpt, info, at)
    sd = {"w": torch.empty(256, 300)}
    with pytest.raises(dsd.CorruptError) as e:
        dsd.load(sd, ckpt, strict=False)
    assert info.relative_path in str(e.value)
    with pytest.raises(dsd.CorruptError) as e:
        dsd.verify(ckpt)
    assert info.relative_path in str(e.value)
    r = subprocess.run([DSD, "verify", str(ckpt)], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and info.relative_path in r.stdout + r.stderr


def test_truncated_item_is_corrupt(ckpt):
    md = read_metadata(ckpt)
    [(mi, info)] = storage_of(md, "w")
    info.length -= 100  # the frame now ends before its last block does
    with open(ckpt / ".metadata", "wb") as f:
        pickle.dump(md, f)
    with pytest.raises(dsd.CorruptError) as e:
        dsd.load({"w": torch.empty(256, 300)}, ckpt, strict=False)
    assert info.relative_path in str(e.value) and "truncated" in str(e.value)


@pytest.mark.parametrize("key", ["w", "step"])
def test_unknown_transform_is_unsupported(ckpt, key):
    md = read_metadata(ckpt)
    [(_, info)] = storage_of(md, key)
    info.transform_descriptors = ["stream.rot13/1"]
    with open(ckpt / ".metadata", "wb") as f:
        pickle.dump(md, f)
    sd = {key: torch.empty(256, 300) if key == "w" else 0}
    with pytest.raises(dsd.UnsupportedError) as e:
        dsd.load(sd, ckpt, strict=False)
    assert "stream.rot13/1" in str(e.value) and f"'{key}'" in str(e.value)


def test_a_newer_zstd_major_version_is_unsupported(ckpt):
    md = read_metadata(ckpt)
    [(_, info)] = storage_of(md, "ids")
    info.transform_descriptors = ["stream.zstd/2"]
    with open(ckpt / ".metadata", "wb") as f:
        pickle.dump(md, f)
    with pytest.raises(dsd.UnsupportedError) as e:
        dsd.load({"ids": torch.empty(77, dtype=torch.int64)}, ckpt, strict=False)
    assert "stream.zstd/2" in str(e.value)
