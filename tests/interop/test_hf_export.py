"""Publishing weights from a training checkpoint: `dsd convert CKPT OUT --to safetensors
--select model --strip-prefix --dtype bfloat16` and dsd.convert(..., select=, strip_prefix=,
dtype=) on a {"model", "optim", "step"} checkpoint of a tiny Llama (and GPT-2) trained one
AdamW step; Hugging Face transformers' from_pretrained loads the result into a model built
from the config, every parameter bitwise equal to torch's own .to(bfloat16) of the trained
one; the optimizer state and the step stay out; the size cap gives several shards and an
index. The cast rounds as torch does (ties, NaN, infinities, subnormals, overflow), applies
to floating tensors only, and reaches every target format. Bad requests are errors naming
the prefix, the file or the dtype."""
import json
import os
import subprocess
import warnings

import pytest
import safetensors.torch
import torch
import torch.distributed.checkpoint as dcp
import transformers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import dsd

warnings.simplefilter("ignore")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
transformers.logging.set_verbosity_error()

DSD = os.path.join(os.environ.get("DSD_BUILD_DIR", "build"), "tools", "dsd")
INDEX = "model.safetensors.index.json"


def run(*args):
    return subprocess.run([DSD, *map(str, args)], capture_output=True, text=True, timeout=300)


def llama_config():
    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=128, tie_word_embeddings=False)


def gpt2_config():
    return GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64, bos_token_id=0,
                      eos_token_id=0)


def trained(model_class, config, seed=0):
    """A model of `config` in float32 after one AdamW step, and its optimizer."""
    torch.manual_seed(seed)
    model = model_class(config).float()
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(seed))
    model(input_ids=ids, labels=ids).loss.backward()
    optim.step()
    return model, optim


def save_training_checkpoint(model, optim, path):
    dsd.save({"model": model.state_dict(), "optim": optim.state_dict(), "step": 7}, path)
    return path


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    model, optim = trained(LlamaForCausalLM, llama_config())
    ckpt = save_training_checkpoint(model, optim, tmp_path_factory.mktemp("llama") / "ckpt")
    return model, ckpt


def bits_equal(a, b):
    """Equal bit for bit (NaN payloads included), dtypes and shapes too."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(width), b.contiguous().view(width))


def load_hf(model_class, out, config):
    config.save_pretrained(out)
    # use_kernels=False: transformers 5 would otherwise ask for the `kernels` package.
    loaded, info = model_class.from_pretrained(out, dtype=torch.bfloat16, use_kernels=False,
                                               output_loading_info=True)
    return loaded, info


def check_loads_as_trained(model_class, config, model, out):
    # The files hold bfloat16 (from_pretrained would cast float32 weights itself).
    for f in shards_of(out)[1]:
        assert {t.dtype for t in safetensors.torch.load_file(out / f).values()} == {torch.bfloat16}, f
    loaded, info = load_hf(model_class, out, config)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    want = dict(model.named_parameters())
    got = dict(loaded.named_parameters())
    assert set(got) == set(want)
    for name, p in want.items():
        assert got[name].dtype == torch.bfloat16, name
        assert bits_equal(got[name].detach(), p.detach().to(torch.bfloat16)), name


def shards_of(out):
    index = json.loads((out / INDEX).read_text())
    files = sorted(set(index["weight_map"].values()))
    return index, files


# ---- the model of a training checkpoint, as Hugging Face weights --------------------------------


def test_cli_export_loads_with_from_pretrained(llama, tmp_path):
    model, ckpt = llama
    out = tmp_path / "hf"
    p = run("convert", ckpt, out, "--to", "safetensors", "--select", "model.", "--strip-prefix", "--dtype",
            "bfloat16", "--max-shard-size", "40KB")
    assert p.returncode == 0, p.stdout + p.stderr
    n = len(model.state_dict())
    assert f": {n} entries (of " in p.stdout, p.stdout

    index, files = shards_of(out)
    sd = model.state_dict()
    # Exactly the model's keys, as the model names them: no "model." of the checkpoint, no
    # "optim.*", no "step".
    assert set(index["weight_map"]) == set(sd)
    assert len(files) > 1, files
    assert sorted(f for f in os.listdir(out) if f.endswith(".safetensors")) == files
    total = 0
    for f in files:
        part = safetensors.torch.load_file(out / f)
        assert part and all(index["weight_map"][k] == f for k in part)
        size = sum(t.numel() * t.element_size() for t in part.values())
        assert size <= 40_000 or len(part) == 1, (f, size)
        total += size
    assert index["metadata"]["total_size"] == total == sum(t.numel() * 2 for t in sd.values())
    check_loads_as_trained(LlamaForCausalLM, llama_config(), model, out)


def test_python_export_loads_with_from_pretrained_and_equals_the_cli(llama, tmp_path):
    model, ckpt = llama
    by_py = tmp_path / "py"
    dsd.convert(ckpt, by_py, "safetensors", select="model", strip_prefix=True, dtype=torch.bfloat16,
                max_shard_size=50_000)
    check_loads_as_trained(LlamaForCausalLM, llama_config(), model, by_py)

    by_name = tmp_path / "by_name"
    dsd.convert(str(ckpt), str(by_name), "safetensors", select="model", strip_prefix=True, dtype="torch.bfloat16",
                max_shard_size=50_000)
    by_cli = tmp_path / "cli"
    p = run("convert", ckpt, by_cli, "--to", "safetensors", "--select", "model", "--strip-prefix", "--dtype",
            "bfloat16", "--max-shard-size", "50000", "-q")
    assert p.returncode == 0, p.stderr
    for other in (by_name, by_cli):
        assert shards_of(other) == shards_of(by_py)
        for f in shards_of(by_py)[1]:
            a, b = safetensors.torch.load_file(by_py / f), safetensors.torch.load_file(other / f)
            assert a.keys() == b.keys() and all(bits_equal(a[k], b[k]) for k in a)


def test_export_of_an_in_memory_training_state_loads_with_from_pretrained(llama, tmp_path):
    # dsd.export_safetensors / export_torch_save take the same options as dsd.convert.
    model, _ = llama
    state = {"model": model.state_dict(), "step": 7}
    out = tmp_path / "mem"
    dsd.export_safetensors(state, str(out), select="model", strip_prefix=True, dtype=torch.bfloat16,
                           max_shard_size=50_000)
    check_loads_as_trained(LlamaForCausalLM, llama_config(), model, out)
    pt = tmp_path / "model.pt"
    dsd.export_torch_save(state, str(pt), select="model.", strip_prefix=True, dtype="bfloat16")
    loaded = torch.load(pt, weights_only=True)
    assert list(loaded) == list(model.state_dict())
    for k, v in model.state_dict().items():
        assert bits_equal(loaded[k], v.to(torch.bfloat16)), k


def test_from_a_pytorch_dcp_checkpoint(tmp_path):
    """A checkpoint that PyTorch DCP wrote (torchtitan's kind), exported the same way."""
    model, _ = trained(LlamaForCausalLM, llama_config(), seed=1)
    ckpt = tmp_path / "dcp"
    dcp.save({"model": model.state_dict(), "step": 7}, checkpoint_id=ckpt)
    out = tmp_path / "hf"
    dsd.convert(ckpt, out, "safetensors", select="model", strip_prefix=True, dtype="bfloat16")
    assert set(shards_of(out)[0]["weight_map"]) == set(model.state_dict())
    check_loads_as_trained(LlamaForCausalLM, llama_config(), model, out)


def test_gpt2_with_tied_embeddings(tmp_path):
    config = gpt2_config()
    model, optim = trained(GPT2LMHeadModel, config)
    ckpt = save_training_checkpoint(model, optim, tmp_path / "ckpt")
    out = tmp_path / "hf"
    p = run("convert", ckpt, out, "--to", "safetensors", "--select", "model", "--strip-prefix", "--dtype",
            "bfloat16", "--max-shard-size", "30KB", "-q")
    assert p.returncode == 0, p.stderr
    assert set(shards_of(out)[0]["weight_map"]) == set(model.state_dict())
    assert len(shards_of(out)[1]) > 1
    check_loads_as_trained(GPT2LMHeadModel, config, model, out)


def test_without_strip_keeps_the_prefix_and_without_dtype_the_dtype(llama, tmp_path):
    model, ckpt = llama
    out = tmp_path / "hf"
    dsd.convert(ckpt, out, "safetensors", select="model")
    got = {}
    for f in shards_of(out)[1]:
        got.update(safetensors.torch.load_file(out / f))
    assert set(got) == {"model." + k for k in model.state_dict()}
    for k, t in model.state_dict().items():
        assert bits_equal(got["model." + k], t), k

    # The optimizer alone: its nested state (int-keyed) comes back as torch wrote it.
    opt_out = tmp_path / "optim.pt"
    dsd.convert(ckpt, opt_out, "torch", select="optim", strip_prefix=True)
    back = torch.load(opt_out)
    assert set(back) == {"state", "param_groups"}
    assert set(back["state"]) == set(range(len(list(model.parameters()))))
    assert back["param_groups"][0]["lr"] == 1e-2


# ---- the cast ------------------------------------------------------------------------------------


def special_floats():
    """float32 values whose bfloat16 / float16 rounding is decided by the last bit: ties to even
    both ways, just above and below ties, NaNs (quiet, signalling, with payloads), infinities,
    subnormals, the largest finite value (overflows to inf), signed zeros, plus random ones."""
    patterns = [0x3F808000, 0x3F818000, 0x3F808001, 0x3F807FFF, 0x7FC00000, 0x7F800001, 0xFFC12345,
                0x7F800000, 0xFF800000, 0x00000001, 0x00008000, 0x80018000, 0x7F7FFFFF, 0x7F7F8000,
                0x00000000, 0x80000000, 0x477FF000, 0x477FE000, 0x33800000, 0x33000001]
    special = torch.tensor(patterns, dtype=torch.int64).to(torch.int32).view(torch.float32)
    g = torch.Generator().manual_seed(3)
    return torch.cat([special, torch.randn(4096, generator=g) * 1000, torch.randn(4096, generator=g) * 1e-38])


@pytest.mark.parametrize("target", [torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.float32])
def test_cast_is_torchs_and_touches_only_floating_tensors(tmp_path, target):
    x = special_floats()
    sd = {"model": {"f32": x, "f64": x.double() * 1.0000001, "f16": x.to(torch.float16),
                    "bf16": x.to(torch.bfloat16), "ids": torch.arange(-3, 7, dtype=torch.int64),
                    "u8": torch.arange(0, 250, 7, dtype=torch.uint8),
                    "mask": torch.tensor([True, False, True]), "c64": torch.randn(5, dtype=torch.complex64),
                    "scalar": torch.tensor(2.5), "empty": torch.empty(0, 3)},
          "step": 7}
    ckpt = tmp_path / "ckpt"
    dsd.save(sd, ckpt)
    out = tmp_path / "hf"
    p = run("convert", ckpt, out, "--to", "safetensors", "--select", "model", "--strip-prefix", "--dtype",
            str(target).removeprefix("torch."), "-q")
    assert p.returncode == 0, p.stderr
    got = safetensors.torch.load_file(out / shards_of(out)[1][0])
    assert set(got) == set(sd["model"])
    for k, t in sd["model"].items():
        want = t.to(target) if t.dtype.is_floating_point else t
        assert bits_equal(got[k], want), (k, target)


def test_cast_reaches_every_target_format(llama, tmp_path):
    model, ckpt = llama
    want = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}

    pt = tmp_path / "model.pt"
    dsd.convert(ckpt, pt, "torch", select="model", strip_prefix=True, dtype=torch.bfloat16)
    back = torch.load(pt)
    assert back.keys() == want.keys() and all(bits_equal(back[k], want[k]) for k in want)

    for fmt in ("dsd", "dcp"):
        out = tmp_path / fmt
        dsd.convert(ckpt, out, fmt, select="model", strip_prefix=True, dtype=torch.bfloat16)
        assert dsd.detect_format(out) == fmt
        target = {k: torch.zeros_like(v) for k, v in want.items()}
        dcp.load(target, checkpoint_id=out) if fmt == "dcp" else dsd.load(target, out)
        assert all(bits_equal(target[k], want[k]) for k in want), fmt

    # A safetensors source (an earlier export) exported again: the strip works on flat keys too.
    hf = tmp_path / "hf"
    dsd.convert(ckpt, hf, "safetensors", select="model")
    again = tmp_path / "again"
    dsd.convert(hf, again, "safetensors", select="model.model.layers", strip_prefix=True, dtype="float16")
    got = safetensors.torch.load_file(again / shards_of(again)[1][0])
    layers = {k.removeprefix("model.layers."): v for k, v in model.state_dict().items()
              if k.startswith("model.layers.")}
    assert got.keys() == layers.keys()
    assert all(bits_equal(got[k], v.to(torch.float16)) for k, v in layers.items())


# ---- errors --------------------------------------------------------------------------------------


def test_select_matching_nothing_names_the_prefix_and_the_file(llama, tmp_path):
    _, ckpt = llama
    with pytest.raises(dsd.NotFoundError) as e:
        dsd.convert(ckpt, tmp_path / "hf", "safetensors", select="modle", strip_prefix=True)
    assert "'modle'" in str(e.value) and str(ckpt) in str(e.value)
    # "mod" is a prefix of "model" as a string, not as a key path.
    with pytest.raises(dsd.NotFoundError, match="'mod'"):
        dsd.convert(ckpt, tmp_path / "hf", "safetensors", select="mod")
    assert not (tmp_path / "hf" / INDEX).exists()
    p = run("convert", ckpt, tmp_path / "hf", "--to", "safetensors", "--select", "modle")
    assert p.returncode == 3 and "'modle'" in p.stderr and str(ckpt) in p.stderr, p.stderr
    assert p.stderr.count("\n") == 1


def test_bad_requests_are_invalid_arguments(llama, tmp_path):
    _, ckpt = llama
    out = tmp_path / "hf"
    with pytest.raises(dsd.InvalidArgumentError, match="strip_prefix needs a select"):
        dsd.convert(ckpt, out, "safetensors", strip_prefix=True)
    with pytest.raises(dsd.InvalidArgumentError, match="int32"):
        dsd.convert(ckpt, out, "safetensors", select="model", dtype=torch.int32)
    with pytest.raises(dsd.InvalidArgumentError, match="cannot cast to bool"):
        dsd.convert(ckpt, out, "safetensors", dtype="bool")
    with pytest.raises(dsd.InvalidArgumentError, match="'step'.*empty key"):
        dsd.convert(ckpt, out, "torch", select="step", strip_prefix=True)
    with pytest.raises(ValueError, match="unknown dtype 'bf17'"):
        dsd.convert(ckpt, out, "safetensors", dtype="bf17")
    with pytest.raises(TypeError, match="dtype"):
        dsd.convert(ckpt, out, "safetensors", dtype=16)
    assert not out.exists()

    # The same through the command: usage errors (exit 2), one line each.
    for args, needle in [(["--strip-prefix"], "--select"), (["--dtype", "int64"], "int64"),
                         (["--dtype", "bf17"], "bf17"), (["--select", "step", "--strip-prefix"], "empty key")]:
        p = run("convert", ckpt, out, "--to", "safetensors", *args)
        assert p.returncode == 2 and needle in p.stderr, (args, p.stderr)
    assert not out.exists()

    # Selecting one value alone (no strip) is fine: "step" and nothing else.
    dsd.convert(ckpt, tmp_path / "step.pt", "torch", select="step")
    assert torch.load(tmp_path / "step.pt") == {"step": 7}


def test_help_documents_the_options():
    p = run("convert", "--help")
    assert p.returncode == 0
    for needle in ("--select", "--strip-prefix", "--dtype", "--max-shard-size", "bfloat16",
                   "--select model --strip-prefix --dtype bfloat16"):
        assert needle in p.stdout, needle
