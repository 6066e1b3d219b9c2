"""Expanding and oversized inputs (issue 16): pickles with memo fan-out ("billion laughs"
over lists, dicts, tuples: a few hundred bytes, 40 levels of 10 references), deep nesting,
huge declared lengths (BINUNICODE, BINUNICODE8, BINBYTES, LONG_BINPUT / LONG_BINGET), as a
torch.save file's data.pkl and as a DCP checkpoint's .metadata; safetensors headers and dsd
manifests (JSON) with the same shapes. `dsd inspect` must exit with the corrupt (4),
unsupported (7) or out-of-memory (9) code, an error line, within a second of a normal run,
its memory bounded (the pickle reader's limit on the expanded size is 4 Mi nodes and 256
MiB of text: core/formats/pickle.h)."""
from __future__ import annotations

import json
import os
import struct

import pytest
import torch

import dsd
from adv_util import CLI, EXIT_CORRUPT, EXIT_OOM, EXIT_UNSUPPORTED, run_measured

OK_CODES = {EXIT_CORRUPT, EXIT_UNSUPPORTED, EXIT_OOM}
LEVELS, FAN = 40, 10
RESULTS = []


def laughs(kind: str) -> bytes:
    """protocol 2: memo 0 = 'lol'; memo i = [memo i-1] * FAN (or a dict / tuple of them)."""
    out = bytearray(b"\x80\x02")
    out += b"X\x03\x00\x00\x00lol" + b"q\x00"
    for i in range(1, LEVELS + 1):
        out += b"("
        for j in range(FAN):
            if kind == "dict":
                out += b"K" + bytes([j])
            out += b"h" + bytes([i - 1])
        out += {"list": b"l", "dict": b"d", "tuple": b"t"}[kind]
        out += b"q" + bytes([i])
    return bytes(out) + b"."


def deep(n: int) -> bytes:
    """n nested lists: [[[...]]] built as n EMPTY_LISTs then n-1 APPENDs."""
    return b"\x80\x02" + b"]" * n + b"a" * (n - 1) + b"."


def huge(op: str) -> bytes:
    body = {
        "binunicode": b"X" + struct.pack("<I", 0xFFFFFFF0) + b"abc",
        "binunicode8": b"\x8d" + struct.pack("<Q", 1 << 62) + b"abc",
        "binbytes": b"B" + struct.pack("<I", 0xFFFFFFF0) + b"abc",
        "binbytes8": b"\x8e" + struct.pack("<Q", (1 << 64) - 1) + b"abc",
        "long_binput": b"K\x01r" + struct.pack("<I", 0xFFFFFFFF) + b"j" + struct.pack("<I", 0xFFFFFFFE),
        "frame": b"\x95" + struct.pack("<Q", 1 << 60) + b"K\x01",
        "marks": b"(" * 200000,
    }[op]
    return b"\x80\x04" + body + b"."


PICKLES = {f"laughs_{k}": laughs(k) for k in ("list", "dict", "tuple")}
PICKLES.update({"deep_100k": deep(100_000)})
PICKLES.update({f"huge_{k}": huge(k) for k in ("binunicode", "binunicode8", "binbytes", "binbytes8",
                                              "long_binput", "frame", "marks")})


def torch_file(tmp_path, name: str, pkl: bytes):
    """A torch.save archive whose data.pkl is `pkl` (the other records from a real save)."""
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(3)}, good)
    reader = torch._C.PyTorchFileReader(str(good))
    path = tmp_path / f"{name}.pt"
    writer = torch._C.PyTorchFileWriter(str(path))
    for rec in reader.get_all_records():
        data = pkl if rec == "data.pkl" else reader.get_record(rec)
        writer.write_record(rec, data, len(data))
    writer.write_end_of_file()
    return path


def dcp_dir(tmp_path, name: str, pkl: bytes):
    good = tmp_path / "good_dcp"
    if not good.exists():
        dsd.save({"w": torch.ones(3)}, str(good), format="dcp")
    path = tmp_path / name
    path.mkdir()
    for f in good.iterdir():
        (path / f.name).write_bytes(pkl if f.name == ".metadata" else f.read_bytes())
    return path


def check(label: str, path, baseline_s: float, max_rss_mib: float = 1024):
    rc, out, err, dt, rss = run_measured([CLI, "inspect", "-q", str(path)])
    RESULTS.append((label, rc, round(dt, 2)))
    print(f"[expanding] {label}: exit {rc} in {dt:.2f}s: {err.strip()[:160]}")
    assert rc in OK_CODES, f"{label}: exit {rc} (signal {-rc if rc < 0 else 0}):\n{err[-2000:]}"
    assert err.startswith("dsd: "), err
    assert dt < baseline_s + 1.0, f"{label}: {dt:.2f}s, a normal inspect takes {baseline_s:.2f}s"
    assert rss < max_rss_mib, f"{label}: {rss:.0f} MiB resident"


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("base")
    p = tmp / "ok.pt"
    torch.save({"w": torch.ones(3)}, p)
    best = min(run_measured([CLI, "inspect", "-q", str(p)])[3] for _ in range(2))
    print(f"[expanding] baseline inspect: {best:.2f}s")
    return best


@pytest.mark.parametrize("name", sorted(PICKLES))
def test_torch_save_data_pkl(tmp_path, baseline, name):
    assert len(PICKLES[name]) < 2000 or name in ("deep_100k", "huge_marks")
    check(f"torch.save data.pkl {name} ({len(PICKLES[name])} bytes)", torch_file(tmp_path, name, PICKLES[name]),
          baseline)


@pytest.mark.parametrize("name", sorted(PICKLES))
def test_dcp_metadata(tmp_path, baseline, name):
    path = dcp_dir(tmp_path, name, PICKLES[name])
    check(f"DCP .metadata {name}", path, baseline)
    with pytest.raises(dsd.Error) as e:
        dsd.load_full(str(path))
    assert e.value.code_name in ("corrupt", "unsupported", "out_of_memory"), e.value


def deep_json(n: int) -> str:
    return '{"a":' * n + "1" + "}" * n


def safetensors(tmp_path, name, header: bytes, declared=None, data=b""):
    path = tmp_path / f"{name}.safetensors"
    n = len(header) if declared is None else declared
    path.write_bytes(struct.pack("<Q", n) + header + data)
    return path


SAFETENSORS = {
    "declared_2^63": (b"{}", 1 << 63),
    "declared_past_end": (b"{}", 100 << 20),
    "deep_100k": (deep_json(100_000).encode(), None),
    "huge_offsets": (json.dumps({"w": {"dtype": "F32", "shape": [1 << 40, 1 << 40],
                                       "data_offsets": [0, (1 << 63)]}}).encode(), None),
    "many_keys": (json.dumps({f"k{i}": {"dtype": "F32", "shape": [1 << 30], "data_offsets": [0, 4 << 30]}
                              for i in range(20000)}).encode(), None),
    "long_string": (b'{"' + b"a" * (8 << 20) + b'":1}', None),
}


@pytest.mark.parametrize("name", sorted(SAFETENSORS))
def test_safetensors_header(tmp_path, baseline, name):
    header, declared = SAFETENSORS[name]
    check(f"safetensors {name}", safetensors(tmp_path, name, header, declared), baseline)


MANIFESTS = {
    "deep_100k": lambda m: deep_json(100_000),
    "huge_shape": lambda m: json.dumps(_with_shape(m, [1 << 40, 1 << 40])),
    "huge_file_size": lambda m: json.dumps(_with_file_size(m, 1 << 62)),
    "many_entries": lambda m: json.dumps({**m, "entries": [m["entries"][0]] * 20000}
                                         if isinstance(m.get("entries"), list) else {**m, "x": [[]] * 20000}),
}


def _with_shape(m, shape):
    s = json.dumps(m)
    return json.loads(s.replace('"shape": [3]', f'"shape": {json.dumps(shape)}'))


def _with_file_size(m, size):
    s = json.dumps(m)
    for f in m.get("files", []):
        if "size" in f:
            s = s.replace(f'"size": {f["size"]}', f'"size": {size}')
    return json.loads(s)


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_manifest(tmp_path, baseline, name):
    path = tmp_path / name
    dsd.save({"w": torch.ones(3)}, str(path))
    m = json.loads((path / "checkpoint.json").read_text())
    text = MANIFESTS[name](m)
    (path / "checkpoint.json").write_text(text)
    rc, out, err, dt, rss = run_measured([CLI, "verify", "-q", str(path)])
    print(f"[expanding] manifest {name}: verify exit {rc} in {dt:.2f}s: {err.strip()[:160]}")
    RESULTS.append((f"manifest {name}", rc, round(dt, 2)))
    # verify's "damage found" (1) is also an answer for a manifest that parses
    assert rc in OK_CODES | {1}, err
    assert dt < baseline + 1.0
    with pytest.raises(dsd.Error):
        dsd.load_full(str(path))


def test_zz_counts():
    print(f"[expanding] {len(RESULTS)} hostile inputs, exit codes: "
          f"{sorted({rc for _, rc, _ in RESULTS})}, slowest {max((t for *_, t in RESULTS), default=0)}s")
