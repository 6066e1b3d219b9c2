"""dsd's state dicts against PyTorch's own (torch.distributed.checkpoint.state_dict) on the same
models: equal key for key (in order) and bitwise, nested and flattened; loading into a fresh
model and optimizer then training one step gives bitwise the parameters the original gets.

Models are reference 4.1's CompositeParamModel and a TiedEmbeddingModel, plain, inside a real
DistributedDataParallel (world-1 Gloo group), with the real checkpoint_wrapper, and
torch.compile'd (backend="eager")."""
import copy
import os
import tempfile
import warnings

import pytest
import torch
import torch.distributed as dist
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
from torch.distributed.checkpoint import state_dict as ptd
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.testing._internal.common_dist_composable import CompositeParamModel, UnitModule
from torch.testing._internal.distributed.common_state_dict import (FusionEmbedding,
                                                                    FusionEmbeddingWithHook,
                                                                    FusionEmbeddingWithModifier)

import dsd


@pytest.fixture(scope="module", autouse=True)
def world_of_one():
    """DDP needs a process group; a world of one Gloo rank is a real one."""
    if not dist.is_initialized():
        path = os.path.join(tempfile.mkdtemp(), "store")
        dist.init_process_group("gloo", init_method=f"file://{path}", rank=0, world_size=1)
    yield


class TiedEmbeddingModel(torch.nn.Module):
    def __init__(self, vocab=500, dim=32):
        super().__init__()
        self.embedding = torch.nn.Embedding(vocab, dim)
        self.decoder = torch.nn.Linear(dim, vocab)
        self.decoder.weight = self.embedding.weight  # tied

    def forward(self, x):
        return self.decoder(self.embedding(x))


def make_model(name, wrapper):
    torch.manual_seed(0)
    if name == "composite":
        model = CompositeParamModel(torch.device("cpu"))
    else:
        model = TiedEmbeddingModel()
    if wrapper == "ddp":
        model = DDP(model)
    elif wrapper == "checkpoint":
        apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, (UnitModule, torch.nn.Linear)))
    elif wrapper == "compiled":
        model = torch.compile(model, backend="eager")
    return model


def batch(name):
    if name == "composite":
        return torch.randn(8, 100)
    return torch.randint(0, 500, (8, 4))


def make_optim(kind, model):
    if kind == "adam":
        return torch.optim.Adam(model.parameters(), lr=1e-4)
    if kind == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    return torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)


def train(model, optim, name, steps, seed=1):
    torch.manual_seed(seed)
    for _ in range(steps):
        model(batch(name)).mean().backward()
        optim.step()
        optim.zero_grad()


def assert_same(a, b, path="<root>"):
    """Equal key for key in the same order, types equal, tensors bitwise."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), f"{path}: tensor vs {type(b)}"
        assert a.dtype == b.dtype and a.shape == b.shape, f"{path}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"
        assert torch.equal(a.view(-1).view(torch.uint8) if a.numel() else a,
                           b.view(-1).view(torch.uint8) if b.numel() else b), f"{path}: bytes differ"
    elif isinstance(a, dict):
        assert isinstance(b, dict), f"{path}: dict vs {type(b)}"
        assert list(a.keys()) == list(b.keys()), f"{path}: keys {list(a.keys())} vs {list(b.keys())}"
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), f"{path}: {a!r} vs {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}.{i}")
    else:
        assert type(a) is type(b) and a == b, f"{path}: {a!r} vs {b!r}"


@pytest.mark.parametrize("optim_kind", ["adam", "adamw", "sgd"])
@pytest.mark.parametrize("wrapper", ["plain", "ddp", "checkpoint", "compiled"])
@pytest.mark.parametrize("name", ["composite", "tied"])
def test_state_dicts_match_pytorch_and_round_trip_bitwise(name, wrapper, optim_kind):
    model = make_model(name, wrapper)
    fresh = copy.deepcopy(model) if wrapper != "compiled" else make_model(name, wrapper)
    optim = make_optim(optim_kind, model)
    train(model, optim, name, steps=3)

    for flatten in (False, True):
        ours = dsd.get_state_dict(model, optim, options=dsd.StateDictOptions(flatten_optimizer_state_dict=flatten))
        theirs = ptd.get_state_dict(model, optim, options=ptd.StateDictOptions(flatten_optimizer_state_dict=flatten))
        assert_same(ours[0], theirs[0], "model")
        assert_same(ours[1], theirs[1], "optim")
        assert not any("_orig_mod" in k or "module." in k or "_checkpoint" in k for k in ours[0])

    msd, osd = dsd.get_state_dict(model, optim)
    msd = {k: v.clone() for k, v in msd.items()}  # a checkpoint, not aliases of the live model
    fresh_optim = make_optim(optim_kind, fresh)
    keys = dsd.set_state_dict(fresh, fresh_optim, model_state_dict=msd, optim_state_dict=osd)
    assert keys.missing_keys == [] and keys.unexpected_keys == []
    assert_same(fresh_optim.state_dict()["param_groups"], optim.state_dict()["param_groups"])

    train(model, optim, name, steps=1, seed=7)
    train(fresh, fresh_optim, name, steps=1, seed=7)
    for (n, a), (_, b) in zip(model.named_parameters(), fresh.named_parameters()):
        assert torch.isfinite(a).all(), f"{n} is not finite: the test trains too hard"
        assert_same(a.detach(), b.detach(), n)


def test_compiled_keys_do_not_change_after_a_set():
    # PyTorch #158519: _orig_mod-prefixed keys before a set, stripped keys after it.
    model = make_model("composite", "compiled")
    before = list(dsd.get_model_state_dict(model))
    dsd.set_model_state_dict(model, {k: v.clone() for k, v in dsd.get_model_state_dict(model).items()})
    assert list(dsd.get_model_state_dict(model)) == before
    assert before == list(ptd.get_model_state_dict(model))


@pytest.mark.parametrize("wrapper", ["plain", "ddp"])
def test_strict(wrapper):
    model = make_model("composite", wrapper)
    msd = dsd.get_model_state_dict(model)
    ref = ptd.get_model_state_dict(model)
    msd["abc"] = torch.zeros(10)
    ref["abc"] = torch.zeros(10)
    with pytest.raises(RuntimeError) as ours:
        dsd.set_model_state_dict(model, msd)
    with pytest.raises(RuntimeError) as theirs:
        ptd.set_model_state_dict(model, dict(ref))  # PyTorch renames keys in the dict it is given
    assert "Unexpected key" in str(ours.value)
    assert str(ours.value) == str(theirs.value)

    removed = "l.weight"
    del msd[removed], ref[removed]
    lax = dsd.set_model_state_dict(model, msd, options=dsd.StateDictOptions(strict=False))
    ref_lax = ptd.set_model_state_dict(model, dict(ref), options=ptd.StateDictOptions(strict=False))
    assert lax.missing_keys == list(ref_lax.missing_keys)
    assert lax.unexpected_keys == list(ref_lax.unexpected_keys) == ["abc"]

    del msd["abc"], ref["abc"]
    with pytest.raises(RuntimeError, match="Missing key") as ours:
        dsd.set_model_state_dict(model, msd)
    with pytest.raises(RuntimeError, match="Missing key") as theirs:
        ptd.set_model_state_dict(model, dict(ref))
    assert str(ours.value) == str(theirs.value)


def test_extra_state():
    model = CompositeParamModel(torch.device("cpu"))

    def get_extra_state(self):
        return "MyState"

    def set_extra_state(self, state):
        self.loaded = state

    UnitModule.get_extra_state = get_extra_state
    UnitModule.set_extra_state = set_extra_state
    try:
        msd = dsd.get_model_state_dict(model)
        assert msd["u1._extra_state"] == "MyState"
        assert_same(msd, ptd.get_model_state_dict(model))
        assert_same(msd, dict(model.state_dict()))
        msd["u1._extra_state"] = "Loaded"
        dsd.set_model_state_dict(model, msd)
        assert model.u1.loaded == "Loaded"
    finally:
        del UnitModule.get_extra_state, UnitModule.set_extra_state


def test_non_persistent_buffers():
    model = CompositeParamModel(torch.device("cpu"))
    model.register_buffer("dont_save_me", torch.rand(100, device="cpu"), persistent=False)
    msd = dsd.get_model_state_dict(model)
    assert "dont_save_me" not in msd
    assert_same(msd, dict(model.state_dict()))
    dsd.set_model_state_dict(model, msd)
    msd["dont_save_me"] = torch.zeros(100)
    assert dsd.set_model_state_dict(model, msd, options=dsd.StateDictOptions(strict=False)).unexpected_keys == [
        "dont_save_me"]


def test_optim_state_dict_param_matching():
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(4, 4, bias=False) for _ in range(2)])
    optim = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.optim.lr_scheduler.LambdaLR(optim, lr_lambda=[lambda epoch: 0.95 ** epoch])
    train_step = lambda m, o: (m(torch.randn(2, 4)).sum().backward(), o.step(), o.zero_grad())  # noqa: E731
    train_step(model, optim)
    osd = dsd.get_optimizer_state_dict(model, optim, options=dsd.StateDictOptions(full_state_dict=True, cpu_offload=True))
    assert "initial_lr" in osd["param_groups"][0]
    fresh = torch.optim.Adam(model.parameters(), lr=1e-2)
    assert "initial_lr" not in fresh.param_groups[0]
    dsd.set_optimizer_state_dict(model, fresh, osd, options=dsd.StateDictOptions(full_state_dict=True))
    assert fresh.param_groups[0]["initial_lr"] == osd["param_groups"][0]["initial_lr"]


@pytest.mark.parametrize("flatten_save", [False, True])
@pytest.mark.parametrize("flatten_load", [False, True])
def test_flattened_osd(flatten_save, flatten_load):
    model = make_model("composite", "plain")
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train(model, optim, "composite", 1)
    osd = dsd.get_optimizer_state_dict(model, optim,
                                       options=dsd.StateDictOptions(flatten_optimizer_state_dict=flatten_save))
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-3)
    dsd.set_optimizer_state_dict(model, fresh, osd,
                                 options=dsd.StateDictOptions(flatten_optimizer_state_dict=flatten_load))
    assert_same(fresh.state_dict(), optim.state_dict())


@pytest.mark.parametrize("config", ["two_groups", "empty_group"])
def test_multi_param_groups(config):
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"fc": torch.nn.Linear(8, 8), "fc1": torch.nn.Linear(8, 8)})
    if config == "two_groups":
        groups = [{"params": [model.fc.weight]}, {"params": [model.fc1.weight], "lr": 0.2}]
    else:
        groups = [{"params": [model.fc.weight, model.fc1.weight]}, {"params": [], "lr": 0.2}]
    optim = torch.optim.AdamW(groups, lr=0.1)
    model.fc1(model.fc(torch.randn(4, 8))).sum().backward()
    optim.step()
    optim.zero_grad()
    osd = dsd.get_optimizer_state_dict(model, optim)
    assert_same(osd, ptd.get_optimizer_state_dict(model, optim))
    new_groups = ([{"params": [model.fc.weight]}, {"params": [model.fc1.weight], "lr": 0.2}] if config == "two_groups"
                  else [{"params": [model.fc.weight, model.fc1.weight]}, {"params": [], "lr": 0.2}])
    fresh = torch.optim.AdamW(new_groups, lr=0.5)
    dsd.set_optimizer_state_dict(model, fresh, osd)
    assert_same(fresh.state_dict()["param_groups"], optim.state_dict()["param_groups"])
    assert_same(fresh.state_dict()["state"], optim.state_dict()["state"])


def test_deprecated_submodules_api():
    model = make_model("composite", "plain")
    with pytest.warns(FutureWarning, match="Getting submodules only model/optim state_dict is deprecated"):
        msd = dsd.get_model_state_dict(model, submodules={model.l})
    assert list(msd) == ["l.weight", "l.bias"]
    with pytest.warns(FutureWarning):
        stripped = dsd.get_model_state_dict(model, submodules={model.l},
                                            options=dsd.StateDictOptions(keep_submodule_prefixes=False))
    assert list(stripped) == ["weight", "bias"]
    assert torch.equal(stripped["weight"], msd["l.weight"])

    saved = {k: v.clone() for k, v in msd.items()}
    with torch.no_grad():
        model.l.weight.zero_()
    dsd.set_model_state_dict(model, saved, options=dsd.StateDictOptions(strict=False))
    assert torch.equal(model.l.weight, saved["l.weight"])

    with torch.no_grad():
        model.l.weight.zero_()
    with pytest.warns(FutureWarning, match="Passing model_state_dict as a "):
        dsd.set_model_state_dict(model, {model.l: {"weight": saved["l.weight"], "bias": saved["l.bias"]}},
                                 options=dsd.StateDictOptions(strict=False))
    assert torch.equal(model.l.weight, saved["l.weight"])


def test_fresh_optimizer_state_has_no_trace_of_a_step():
    # PyTorch #164929: the dummy step of _init_optim_state makes Adam's first real update use
    # step-2 bias correction. dsd's state starts at step 0 and training is unaffected.
    model = make_model("composite", "plain")
    untouched = copy.deepcopy(model)
    optim = torch.optim.Adam(model.parameters(), lr=1e-3)
    ref_optim = torch.optim.Adam(untouched.parameters(), lr=1e-3)
    osd = dsd.get_optimizer_state_dict(model, optim)
    assert osd["state"] and all(s["step"].item() == 0 for s in osd["state"].values())
    assert all(torch.count_nonzero(s["exp_avg"]) == 0 for s in osd["state"].values())
    train(model, optim, "composite", 1)
    train(untouched, ref_optim, "composite", 1)
    for a, b in zip(model.parameters(), untouched.parameters()):
        assert torch.equal(a, b)


def test_state_is_not_silently_empty_when_gradients_exist():
    # PyTorch #140898: with gradients present, _init_optim_state does nothing and the optimizer
    # state comes out empty.
    model = make_model("composite", "plain")
    optim = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(2, 100)).sum().backward()
    osd = dsd.get_optimizer_state_dict(model, optim)
    assert len(osd["state"]) == len(list(model.parameters()))
    assert all(p.grad is not None for p in model.parameters())  # gradients left as they were


def test_state_dict_keys_renamed_by_hooks():
    source = FusionEmbeddingWithHook(4, 4, 4)
    msd = dsd.get_model_state_dict(source)
    assert set(msd) == {"weight", "fusion_embedding.weight"}
    assert_same(msd, ptd.get_model_state_dict(source))
    with pytest.raises(RuntimeError, match="Missing key"):
        dsd.set_model_state_dict(FusionEmbedding(4, 4, 4), msd)
    target = FusionEmbeddingWithModifier(4, 4, 4)
    dsd.set_model_state_dict(target, msd)
    assert torch.equal(target.embedding.weight, source.embedding.weight)


def test_no_dist_full_cpu_offload_and_positional_passthrough():
    model = make_model("composite", "plain")
    optim = torch.optim.Adam(model.parameters(), lr=1e-3)
    train(model, optim, "composite", 1)
    msd = dsd.get_model_state_dict(model, options=dsd.StateDictOptions(full_state_dict=True, cpu_offload=True))
    assert_same(msd, dict(model.state_dict()))
    dsd.set_model_state_dict(model, model.state_dict())
    osd = dsd.get_optimizer_state_dict(model, optim, options=dsd.StateDictOptions(full_state_dict=True, cpu_offload=True))
    dsd.set_optimizer_state_dict(model, optim, osd)
    # PyTorch's raw optim.state_dict() (parameter ids) passes through.
    raw = copy.deepcopy(optim.state_dict())
    fresh = torch.optim.Adam(model.parameters(), lr=0.5)
    dsd.set_optimizer_state_dict(model, fresh, raw)
    assert_same(fresh.state_dict(), optim.state_dict())


def test_positional_fqn_remapping():
    model = make_model("composite", "plain")
    optim = torch.optim.Adam(model.parameters(), lr=1e-3)
    train(model, optim, "composite", 1)
    names = [n for n, _ in model.named_parameters()]
    fqn = dsd.optim_state_dict_to_fqn(optim.state_dict(), names)
    assert_same(fqn, ptd.get_optimizer_state_dict(model, optim))
    back = dsd.optim_state_dict_to_positional(fqn, names)
    assert_same(back, optim.state_dict())
    with pytest.raises(dsd.NotFoundError, match="has no name"):
        dsd.optim_state_dict_to_fqn(optim.state_dict(), names[:3])


def test_option_errors_match_pytorch():
    model = make_model("composite", "plain")
    optim = torch.optim.Adam(model.parameters())
    bad = dict(full_state_dict=False, broadcast_from_rank0=True)
    with pytest.raises(ValueError, match="full_state_dict must be True when broadcast_from_rank0 is True."):
        dsd.get_model_state_dict(model, options=dsd.StateDictOptions(**bad))
    with pytest.raises(RuntimeError, match="Optimizers are not passed in but optim_only is set to True."):
        dsd.get_optimizer_state_dict(model, [])
    with pytest.raises(RuntimeError, match="model state_dict is empty"):
        dsd.set_model_state_dict(model, {})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dsd.get_state_dict(model, optim)  # no FSDP deprecation warning leaks out
