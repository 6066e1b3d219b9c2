"""State dicts of a CUDA model and its AdamW (plain, fused, foreach) against PyTorch's own
(torch.distributed.checkpoint.state_dict) on the same model: get bitwise and on the same
devices, tensors shared with the model; set into a fresh CUDA model and optimizer, then one more
step gives bitwise what the original gets; full_state_dict + cpu_offload from CUDA; host
(CPU) tensors set into CUDA parameters and optimizer state."""
import copy

import pytest
import torch
from torch.distributed.checkpoint import state_dict as ptd

import dsd
from gpu_util import REHEARSAL, assert_same, make_model, on_device, train, world_of_one


@pytest.fixture(scope="module", autouse=True)
def _world():
    world_of_one()


OPTIMS = {
    "adamw": dict(),
    "adamw_fused": dict(fused=True),
    "adamw_foreach": dict(foreach=True),
    "adamw_capturable": dict(capturable=True, foreach=True),
}
if REHEARSAL:  # CUDA-only AdamW variants
    del OPTIMS["adamw_capturable"]


def make(kind, seed=0, dtype=torch.float32):
    model = make_model(seed, dtype=dtype)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, **OPTIMS[kind])
    return model, optim


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", list(OPTIMS))
def test_get_matches_pytorch_and_set_round_trips(kind, dtype):
    model, optim = make(kind, dtype=dtype)
    train(model, optim, steps=2)
    for flatten in (False, True):
        ours = dsd.get_state_dict(model, optim, options=dsd.StateDictOptions(flatten_optimizer_state_dict=flatten))
        theirs = ptd.get_state_dict(model, optim, options=ptd.StateDictOptions(flatten_optimizer_state_dict=flatten))
        assert_same(ours[0], theirs[0], "model")
        assert_same(ours[1], theirs[1], "optim")
    msd, osd = dsd.get_state_dict(model, optim)
    params = dict(model.named_parameters())
    for k, v in msd.items():
        assert on_device(v), f"{k} left the GPU"
        if k in params:
            assert v.data_ptr() == params[k].data_ptr(), f"{k} was copied"

    # Into a fresh model and optimizer of the same kind: in place, then one more step each.
    fresh, fresh_optim = make(kind, seed=5, dtype=dtype)
    before = {k: p.data_ptr() for k, p in fresh.named_parameters()}
    msd = {k: v.clone() for k, v in msd.items()}
    keys = dsd.set_state_dict(fresh, fresh_optim, model_state_dict=msd, optim_state_dict=osd)
    assert keys.missing_keys == [] and keys.unexpected_keys == []
    assert {k: p.data_ptr() for k, p in fresh.named_parameters()} == before, "set replaced CUDA parameters"
    assert_same(fresh_optim.state_dict(), optim.state_dict(), "optim.state_dict()")
    train(model, optim, steps=1, seed=7)
    train(fresh, fresh_optim, steps=1, seed=7)
    for (n, a), (_, b) in zip(model.named_parameters(), fresh.named_parameters()):
        assert torch.isfinite(a.float()).all(), f"{n} is not finite"
        assert_same(a, b, n)


def test_set_matches_pytorch_set():
    model, optim = make("adamw")
    train(model, optim)
    msd, osd = ptd.get_state_dict(model, optim)
    msd = {k: v.clone() for k, v in msd.items()}
    ours_m, ours_o = make("adamw", seed=3)
    theirs_m, theirs_o = make("adamw", seed=3)
    dsd.set_state_dict(ours_m, ours_o, model_state_dict=msd, optim_state_dict=copy.deepcopy(osd))
    ptd.set_state_dict(theirs_m, theirs_o, model_state_dict=msd, optim_state_dict=copy.deepcopy(osd))
    assert_same(dict(ours_m.state_dict()), dict(theirs_m.state_dict()), "model")
    assert_same(ours_o.state_dict(), theirs_o.state_dict(), "optim")


@pytest.mark.parametrize("kind", ["adamw", "adamw_fused"])
def test_full_state_dict_with_cpu_offload_from_cuda(kind):
    model, optim = make(kind)
    train(model, optim)
    opts = dict(full_state_dict=True, cpu_offload=True)
    ours = dsd.get_state_dict(model, optim, options=dsd.StateDictOptions(**opts))
    theirs = ptd.get_state_dict(model, optim, options=ptd.StateDictOptions(**opts))
    assert_same(ours[0], theirs[0], "model")
    assert_same(ours[1], theirs[1], "optim")
    for k, v in ours[0].items():
        assert v.device.type == "cpu", f"{k} is on {v.device}, not offloaded"
    for fqn, state in ours[1]["state"].items():
        for name, v in state.items():
            if isinstance(v, torch.Tensor) and name != "step":
                assert v.device.type == "cpu", f"state.{fqn}.{name} is on {v.device}"
    if REHEARSAL:
        return  # on the CPU, offloading is no copy (in PyTorch too)
    # Offloaded copies, not views of the GPU tensors: changing the model leaves them alone.
    snapshot = {k: v.clone() for k, v in ours[0].items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1)
    assert_same(ours[0], snapshot, "offloaded model state dict")


def test_cpu_tensors_set_into_cuda_parameters_and_state():
    model, optim = make("adamw")
    train(model, optim)
    msd, osd = ptd.get_state_dict(model, optim, options=ptd.StateDictOptions(full_state_dict=True, cpu_offload=True))
    fresh, fresh_optim = make("adamw", seed=9)
    train(fresh, fresh_optim, steps=1, seed=3)  # state exists, on the GPU
    ptrs = {k: p.data_ptr() for k, p in fresh.named_parameters()}
    dsd.set_model_state_dict(fresh, msd)
    dsd.set_optimizer_state_dict(fresh, fresh_optim, osd)
    for k, p in fresh.named_parameters():
        assert on_device(p) and p.data_ptr() == ptrs[k], f"{k}: host tensor not copied into the CUDA parameter"
    assert_same(dict(fresh.state_dict()), dict(model.state_dict()), "model")
    # PyTorch's reference: the same set through torch DSD (Optimizer.load_state_dict moves the
    # state to each parameter's device).
    ref, ref_optim = make("adamw", seed=9)
    train(ref, ref_optim, steps=1, seed=3)
    ptd.set_model_state_dict(ref, msd)
    ptd.set_optimizer_state_dict(ref, ref_optim, osd)
    assert_same(fresh_optim.state_dict(), ref_optim.state_dict(), "optim")
    train(model, optim, steps=1, seed=11)
    train(fresh, fresh_optim, steps=1, seed=11)
    for (n, a), (_, b) in zip(model.named_parameters(), fresh.named_parameters()):
        assert_same(a, b, n)


def test_a_lazily_created_cuda_state_is_materialized_without_a_step():
    model, optim = make("adamw")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    msd, osd = dsd.get_state_dict(model, optim)  # no step taken yet: state is created lazily
    assert_same(dict(model.state_dict()), before, "model after materializing")
    assert sorted(osd["state"]) == sorted(dict(model.named_parameters()))  # state for every parameter
    for fqn, state in osd["state"].items():
        assert on_device(state["exp_avg"]) and not state["exp_avg"].any(), f"{fqn}: not a zero CUDA moment"
        assert float(state["step"]) == 0.0
