"""Distributed state dicts against PyTorch's own, in the same processes (reference 4.3).

Run on N ranks (tools/dsdrun -n N python statedict_oracle.py [scenario...]). Each scenario
shards the same model with PyTorch (fully_shard, HSDP on a 2-d mesh, tensor parallelism) and
requires dsd's sharded and full model and optimizer state dicts to equal, key for key and
bitwise, what torch.distributed.checkpoint.state_dict returns; and full / broadcast loads
through dsd to leave every rank's shards as PyTorch's loads leave them. Every rank runs the
scenarios in the same order; any failure raises and the launcher fails the job.
"""
import copy
import datetime
import os
import sys
import traceback

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import state_dict as ptd
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torch.testing._internal.common_dist_composable import CompositeParamModel, UnitModule

import dsd

RANK = WORLD = 0


def log(msg):
    if RANK == 0:
        print(msg, flush=True)


def same(a, b, path="<root>", loose=False):
    """Equal key for key (in order), types equal, tensors bitwise; DTensors by placements,
    mesh, global shape and local bytes. `loose`: a list equals a tuple of equal items (after a
    full or broadcast load PyTorch turns hyperparameter tuples such as Adam's betas into lists,
    because its _flatten_state_dict round trip drops tuple-ness; dsd keeps the tuple)."""
    if isinstance(a, DTensor):
        assert isinstance(b, DTensor), f"{path}: DTensor vs {type(b)}"
        assert a.placements == b.placements, f"{path}: {a.placements} vs {b.placements}"
        assert a.device_mesh.mesh.tolist() == b.device_mesh.mesh.tolist(), f"{path}: meshes differ"
        assert a.shape == b.shape, f"{path}: {a.shape} vs {b.shape}"
        same(a.to_local(), b.to_local(), path + "<local>", loose)
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and not isinstance(b, DTensor), f"{path}: tensor vs {type(b)}"
        assert a.dtype == b.dtype and a.shape == b.shape, f"{path}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"
        assert a.device == b.device, f"{path}: {a.device} vs {b.device}"
        x, y = a.detach().contiguous().view(-1), b.detach().contiguous().view(-1)
        assert torch.equal(x.view(torch.uint8), y.view(torch.uint8)), f"{path}: bytes differ"
    elif isinstance(a, dict):
        assert isinstance(b, dict), f"{path}: dict vs {type(b)}"
        assert list(a) == list(b), f"{path}: keys {list(a)} vs {list(b)}"
        for k in a:
            same(a[k], b[k], f"{path}.{k}", loose)
    elif isinstance(a, (list, tuple)):
        assert (type(a) is type(b) or (loose and isinstance(b, (list, tuple)))) and len(a) == len(b), \
            f"{path}: {a!r} vs {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{path}.{i}", loose)
    else:
        assert type(a) is type(b) and a == b, f"{path}: {a!r} vs {b!r}"


def clone(v):
    """A copy that no longer aliases the model (a checkpoint), DTensors staying DTensors."""
    if isinstance(v, DTensor):
        return DTensor.from_local(v.to_local().clone(), v.device_mesh, v.placements, shape=v.shape, stride=v.stride())
    return v.clone()


def params_equal(m1, m2):
    for (n, a), (_, b) in zip(m1.named_parameters(), m2.named_parameters()):
        same(a.detach(), b.detach(), n)


def cpu_mesh(shape):
    return init_device_mesh("cpu", shape)


def fsdp_model(seed=0, mesh=None):
    torch.manual_seed(seed)
    model = CompositeParamModel(torch.device("cpu"))
    mesh = mesh or cpu_mesh((WORLD,))
    for m in model.modules():
        if isinstance(m, UnitModule):
            fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def train(model, optim, steps=2, seed=1):
    torch.manual_seed(seed + RANK)
    for _ in range(steps):
        model(torch.randn(4, 100)).mean().backward()
        optim.step()
        optim.zero_grad()


def get_both(model, optim, **opts):
    ours = dsd.get_state_dict(model, optim, options=dsd.StateDictOptions(**opts))
    theirs = ptd.get_state_dict(model, optim, options=ptd.StateDictOptions(**opts))
    return ours, theirs


def full_cpu(model, optim):
    return ptd.get_state_dict(model, optim, options=ptd.StateDictOptions(full_state_dict=True, cpu_offload=True))


# ---------------------------------------------------------------------------------------------

def scenario_fsdp_get(mesh=None, name="fsdp"):
    model = fsdp_model(mesh=mesh)
    optim = torch.optim.Adam(model.parameters(), lr=1e-3)
    train(model, optim)
    for opts in [{}, {"flatten_optimizer_state_dict": True}, {"full_state_dict": True},
                 {"cpu_offload": True}, {"full_state_dict": True, "cpu_offload": True},
                 {"full_state_dict": True, "flatten_optimizer_state_dict": True}]:
        ours, theirs = get_both(model, optim, **opts)
        same(ours[0], theirs[0], f"{name}{opts}.model")
        same(ours[1], theirs[1], f"{name}{opts}.optim")
        if opts.get("full_state_dict") and opts.get("cpu_offload") and RANK != 0:
            assert ours[0] == {} and ours[1] == {}, "rank 0 alone keeps a full cpu-offloaded state dict"
        if opts.get("full_state_dict"):
            assert not any(isinstance(v, DTensor) for v in ours[0].values())


def scenario_save_load(mesh=None, flatten=False):
    """_test_save_load: train, get sharded, set into a fresh model, get again, one more step."""
    model = fsdp_model(mesh=mesh)
    optim = torch.optim.Adam(model.parameters(), lr=1e-3)
    train(model, optim)
    options = dsd.StateDictOptions(flatten_optimizer_state_dict=flatten)
    msd, osd = dsd.get_state_dict(model, optim, options=options)
    msd = {k: clone(v) for k, v in msd.items()}
    fresh = fsdp_model(seed=5, mesh=mesh)
    fresh_optim = torch.optim.Adam(fresh.parameters(), lr=1e-3)
    dsd.set_state_dict(fresh, fresh_optim, model_state_dict=msd, optim_state_dict=osd, options=options)
    again = dsd.get_state_dict(fresh, fresh_optim, options=options)
    same(again[0], msd, "model after set")
    theirs = ptd.get_state_dict(model, optim, options=ptd.StateDictOptions(flatten_optimizer_state_dict=flatten))
    same(dsd.get_state_dict(fresh, fresh_optim, options=options)[1], theirs[1], "optim after set")
    train(model, optim, 1, seed=9)
    train(fresh, fresh_optim, 1, seed=9)
    params_equal(model, fresh)


def scenario_full_set():
    """A full state dict on every rank: each slices its own shard, as PyTorch's set does."""
    model = fsdp_model()
    optim = torch.optim.Adam(model.parameters(), lr=1e-3)
    train(model, optim)
    full_m, full_o = full_cpu(model, optim) if WORLD == 1 else ptd.get_state_dict(
        model, optim, options=ptd.StateDictOptions(full_state_dict=True))
    ours, theirs = fsdp_model(seed=3), fsdp_model(seed=3)
    our_optim = torch.optim.Adam(ours.parameters(), lr=1e-3)
    their_optim = torch.optim.Adam(theirs.parameters(), lr=1e-3)
    full = dsd.StateDictOptions(full_state_dict=True)
    dsd.set_state_dict(ours, our_optim, model_state_dict=full_m, optim_state_dict=full_o, options=full)
    ptd.set_state_dict(theirs, their_optim, model_state_dict=copy.copy(full_m), optim_state_dict=copy.deepcopy(full_o),
                       options=ptd.StateDictOptions(full_state_dict=True))
    params_equal(ours, theirs)
    same(dsd.get_state_dict(ours, our_optim)[1], ptd.get_state_dict(theirs, their_optim)[1], "optim after full set", loose=True)
    params_equal(ours, model)


def scenario_broadcast_from_rank0():
    model = fsdp_model()
    optim = torch.optim.Adam(model.parameters(), lr=1e-3)
    train(model, optim)
    full_m, full_o = full_cpu(model, optim)  # rank 0 holds it, the others {}
    assert (full_m != {}) == (RANK == 0)
    ours, theirs = fsdp_model(seed=4), fsdp_model(seed=4)
    our_optim = torch.optim.Adam(ours.parameters(), lr=1e-3)
    their_optim = torch.optim.Adam(theirs.parameters(), lr=1e-3)
    opts = dict(full_state_dict=True, broadcast_from_rank0=True)
    dsd.set_state_dict(ours, our_optim, model_state_dict=full_m, optim_state_dict=full_o,
                       options=dsd.StateDictOptions(**opts))
    # PyTorch's own set_state_dict cannot do this: ranks passing {} decide "optimizer only" and
    # skip the model's broadcast that rank 0 enters (its collectives then mismatch). Its test
    # loads the model and the optimizer separately; so does the oracle here.
    ptd.set_model_state_dict(theirs, copy.copy(full_m), options=ptd.StateDictOptions(**opts))
    ptd.set_optimizer_state_dict(theirs, their_optim, copy.deepcopy(full_o), options=ptd.StateDictOptions(**opts))
    params_equal(ours, theirs)
    params_equal(ours, model)
    same(dsd.get_state_dict(ours, our_optim)[1], ptd.get_state_dict(theirs, their_optim)[1], "optim after broadcast", loose=True)
    # A small bucket streams tensors in row pieces: the same result.
    small = fsdp_model(seed=6)
    small_optim = torch.optim.Adam(small.parameters(), lr=1e-3)
    dsd.set_state_dict(small, small_optim, model_state_dict=full_m, optim_state_dict=full_o,
                       options=dsd.StateDictOptions(bucket_bytes=4096, **opts))
    params_equal(small, model)
    # Rank 0's state dict lacks a key: "Missing key" on every rank, nothing hangs.
    if RANK == 0:
        full_m = dict(full_m)
        del full_m["l.weight"]
    try:
        dsd.set_model_state_dict(fsdp_model(seed=7), full_m, options=dsd.StateDictOptions(**opts))
    except dsd.Error as e:
        assert "Missing key" in str(e), str(e)
    else:
        raise AssertionError("a key missing on rank 0 was not reported")


def scenario_hsdp():
    if WORLD != 4:
        return
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    scenario_fsdp_get(mesh=mesh, name="hsdp")
    scenario_save_load(mesh=mesh)


class Tp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 12, bias=False)
        self.fc1 = torch.nn.Linear(12, 8, bias=False)

    def forward(self, x):
        return self.fc1(torch.relu(self.fc(x)))


def tp_model(seed=0):
    torch.manual_seed(seed)
    model = Tp()
    parallelize_module(model, cpu_mesh((WORLD,)), {"fc": ColwiseParallel(), "fc1": RowwiseParallel(use_local_output=False)})
    return model


def scenario_multi_param_groups():
    """TP (fc Shard(0), fc1 Shard(1)); two groups, or one group and an empty one."""
    for config in ("two_groups", "empty_group"):
        for opts in ({}, {"full_state_dict": True}, {"full_state_dict": True, "broadcast_from_rank0": True}):
            model = tp_model()

            def groups(m):
                if config == "two_groups":
                    return [{"params": [m.fc.weight]}, {"params": [m.fc1.weight], "lr": 0.2}]
                return [{"params": [m.fc.weight, m.fc1.weight]}, {"params": [], "lr": 0.2}]

            optim = torch.optim.AdamW(groups(model), lr=0.1)
            torch.manual_seed(1)
            model(torch.randn(4, 8)).sum().backward()
            optim.step()
            optim.zero_grad()
            get_opts = {"full_state_dict": opts.get("full_state_dict", False)}
            if opts.get("broadcast_from_rank0"):
                get_opts["cpu_offload"] = True
            osd = dsd.get_optimizer_state_dict(model, optim, options=dsd.StateDictOptions(**get_opts))
            same(osd, ptd.get_optimizer_state_dict(model, optim, options=ptd.StateDictOptions(**get_opts)),
                 f"tp {config} {get_opts}")
            fresh = tp_model(seed=3)
            fresh_optim = torch.optim.AdamW(groups(fresh), lr=0.5)
            dsd.set_optimizer_state_dict(fresh, fresh_optim, osd, options=dsd.StateDictOptions(**opts))
            same(fresh_optim.state_dict()["param_groups"], optim.state_dict()["param_groups"], f"{config} groups")
            same(fresh_optim.state_dict()["state"], optim.state_dict()["state"], f"{config} state")


def scenario_tp_model():
    model = tp_model()
    optim = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(2)
    model(torch.randn(4, 8)).sum().backward()
    optim.step()
    for opts in ({}, {"full_state_dict": True}):
        ours, theirs = get_both(model, optim, **opts)
        same(ours, theirs, f"tp{opts}")
    placements = {k: v.placements for k, v in dsd.get_model_state_dict(model).items()}
    assert placements["fc.weight"][0].dim == 0 and placements["fc1.weight"][0].dim == 1, placements


class Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = torch.nn.Embedding(37, 6)
        self.decoder = torch.nn.Linear(6, 37, bias=False)
        self.decoder.weight = self.embedding.weight

    def forward(self, x):
        return self.decoder(self.embedding(x))


def scenario_tied_and_frozen():
    torch.manual_seed(0)
    model = Tied()
    fully_shard(model, mesh=cpu_mesh((WORLD,)))
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 37, (4, 3))).sum().backward()
    optim.step()
    for flatten in (False, True):
        ours, theirs = get_both(model, optim, flatten_optimizer_state_dict=flatten)
        same(ours, theirs, f"tied flatten={flatten}")
    frozen = fsdp_model()
    for p in frozen.u1.parameters():
        p.requires_grad_(False)
    optim = torch.optim.Adam([p for p in frozen.parameters() if p.requires_grad], lr=1e-3)
    train(frozen, optim, 1)
    ours, theirs = get_both(frozen, optim, ignore_frozen_params=True)
    same(ours, theirs, "frozen")
    assert not any(k.startswith("u1.") for k in ours[0])


def scenario_param_matching():
    """initial_lr exists only in the loaded dict: broadcast carries it to every rank."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(4, 4, bias=False) for _ in range(2)])
    mesh = cpu_mesh((WORLD,))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optim = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.optim.lr_scheduler.LambdaLR(optim, lr_lambda=[lambda epoch: 0.95 ** epoch])
    model(torch.randn(2, 4)).sum().backward()
    optim.step()
    osd = dsd.get_optimizer_state_dict(model, optim, options=dsd.StateDictOptions(full_state_dict=True, cpu_offload=True))
    if RANK == 0:
        assert "initial_lr" in osd["param_groups"][0]
    else:
        assert osd == {}
    fresh = torch.optim.Adam(model.parameters(), lr=1e-2)
    assert "initial_lr" not in fresh.param_groups[0]
    dsd.set_optimizer_state_dict(model, fresh, osd, options=dsd.StateDictOptions(full_state_dict=True,
                                                                                 broadcast_from_rank0=True))
    assert fresh.param_groups[0]["initial_lr"] == 1e-2


def scenario_strict():
    model = fsdp_model()
    msd = dsd.get_model_state_dict(model)
    ref = ptd.get_model_state_dict(model)
    msd["abc"] = torch.zeros(3)
    ref["abc"] = torch.zeros(3)
    errors = []
    for fn, sd in ((dsd.set_model_state_dict, msd), (ptd.set_model_state_dict, ref)):
        try:
            fn(model, dict(sd))
        except RuntimeError as e:
            errors.append(str(e))
    assert len(errors) == 2 and "Unexpected key" in errors[0], errors
    del msd["abc"], msd["l.weight"], ref["abc"], ref["l.weight"]
    ours = dsd.set_model_state_dict(model, msd, options=dsd.StateDictOptions(strict=False))
    theirs = ptd.set_model_state_dict(model, dict(ref), options=ptd.StateDictOptions(strict=False))
    assert ours.missing_keys == list(theirs.missing_keys) == ["l.weight"], (ours, theirs)


def scenario_mismatch_across_ranks():
    """A key only one rank has: every rank gets the same error, nothing hangs."""
    model = fsdp_model()
    msd = dsd.get_model_state_dict(model)
    if RANK == WORLD - 1:
        msd["only_here"] = torch.zeros(1)
    try:
        dsd.set_model_state_dict(model, msd)
    except dsd.Error as e:
        message = str(e)
    else:
        raise AssertionError("a key on one rank only was not reported")
    assert "only_here" in message, message
    messages = [None] * WORLD
    dist.all_gather_object(messages, message)
    assert len(set(messages)) == 1, messages


SCENARIOS = {
    "fsdp_get": scenario_fsdp_get,
    "save_load": scenario_save_load,
    "save_load_flat": lambda: scenario_save_load(flatten=True),
    "full_set": scenario_full_set,
    "broadcast_from_rank0": scenario_broadcast_from_rank0,
    "hsdp": scenario_hsdp,
    "tp_model": scenario_tp_model,
    "multi_param_groups": scenario_multi_param_groups,
    "tied_and_frozen": scenario_tied_and_frozen,
    "param_matching": scenario_param_matching,
    "strict": scenario_strict,
    "mismatch_across_ranks": scenario_mismatch_across_ranks,
}


def main():
    global RANK, WORLD
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    RANK, WORLD = dist.get_rank(), dist.get_world_size()
    names = sys.argv[1:] or list(SCENARIOS)
    for name in names:
        try:
            SCENARIOS[name]()
        except Exception:
            print(f"[rank {RANK}] scenario {name} FAILED:\n{traceback.format_exc()}", flush=True)
            os._exit(1)
        dist.barrier()
        log(f"ok {name} (world {WORLD})")
    dist.destroy_process_group()
    # PyTorch 2.13's Gloo teardown aborts at interpreter exit about 1 run in 8 ("terminate
    # called without an active exception"), with or without dsd: leave once the work is done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
