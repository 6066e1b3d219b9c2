"""Hostile and inconsistent checkpoints (issue 15): a mutation table over a real small
checkpoint saved by dsd.save. Each row damages checkpoint.json or a data file one way; each
mutated checkpoint goes through every reader (dsd.load, dsd.load_full, `dsd verify`,
`dsd inspect`, `dsd convert`), each in its own process with a timeout, and every reader must
give the same error (corrupt) -- never a signal, never a hang, never data. The table and its
outcomes are printed at the end (run with -s)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import dsd

BUILD = os.environ.get("DSD_BUILD_DIR", os.path.join(os.path.dirname(__file__), "..", "..", "build"))
CLI = os.environ.get("DSD_CLI", os.path.join(BUILD, "tools", "dsd"))
TIMEOUT = 60
READERS = ["load", "load_full", "verify", "inspect", "convert"]


def saved_state():
    g = torch.Generator().manual_seed(15)
    return {"model": {"w": torch.randn(64, 32, generator=g), "b": torch.randn(3, generator=g)}, "step": 5}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile") / "ckpt"
    dsd.save(saved_state(), str(d), block_size=4096)  # model.w: two checksum blocks
    return d


def manifest(d):
    with open(d / "checkpoint.json") as f:
        return json.load(f)


def write_manifest(d, m):
    (d / "checkpoint.json").write_text(json.dumps(m, indent=1))


def entry(m, key):
    return next(e for e in m["entries"] if e["key"] == key)


def data_file(d):
    return d / manifest(d)["files"][0]["name"]


# ---- the mutations: each edits the copy `d` of the pristine checkpoint in place ----------------

def deep_nesting(d):
    m = manifest(d)
    entry(m, "step")["value"] = "@DEEP@"
    text = json.dumps(m, indent=1).replace('"@DEEP@"', "[" * 100_000 + "]" * 100_000)
    (d / "checkpoint.json").write_text(text)


def dtype_int32(d):
    m = manifest(d)
    entry(m, "model.w")["dtype"] = "int32"  # same size as the float32 stored
    write_manifest(d, m)


def path_collision(d):
    m = manifest(d)
    m["entries"].append({"key": "model", "path": ["model"], "kind": "value", "value": 5})
    write_manifest(d, m)


def key_path_disagree(d):
    m = manifest(d)
    entry(m, "model.w")["path"] = ["model", "x"]
    write_manifest(d, m)


def duplicate_member(d):
    text = (d / "checkpoint.json").read_text()
    assert '"dtype": "float32"' in text
    (d / "checkpoint.json").write_text(text.replace('"dtype": "float32"', '"dtype": "int32", "dtype": "float32"', 1))


def duplicate_root_member(d):
    text = (d / "checkpoint.json").read_text()
    (d / "checkpoint.json").write_text(text.replace("{", '{\n "world_size": 7,', 1))


def wrong_chunk_xxh3(d):
    m = manifest(d)
    c = entry(m, "model.w")["chunks"][0]
    c["xxh3"] = "%016x" % (int(c["xxh3"], 16) ^ 1)
    write_manifest(d, m)


def wrong_block_xxh3(d):
    m = manifest(d)
    c = entry(m, "model.w")["chunks"][0]
    c["blocks"][1] = "%016x" % (int(c["blocks"][1], 16) ^ 1)
    write_manifest(d, m)


def flipped_data_byte(d):
    m = manifest(d)
    c = entry(m, "model.b")["chunks"][0]
    f = d / c["file"]
    b = bytearray(f.read_bytes())
    b[c["begin"] + 1] ^= 0x40
    f.write_bytes(bytes(b))


def symlink_outside(d):
    f = data_file(d)
    outside = d.parent / (d.name + "_outside.safetensors")
    shutil.move(str(f), str(outside))
    os.symlink(outside, f)


def symlink_inside(d):
    f = data_file(d)
    inside = d / "copy.bin"
    shutil.move(str(f), str(inside))
    os.symlink("copy.bin", f)


def fifo_data_file(d):
    f = data_file(d)
    f.unlink()
    os.mkfifo(f)


def range_into_header(d):
    m = manifest(d)
    c = entry(m, "model.w")["chunks"][0]
    n = c["end"] - c["begin"]
    c["begin"], c["end"] = 0, n
    for e in m["entries"]:  # keep the ranges disjoint, so only the header check can object
        for o in e.get("chunks", []):
            if o is not c and o["begin"] < n:
                o["begin"], o["end"] = c["begin"] + 10**6, c["end"] + 10**6
    write_manifest(d, m)


def range_past_end(d):
    m = manifest(d)
    c = entry(m, "model.w")["chunks"][0]
    size = m["files"][0]["size"]
    c["begin"], c["end"] = size - 8, size - 8 + (c["end"] - c["begin"])
    write_manifest(d, m)


def range_shifted(d):
    m = manifest(d)
    w = entry(m, "model.w")["chunks"][0]
    b = entry(m, "model.b")["chunks"][0]
    nw, nb = w["end"] - w["begin"], b["end"] - b["begin"]
    lo = min(w["begin"], b["begin"])  # the two tensors' bytes, swapped: disjoint, in bounds
    b["begin"], b["end"] = lo, lo + nb
    w["begin"], w["end"] = lo + nb, lo + nb + nw
    write_manifest(d, m)


def shape_disagrees(d):
    m = manifest(d)
    e = entry(m, "model.w")
    e["shape"] = [32, 64]
    e["chunks"][0]["sizes"] = [32, 64]  # same numel and bytes: only the header disagrees
    write_manifest(d, m)


def truncated_data(d):
    f = data_file(d)
    b = f.read_bytes()
    f.write_bytes(b[:-4])


def file_size_lies(d):
    m = manifest(d)
    m["files"][0]["size"] += 100
    write_manifest(d, m)


def value_too_deep(d):
    m = manifest(d)
    v = 1
    for _ in range(70):
        v = [v]
    entry(m, "step")["value"] = v
    write_manifest(d, m)


def header_duplicate_name(d):
    # The data file's safetensors header names a __metadata__ member twice (same length, so
    # every offset stays right).
    f = data_file(d)
    b = bytearray(f.read_bytes())
    n = int.from_bytes(b[:8], "little")
    header = b[8:8 + n].decode()
    old = '"DCP_VERSION":"1.0"'
    assert old in header and '"format":' in header, header
    new = '"format":"' + "x" * (len(old) - len('"format":""')) + '"'
    assert len(new) == len(old)
    b[8:8 + n] = header.replace(old, new, 1).encode()
    f.write_bytes(bytes(b))


MUTATIONS = [
    ("100000-deep JSON nesting", deep_nesting),
    ("int32 declared for a float32 tensor", dtype_int32),
    ('["model"] path colliding with model.w', path_collision),
    ("key and path disagree", key_path_disagree),
    ("duplicate member names (entry)", duplicate_member),
    ("duplicate member names (root)", duplicate_root_member),
    ("wrong whole-chunk xxh3", wrong_chunk_xxh3),
    ("wrong block xxh3", wrong_block_xxh3),
    ("flipped data byte", flipped_data_byte),
    ("data file symlinked outside the dir", symlink_outside),
    ("data file symlinked inside the dir", symlink_inside),
    ("data file is a FIFO", fifo_data_file),
    ("byte range into the header", range_into_header),
    ("byte range past the end", range_past_end),
    ("byte ranges of two tensors swapped", range_shifted),
    ("shape disagrees with the header", shape_disagrees),
    ("data file truncated", truncated_data),
    ("file size in the manifest lies", file_size_lies),
    ("value nested 70 deep", value_too_deep),
    ("duplicate name in a safetensors header", header_duplicate_name),
]

DATA_ONLY = {wrong_chunk_xxh3, wrong_block_xxh3, flipped_data_byte}

# ---- the readers -----------------------------------------------------------------------------

PY_READER = textwrap.dedent("""
    import json, sys, torch, dsd
    reader, path = sys.argv[1], sys.argv[2]
    extra = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    try:
        if reader == "load":
            sd = {"model": {"w": torch.zeros(64, 32), "b": torch.zeros(3)}, "step": 0}
            dsd.load(sd, path, **extra)
        else:
            sd = dsd.load_full(path)
        out = {"outcome": "ok", "state": {"w": sd["model"]["w"].tolist(), "b": sd["model"]["b"].tolist(),
                                         "step": sd["step"]}}
    except dsd.Error as e:
        out = {"outcome": e.code_name, "message": str(e)}
    print("RESULT " + json.dumps(out))
""")

CLI_OUTCOME = {0: "ok", 1: "corrupt", 2: "usage", 3: "not_found", 4: "corrupt", 5: "io", 6: "exists",
               7: "unsupported", 8: "internal"}


def run_reader(reader, path, tmp, extra=None):
    """(outcome, detail): the error name, "ok", "SIGNAL <n>" or "HANG"."""
    if reader in ("load", "load_full"):
        cmd = [sys.executable, "-c", PY_READER, reader, str(path)] + ([json.dumps(extra)] if extra else [])
    else:
        flags = ["--allow-external-files"] if extra else []
        cmd = {"verify": [CLI, "-q", *flags, "verify", str(path)],
               "inspect": [CLI, *flags, "inspect", str(path)],
               "convert": [CLI, "-q", *flags, "convert", str(path), str(tmp / f"out_{reader}"), "--to",
                           "safetensors", "--overwrite"]}[reader]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        return "HANG", ""
    if p.returncode < 0:
        return f"SIGNAL {signal.Signals(-p.returncode).name}", p.stderr[-500:]
    if reader in ("load", "load_full"):
        line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
        if p.returncode != 0 or not line:
            return f"exit {p.returncode}", p.stderr[-500:]
        out = json.loads(line[-1][7:])
        return out["outcome"], out.get("message", out.get("state"))
    return CLI_OUTCOME.get(p.returncode, f"exit {p.returncode}"), (p.stderr + p.stdout)[-300:]


TABLE = []


def mutated(pristine, tmp_path, mutate):
    d = tmp_path / "ckpt"
    shutil.copytree(pristine, d)
    mutate(d)
    return d


def test_pristine_checkpoint_reads_back_everywhere(pristine, tmp_path):
    expect = saved_state()
    for reader in READERS:
        outcome, detail = run_reader(reader, pristine, tmp_path)
        assert outcome == "ok", (reader, detail)
        if reader in ("load", "load_full"):
            assert torch.equal(torch.tensor(detail["w"]), expect["model"]["w"])
            assert detail["step"] == 5


@pytest.mark.parametrize("name,mutate", MUTATIONS, ids=[m[1].__name__ for m in MUTATIONS])
def test_mutation_fails_the_same_in_every_reader(pristine, tmp_path, name, mutate):
    d = mutated(pristine, tmp_path, mutate)
    outcomes = {}
    for reader in READERS:
        outcomes[reader] = run_reader(reader, d, tmp_path)
    TABLE.append((name, {r: o for r, (o, _) in outcomes.items()}))
    for reader, (outcome, detail) in outcomes.items():
        # `dsd inspect` reads metadata, never tensor bytes: damage that only the bytes reveal
        # (checksums) is verify's and the loaders' to find.
        expect = "ok" if reader == "inspect" and mutate in DATA_ONLY else "corrupt"
        assert outcome == expect, f"{name}: {reader} gave {outcome}: {detail}"
    # The message names what is wrong: file or key, never a bare "corrupt".
    assert outcomes["load"][1] and ("model" in outcomes["load"][1] or ".safetensors" in outcomes["load"][1]
                                     or "checkpoint.json" in outcomes["load"][1]), outcomes["load"][1]


def test_symlinked_data_file_is_read_with_allow_external_files(pristine, tmp_path):
    d = mutated(pristine, tmp_path, symlink_outside)
    outcome, detail = run_reader("load", d, tmp_path, {"allow_external_files": True})
    assert outcome == "ok", detail
    assert torch.equal(torch.tensor(detail["w"]), saved_state()["model"]["w"])
    for reader in ("verify", "inspect", "convert"):
        outcome, detail = run_reader(reader, d, tmp_path, extra=True)
        assert outcome == "ok", (reader, detail)
    outcome, detail = run_reader("load", d, tmp_path)
    assert outcome == "corrupt" and "symbolic link" in detail, detail


def test_inspect_marks_an_invalid_checkpoint(pristine, tmp_path):
    d = mutated(pristine, tmp_path, dtype_int32)
    p = subprocess.run([CLI, "inspect", str(d)], capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode == 4, p.stderr
    assert "INVALID" in p.stdout and "[unvalidated] model.w" in p.stdout, p.stdout
    p = subprocess.run([CLI, "inspect", "--json", str(d)], capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode == 4
    out = json.loads(p.stdout)
    assert out["valid"] is False and "int32" in out["error"]
    assert [e["key"] for e in out["entries"]] == ["model.w", "model.b", "step"] or len(out["entries"]) == 3


def test_zz_print_table():
    """Prints the mutation table with its outcomes (meson test shows it in the log)."""
    width = max(len(n) for n, _ in TABLE) if TABLE else 10
    print()
    print("mutation".ljust(width), *[r.ljust(9) for r in READERS])
    for name, outcomes in TABLE:
        print(name.ljust(width), *[outcomes[r].ljust(9) for r in READERS])
    print(f"{len(TABLE)} mutations x {len(READERS)} readers: "
          f"{sum(all(o == 'corrupt' for o in oc.values()) for _, oc in TABLE)} rows rejected by every reader, "
          f"the others by every reader that reads tensor bytes (inspect reads none)")
