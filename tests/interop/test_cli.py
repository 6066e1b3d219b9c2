"""The dsd command (build/tools/dsd) on checkpoints written by PyTorch and by dsd: inspect
(table and JSON), verify (intact, damaged), convert between every pair of the four formats
with diff proving equality, diff on unequal inputs, progress output, exit codes and one-line
errors."""
import json
import os
import subprocess
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp

import dsd

warnings.simplefilter("ignore")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

DSD = os.path.join(os.environ.get("DSD_BUILD_DIR", "build"), "tools", "dsd")
FORMATS = ["dsd", "dcp", "torch", "safetensors"]


def run(*args):
    return subprocess.run([DSD, *map(str, args)], capture_output=True, text=True, timeout=300)


def ok(*args):
    p = run(*args)
    assert p.returncode == 0, p.stdout + p.stderr
    return p


def state():
    g = torch.Generator().manual_seed(11)
    return {
        "model": {"w": torch.randn(6, 4, generator=g), "b": torch.randn(4, generator=g).to(torch.bfloat16),
                  "ids": torch.arange(5, dtype=torch.int32), "mask": torch.tensor([True, False, True])},
        "optim": {"step": 3, "lr": 0.5, "betas": (0.9, 0.99), "name": "adam"},
    }


def write(fmt, path, sd):
    if fmt == "dsd":
        dsd.save(sd, path)
    elif fmt == "dcp":
        dcp.save(sd, checkpoint_id=path)
    elif fmt == "torch":
        torch.save(sd, path)
    else:
        dsd.export_safetensors(sd, path, max_shard_size=64)
    return path


@pytest.fixture
def sources(tmp_path):
    sd = state()
    return {fmt: write(fmt, tmp_path / f"src.{fmt}", sd) for fmt in FORMATS}


def test_inspect_table_and_json(tmp_path):
    sd = state()
    dcp.save(sd, checkpoint_id=tmp_path / "ck")
    out = ok("inspect", tmp_path / "ck").stdout
    assert "format:      dcp (PyTorch DCP checkpoint)" in out and "world size:  1" in out
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("model.", "optim."))}
    assert lines["model.w"][1:] == ["tensor", "float32", "[6,", "4]", "1", "96"]
    assert lines["model.b"][1:4] == ["tensor", "bfloat16", "[4]"]
    assert lines["optim.step"][1:] == ["value", "3"]
    j = json.loads(ok("inspect", "--json", tmp_path / "ck").stdout)
    assert j["format"] == "dcp" and j["world_size"] == 1 and j["tensors"] == 4 and j["values"] == 4
    entries = {e["key"]: e for e in j["entries"]}
    w = entries["model.w"]
    assert (w["kind"], w["dtype"], w["shape"], w["bytes"], w["path"]) == ("tensor", "float32", [6, 4], 96, ["model", "w"])
    assert w["chunks"][0]["offsets"] == [0, 0] and w["chunks"][0]["sizes"] == [6, 4]
    assert w["chunks"][0]["file"].endswith(".distcp")
    assert entries["optim.betas"]["value"] == {"tuple": [0.9, 0.99]}
    assert j["total_bytes"] == sum(t.nbytes for t in sd["model"].values())


def test_inspect_shows_the_save_world_size_and_chunks(tmp_path):
    import dcp_engine_workers as w
    import mp_util
    mp_util.spawn(w.dsd_save_worker, 2, 2, str(tmp_path / "store"), str(tmp_path / "ck"), "dsd")
    j = json.loads(ok("inspect", "--json", tmp_path / "ck").stdout)
    assert j["format"] == "dsd" and j["world_size"] == 2
    entries = {e["key"]: e for e in j["entries"]}
    assert [c["sizes"] for c in entries["model.w"]["chunks"]] == [[5, 3], [5, 3]]
    assert len(entries["model.rep"]["chunks"]) == 1
    assert "world size:  2" in ok("inspect", tmp_path / "ck").stdout


def test_verify_intact_and_damaged(tmp_path):
    sd = {"w": torch.arange(4096, dtype=torch.float32), "b": torch.ones(8)}
    dsd.save(sd, tmp_path / "ck")
    p = ok("verify", tmp_path / "ck")
    assert "intact" in p.stdout
    manifest = json.loads((tmp_path / "ck" / "checkpoint.json").read_text())
    chunk = next(e for e in manifest["entries"] if e["key"] == "w")["chunks"][0]
    data = tmp_path / "ck" / chunk["file"]
    raw = bytearray(data.read_bytes())
    raw[chunk["begin"] + 1000] ^= 0x40
    data.write_bytes(bytes(raw))
    p = run("verify", tmp_path / "ck")
    assert p.returncode == 1, p.stdout + p.stderr
    assert chunk["file"] in p.stdout and "'w'" in p.stdout
    assert p.stderr.startswith("dsd: ") and p.stderr.count("\n") == 1
    # Flipped bits in torch.save files and DCP items (written by PyTorch or by dsd) are caught
    # by the zip CRC-32 of their records, which torch.load itself never checks.
    w_bytes = sd["w"].numpy().tobytes()[4000:4032]

    def flip(path):
        raw = bytearray(path.read_bytes())
        at = raw.find(w_bytes)
        assert at > 0
        raw[at + 3] ^= 0x01
        path.write_bytes(bytes(raw))

    torch.save(sd, tmp_path / "sd.pt")
    ok("verify", tmp_path / "sd.pt")
    flip(tmp_path / "sd.pt")
    torch.load(tmp_path / "sd.pt")  # PyTorch does not notice
    p = run("verify", tmp_path / "sd.pt")
    assert p.returncode == 1 and "CRC-32 mismatch" in p.stdout and "(tensor w)" in p.stdout, p.stdout + p.stderr
    dcp.save(sd, checkpoint_id=tmp_path / "flip_pt")
    dsd.save(sd, tmp_path / "flip_dsd", format="dcp")
    for ck in (tmp_path / "flip_pt", tmp_path / "flip_dsd"):
        ok("verify", ck)
        data = next(f for f in ck.glob("*.distcp") if w_bytes in f.read_bytes())
        flip(data)
        p = run("verify", ck)
        assert p.returncode == 1, p.stdout + p.stderr
        assert p.stdout.startswith(f"{data.name}: w: CRC-32 mismatch"), p.stdout
    # A DCP checkpoint whose data file lost its tail.
    dcp.save(sd, checkpoint_id=tmp_path / "dcp")
    f = tmp_path / "dcp" / "__0_0.distcp"
    f.write_bytes(f.read_bytes()[:-5000])
    p = run("verify", tmp_path / "dcp")
    assert p.returncode == 1 and "__0_0.distcp" in p.stdout, p.stdout + p.stderr


@pytest.mark.parametrize("src", FORMATS)
def test_convert_between_every_pair_and_diff_proves_equality(tmp_path, sources, src):
    for to in FORMATS:
        dst = tmp_path / f"{src}_to_{to}"
        p = ok("convert", sources[src], dst, "--to", to)
        assert f"({src})" in p.stdout and f"({to})" in p.stdout
        assert dsd.detect_format(dst) == to
        p = ok("diff", sources[src], dst)
        assert p.stdout.startswith("equal:"), p.stdout
        for other in FORMATS:  # and against the same state written natively in every format
            ok("diff", dst, sources[other])


def test_diff_reports_every_kind_of_difference(tmp_path):
    a = state()
    b = state()
    b["model"]["w"][2, 1] += 1.0
    b["model"]["b"] = b["model"]["b"].float()
    b["model"]["ids"] = torch.arange(6, dtype=torch.int32)
    del b["model"]["mask"]
    b["model"]["extra"] = torch.zeros(1)
    b["optim"]["lr"] = 0.25
    dsd.save(a, tmp_path / "a")
    torch.save(b, tmp_path / "b.pt")
    p = run("diff", tmp_path / "a", tmp_path / "b.pt")
    assert p.returncode == 1, p.stdout + p.stderr
    out = p.stdout
    assert "only in A: model.mask" in out and "only in B: model.extra" in out
    assert "differs: model.w: first difference at [2, 1]:" in out
    assert "differs: model.b: dtype bfloat16 vs float32" in out
    assert "differs: model.ids: shape [5] vs [6]" in out
    assert "differs: optim.lr: values differ" in out


def test_progress_bar_and_quiet(tmp_path, sources):
    p = ok("--progress", "convert", sources["dsd"], tmp_path / "out.pt", "--to", "torch")
    assert "convert [" in p.stderr and "%" in p.stderr and "/s" in p.stderr
    p = ok("diff", sources["dsd"], tmp_path / "out.pt", "--progress")  # also after the subcommand
    assert "diff [" in p.stderr and "100%" in p.stderr
    p = ok("--quiet", "convert", sources["dsd"], tmp_path / "out2.pt", "--to", "torch")
    assert p.stderr == "" and p.stdout == ""
    p = ok("convert", sources["dsd"], tmp_path / "out3.pt", "--to", "torch")
    assert p.stderr == ""  # not a terminal, and fast


def test_exit_codes_and_one_line_errors(tmp_path, sources):
    def check(args, code, text):
        p = run(*args)
        assert p.returncode == code, (args, p.returncode, p.stdout, p.stderr)
        assert p.stderr.startswith("dsd: ") and p.stderr.count("\n") == 1, p.stderr
        assert text in p.stderr, p.stderr
    check(["inspect", tmp_path / "missing"], 3, "does not exist")
    (tmp_path / "empty").mkdir()
    check(["verify", tmp_path / "empty"], 3, "no checkpoint")
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    check(["inspect", tmp_path / "bad.safetensors"], 4, "bad.safetensors")
    (tmp_path / "junk.bin").write_bytes(b"hello world")
    check(["inspect", tmp_path / "junk.bin"], 7, "neither a torch.save file nor a safetensors file")
    cut = tmp_path / "cut"
    dsd.save(state(), cut)
    (cut / "checkpoint.json").write_text((cut / "checkpoint.json").read_text()[:50])
    check(["inspect", cut], 4, "checkpoint.json")
    check(["convert", sources["dsd"], sources["torch"], "--to", "torch"], 6, "already exists")
    check(["convert", sources["dsd"], tmp_path / "x", "--to", "zip"], 2, "unknown format 'zip'")
    check(["convert", sources["dsd"], tmp_path / "x"], 2, "--to is required")
    check(["frobnicate"], 2, "")
    check([], 2, "")
    check(["convert", sources["dsd"], tmp_path / "x", "--to", "safetensors", "--max-shard-size", "lots"], 2,
          "is not a size")
    p = ok("--help")
    assert "Exit codes:" in p.stdout and "3  not found" in p.stdout
