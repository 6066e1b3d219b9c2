"""Incremental checkpoints through the Python binding (ABI 1.2): dsd.save(base=...),
dsd.async_save(base=...), CheckpointManager(incremental=True) and its retention, dsd.gc,
dsd.convert(materialize=True).

The state is a fine-tuning one: nine frozen 1 MiB tensors and one small trained tensor. An
incremental step then owns the small tensor alone and references the frozen bytes of its
base, so each check below fails when the binding drops the option it passes (a full-size
step, a root holding one full checkpoint per step, a base that is still needed)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import dsd

MiB = 1 << 20


def frozen() -> dict:
    g = torch.Generator().manual_seed(7)
    return {f"w{i}": torch.randn(MiB // 4, generator=g) for i in range(9)}  # 9 x 1 MiB of float32


def state(step: int, base: dict | None = None) -> dict:
    """The state at `step`: the frozen tensors (shared with `base` when given) and a trained
    `head` whose values depend on the step."""
    return {"frozen": base["frozen"] if base else frozen(),
            "head": torch.full((8, 8), float(step)) + torch.arange(64.0).reshape(8, 8),
            "step": step}


def equal(a, b) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return a == b


def data_files(ckpt: Path) -> list[Path]:
    """The checkpoint's own data files (not the manifest)."""
    return sorted(f for f in ckpt.iterdir() if f.suffix == ".safetensors")


def own_bytes(ckpt: Path) -> int:
    return sum(f.stat().st_size for f in data_files(ckpt))


def tree_bytes(root: Path) -> int:
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())


def zeros_like(sd: dict) -> dict:
    return {k: zeros_like(v) if isinstance(v, dict) else torch.zeros_like(v) if isinstance(v, torch.Tensor)
            else 0 for k, v in sd.items()}


def manifest_files(ckpt: Path) -> list[dict]:
    with open(ckpt / "checkpoint.json", encoding="utf-8") as f:
        return json.load(f)["files"]


def test_a_save_with_base_writes_only_the_changed_chunks(tmp_path):
    sd1 = state(1)
    dsd.save(sd1, tmp_path / "step_1")
    sd2 = state(2, sd1)
    dsd.save(sd2, tmp_path / "step_2", base=tmp_path / "step_1")  # an os.PathLike base
    full = own_bytes(tmp_path / "step_1")
    assert full > 9 * MiB
    assert own_bytes(tmp_path / "step_2") < 0.2 * full, "the base was not used: step_2 is a full checkpoint"

    got = zeros_like(sd2)
    dsd.load(got, tmp_path / "step_2")
    assert equal(got, sd2)
    assert equal(dsd.load_full(str(tmp_path / "step_2")), sd2)
    dsd.verify(tmp_path / "step_2")

    info = dsd.inspect(str(tmp_path / "step_2"))
    assert info["format"] == "dsd" and set(info["entries"]) == {*(f"frozen.w{i}" for i in range(9)),
                                                                "head", "step"}
    assert info["referenced_bytes"] == {"step_1": 9 * MiB}
    assert info["owned_bytes"] == 64 * 4
    assert dsd.inspect(str(tmp_path / "step_1"))["referenced_bytes"] == {}

    # The manifest references the base's files by the base's directory name.
    referenced = {f["name"] for f in manifest_files(tmp_path / "step_2") if f.get("checkpoint") == "step_1"}
    assert referenced == {f.name for f in data_files(tmp_path / "step_1")}


def test_async_save_with_base(tmp_path):
    sd1 = state(1)
    dsd.save(sd1, tmp_path / "step_1")
    sd2 = state(2, sd1)
    dsd.async_save(sd2, str(tmp_path / "step_2"), base=str(tmp_path / "step_1")).result()
    assert own_bytes(tmp_path / "step_2") < 0.2 * own_bytes(tmp_path / "step_1")
    assert equal(dsd.load_full(str(tmp_path / "step_2")), sd2)
    with dsd.AsyncCheckpointer() as ac:
        sd3 = state(3, sd1)
        ac.save(sd3, tmp_path / "step_3", base=tmp_path / "step_2").result()
    assert own_bytes(tmp_path / "step_3") < 0.2 * own_bytes(tmp_path / "step_1")
    assert equal(dsd.load_full(str(tmp_path / "step_3")), sd3)


def test_a_lost_base_file_is_not_found_naming_it(tmp_path):
    sd1 = state(1)
    dsd.save(sd1, tmp_path / "step_1")
    dsd.save(state(2, sd1), tmp_path / "step_2", base=tmp_path / "step_1")
    lost = data_files(tmp_path / "step_1")
    for f in lost:
        f.unlink()
    with pytest.raises(dsd.NotFoundError) as e:
        dsd.load(zeros_like(sd1), tmp_path / "step_2")
    assert any(f.name in str(e.value) for f in lost), str(e.value)


def test_base_with_a_dcp_save_is_an_invalid_argument(tmp_path):
    sd1 = state(1)
    dsd.save(sd1, tmp_path / "step_1")
    with pytest.raises(dsd.InvalidArgumentError) as e:
        dsd.save(state(2, sd1), tmp_path / "step_2", format="dcp", base=tmp_path / "step_1")
    assert isinstance(e.value, ValueError)
    assert not (tmp_path / "step_2" / ".metadata").exists()


def test_base_that_holds_no_checkpoint_is_not_found(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(dsd.NotFoundError):
        dsd.save(state(1), tmp_path / "step_1", base=tmp_path / "empty")


def test_incremental_manager_keeps_what_kept_steps_reference(tmp_path):
    root = tmp_path / "root"
    sd1 = state(1)
    saved = {}
    with dsd.CheckpointManager(root, keep_last=2, incremental=True) as mgr:
        for step in range(1, 6):
            sd = state(step, sd1)
            saved[step] = sd
            if step % 2 == 0:  # the async path passes `incremental` too
                mgr.async_save(sd, step).result()
            else:
                mgr.save(sd, step)
        assert mgr.latest_step() == 5
        got = zeros_like(sd1)
        assert mgr.load_latest(got) == 5
        assert equal(got, saved[5])

    full = sum(t.numel() * 4 for t in sd1["frozen"].values())
    live = sorted(d.name for d in root.iterdir() if (d / "checkpoint.json").exists())
    assert live == ["step_4", "step_5"]
    for step in (4, 5):
        assert equal(dsd.load_full(str(root / f"step_{step}")), saved[step]), step
        assert own_bytes(root / f"step_{step}") < 0.2 * full, f"step_{step} was saved in full"
    assert tree_bytes(root) < 2.5 * full

    # step_1 is retired but kept, with its files: steps 4 and 5 reference its frozen bytes.
    assert (root / "step_1" / "checkpoint.retired.json").exists()
    assert not (root / "step_1" / "checkpoint.json").exists()
    assert own_bytes(root / "step_1") >= full
    with pytest.raises(dsd.NotFoundError):
        dsd.load_full(str(root / "step_1"))  # no checkpoint any more
    # Steps 2 and 3 are referenced by no kept step: gone.
    assert not (root / "step_2").exists() and not (root / "step_3").exists()

    # Retention already collected everything collectable.
    report = dsd.gc(root)
    assert isinstance(report, dsd.GcReport)
    assert report == dsd.GcReport(retired_removed=0, files_removed=0, bytes_removed=0)


def test_gc_removes_a_retired_step_no_longer_referenced(tmp_path):
    root = tmp_path / "root"
    sd1 = state(1)
    with dsd.CheckpointManager(root, keep_last=2, incremental=True) as mgr:
        for step in (1, 2, 3):
            mgr.save(state(step, sd1), step)
    assert (root / "step_1" / "checkpoint.retired.json").exists()
    step_1_bytes = own_bytes(root / "step_1")
    # Made standalone, steps 2 and 3 reference nothing: step_1 is garbage.
    for step in (2, 3):
        dsd.convert(str(root / f"step_{step}"), str(root / f"step_{step}"), to="dsd", materialize=True)
    report = dsd.gc(str(root))
    assert report.retired_removed == 1
    assert report.bytes_removed >= step_1_bytes
    assert report.files_removed >= 0
    assert not (root / "step_1").exists()
    for step in (2, 3):
        assert equal(dsd.load_full(str(root / f"step_{step}")), state(step, sd1))
    assert dsd.gc(root) == (0, 0, 0)
    with pytest.raises(dsd.NotFoundError):
        dsd.gc(tmp_path / "no_such_root")


def test_materialize_copies_the_base_files_in(tmp_path):
    sd1 = state(1)
    dsd.save(sd1, tmp_path / "step_1")
    sd2 = state(2, sd1)
    dsd.save(sd2, tmp_path / "step_2", base=tmp_path / "step_1")
    sd3 = state(3, sd1)
    dsd.save(sd3, tmp_path / "step_3", base=tmp_path / "step_2")
    names = {f["name"] for f in manifest_files(tmp_path / "step_3")}

    out = tmp_path / "standalone"
    dsd.convert(str(tmp_path / "step_3"), str(out), to="dsd", materialize=True)
    # Copied as it is: the same data files (own and referenced), none referenced any more.
    assert {f.name for f in data_files(out)} == names
    assert all("checkpoint" not in f for f in manifest_files(out))
    # In place, too.
    dsd.convert(str(tmp_path / "step_2"), str(tmp_path / "step_2"), to="dsd", materialize=True)
    assert all("checkpoint" not in f for f in manifest_files(tmp_path / "step_2"))

    shutil.rmtree(tmp_path / "step_1")
    with pytest.raises(dsd.NotFoundError):
        dsd.load_full(str(tmp_path / "step_3"))  # still needs step_1
    assert equal(dsd.load_full(str(out)), sd3)
    assert equal(dsd.load_full(str(tmp_path / "step_2")), sd2)
    dsd.verify(out)
    assert dsd.inspect(str(out))["referenced_bytes"] == {}


def test_materialize_takes_no_other_option(tmp_path):
    dsd.save(state(1), tmp_path / "step_1")
    with pytest.raises(dsd.InvalidArgumentError):
        dsd.convert(str(tmp_path / "step_1"), str(tmp_path / "out"), to="dsd", materialize=True,
                    select="frozen")
    assert not os.path.exists(tmp_path / "out")


def test_dequantize_writes_fp8_block_scaled_weights_as_bfloat16(tmp_path):
    """convert(dequantize=True): a float8 `X.weight` with its float32 `X.weight_scale_inv`
    (one scale per 128x128 block) becomes X * scale in bfloat16, without the scales."""
    torch.manual_seed(0)
    w = torch.randn(256, 128).clamp(-4, 4).to(torch.float8_e4m3fn)
    scale = torch.tensor([[0.5], [2.0]], dtype=torch.float32)  # 2 x 1 blocks
    dsd.export_safetensors({"layer.weight": w, "layer.weight_scale_inv": scale, "layer.bias": torch.ones(4)},
                           str(tmp_path / "fp8"))
    dsd.convert(str(tmp_path / "fp8"), str(tmp_path / "bf16"), to="safetensors", dequantize=True)
    got = dsd.import_safetensors(str(tmp_path / "bf16"))
    assert set(got) == {"layer.weight", "layer.bias"}
    expect = (w.to(torch.float32) * scale.repeat_interleave(128, 0)).to(torch.bfloat16)
    assert got["layer.weight"].dtype == torch.bfloat16
    assert torch.equal(got["layer.weight"], expect)
