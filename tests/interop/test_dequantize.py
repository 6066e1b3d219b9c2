"""FP8 block-scaled Hugging Face weights (DeepSeek-V3's kind): `dsd convert SRC OUT --to
safetensors --dequantize` writes every float8 `X.weight` times its `X.weight_scale_inv` (one
float32 factor per 128x128 block, edge blocks cut) in bfloat16, drops the scales and keeps the
rest; bitwise what PyTorch's own QuantizedHuggingFaceStorageReader gives through dcp.load of the
same directory (driven here on CPU, no process group). With --dtype float32 the product is
rounded once, to float32, as that reader with target_dtype=float32. An orphan scale or a scale
of the wrong shape is an error naming the tensor, and nothing is written."""
import json
import os
import subprocess
import warnings

import pytest
import safetensors.torch
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.quantized_hf_storage import QuantizedHuggingFaceStorageReader

warnings.simplefilter("ignore")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

DSD = os.path.join(os.environ.get("DSD_BUILD_DIR", "build"), "tools", "dsd")
INDEX = "model.safetensors.index.json"
EXIT_CORRUPT = 4

# Quantized weights of odd shapes: partial blocks on either edge, one row, one block.
QUANTIZED = {
    "model.layers.0.mlp.gate_proj.weight": (300, 200),
    "model.layers.0.self_attn.q_proj.weight": (129, 257),
    "model.layers.0.mlp.down_proj.weight": (1, 385),
    "lm_head.weight": (128, 128),
}


def run(*args):
    return subprocess.run([DSD, *map(str, args)], capture_output=True, text=True, timeout=300)


def bits_equal(a, b):
    """Equal bit for bit (NaN payloads included), dtypes and shapes too."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(width), b.contiguous().view(width))


def fp8_weight(shape, gen):
    w = (torch.randn(shape, generator=gen) * 64).to(torch.float8_e4m3fn)
    flat = w.view(torch.uint8).view(-1)
    # The corners of the format: +-0, the smallest subnormal, +-448 (the largest), NaN.
    special = torch.tensor([0x00, 0x80, 0x01, 0x7E, 0xFE, 0x7F], dtype=torch.uint8)
    n = min(len(special), flat.numel())
    flat[:n] = special[:n]
    return w


def write_checkpoint(path, tensors, files):
    """A Hugging Face directory: `files` maps each shard name to its keys; index written last."""
    path.mkdir(parents=True)
    weight_map = {}
    for name, keys in files.items():
        safetensors.torch.save_file({k: tensors[k] for k in keys}, path / name)
        weight_map.update({k: name for k in keys})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (path / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return path


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory):
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for key, (rows, cols) in QUANTIZED.items():
        tensors[key] = fp8_weight((rows, cols), gen)
        blocks = ((rows + 127) // 128, (cols + 127) // 128)
        # Factors far from 1, a different one per block.
        tensors[key + "_scale_inv"] = torch.rand(blocks, generator=gen) * 3 + 1e-3
    tensors["model.layers.0.input_layernorm.weight"] = torch.randn(200, generator=gen).to(torch.bfloat16)
    tensors["model.embed_tokens.weight"] = torch.randn(64, 200, generator=gen).to(torch.bfloat16)
    keys = list(tensors)
    # The scale of q_proj in another file than its weight, as sharded checkpoints have it.
    first = [k for k in keys if k.startswith("model.layers.0.") and k != "model.layers.0.self_attn.q_proj.weight"]
    files = {
        "model-00001-of-00002.safetensors": first,
        "model-00002-of-00002.safetensors": [k for k in keys if k not in first],
    }
    return write_checkpoint(tmp_path_factory.mktemp("fp8") / "src", tensors, files), tensors


def pytorch_dequantized(src, tensors, target_dtype):
    """What dcp.load through PyTorch's QuantizedHuggingFaceStorageReader gives: every tensor but
    the scales, the quantized ones in target_dtype, the others in target_dtype too if asked."""
    state = {}
    for k, t in tensors.items():
        if k.endswith("_scale_inv"):
            continue
        dtype = target_dtype if (k in QUANTIZED or target_dtype == torch.float32) else t.dtype
        state[k] = torch.empty(t.shape, dtype=dtype)
    reader = QuantizedHuggingFaceStorageReader(str(src), target_dtype=target_dtype)
    dcp.load(state, storage_reader=reader, no_dist=True)
    return state


def load_dir(out):
    index = json.loads((out / INDEX).read_text())
    got = {}
    for f in sorted(set(index["weight_map"].values())):
        got.update(safetensors.torch.load_file(out / f))
    assert set(got) == set(index["weight_map"])
    return got


def test_cli_dequantize_is_bitwise_pytorchs_reader(fp8_checkpoint, tmp_path):
    src, tensors = fp8_checkpoint
    out = tmp_path / "out"
    p = run("convert", src, out, "--to", "safetensors", "--dequantize")
    assert p.returncode == 0, p.stdout + p.stderr
    n = len(tensors) - len(QUANTIZED)
    assert f": {n} entries (of {len(tensors)})" in p.stdout, p.stdout

    got = load_dir(out)
    want = pytorch_dequantized(src, tensors, torch.bfloat16)
    # The scales are gone, every other key is there.
    assert set(got) == {k for k in tensors if not k.endswith("_scale_inv")} == set(want)
    for k in QUANTIZED:
        assert got[k].dtype == torch.bfloat16, k
        assert bits_equal(got[k], want[k]), k
        # The scales were applied: the plain cast differs.
        assert not bits_equal(got[k], tensors[k].to(torch.bfloat16)), k
        # And per block: PyTorch's product, element by element.
        rows, cols = got[k].shape
        scale = tensors[k + "_scale_inv"].repeat_interleave(128, 0).repeat_interleave(128, 1)[:rows, :cols]
        assert bits_equal(got[k], (tensors[k].float() * scale).to(torch.bfloat16)), k
    for k in ("model.layers.0.input_layernorm.weight", "model.embed_tokens.weight"):
        assert bits_equal(got[k], tensors[k]), k
        assert bits_equal(got[k], want[k]), k


def test_with_dtype_float32_the_product_is_rounded_once(fp8_checkpoint, tmp_path):
    src, tensors = fp8_checkpoint
    out = tmp_path / "out"
    p = run("convert", src, out, "--to", "safetensors", "--dequantize", "--dtype", "float32", "-q")
    assert p.returncode == 0, p.stderr
    got = load_dir(out)
    want = pytorch_dequantized(src, tensors, torch.float32)
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == torch.float32, k
        assert bits_equal(got[k], want[k]), k
    k = "model.layers.0.mlp.gate_proj.weight"
    assert not bits_equal(got[k], want[k].to(torch.bfloat16).float())


def test_without_dequantize_the_checkpoint_is_copied_as_is(fp8_checkpoint, tmp_path):
    src, tensors = fp8_checkpoint
    out = tmp_path / "out"
    p = run("convert", src, out, "--to", "safetensors", "-q")
    assert p.returncode == 0, p.stderr
    got = load_dir(out)
    assert set(got) == set(tensors)
    assert all(bits_equal(got[k], tensors[k]) for k in tensors)


def test_an_orphan_scale_is_an_error_naming_it(tmp_path):
    gen = torch.Generator().manual_seed(1)
    tensors = {
        "model.layers.0.mlp.up_proj.weight": fp8_weight((130, 64), gen),
        "model.layers.0.mlp.up_proj.weight_scale_inv": torch.rand(2, 1, generator=gen),
        "model.layers.1.mlp.up_proj.weight_scale_inv": torch.rand(2, 1, generator=gen),
    }
    src = write_checkpoint(tmp_path / "src", tensors, {"model.safetensors": list(tensors)})
    out = tmp_path / "out"
    p = run("convert", src, out, "--to", "safetensors", "--dequantize")
    assert p.returncode == EXIT_CORRUPT, p.stdout + p.stderr
    assert "'model.layers.1.mlp.up_proj.weight_scale_inv'" in p.stderr, p.stderr
    assert "'model.layers.1.mlp.up_proj.weight'" in p.stderr, p.stderr
    assert not out.exists()


def test_a_scale_of_the_wrong_shape_is_an_error_naming_it(tmp_path):
    gen = torch.Generator().manual_seed(2)
    tensors = {
        "model.layers.0.mlp.up_proj.weight": fp8_weight((130, 64), gen),
        "model.layers.0.mlp.up_proj.weight_scale_inv": torch.rand(1, 1, generator=gen),  # needs [2, 1]
    }
    src = write_checkpoint(tmp_path / "src", tensors, {"model.safetensors": list(tensors)})
    out = tmp_path / "out"
    p = run("convert", src, out, "--to", "safetensors", "--dequantize")
    assert p.returncode == EXIT_CORRUPT, p.stdout + p.stderr
    assert "'model.layers.0.mlp.up_proj.weight_scale_inv'" in p.stderr, p.stderr
    assert "[2, 1]" in p.stderr, p.stderr
    assert not out.exists()
