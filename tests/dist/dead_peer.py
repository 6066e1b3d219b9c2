"""A rank dies in the middle of a state-dict call: the others get a dsd error within the
communicator's timeout, never a hang. Run on N >= 2 ranks; the last rank dies."""
import datetime
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import dsd

dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
model = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(4)])
fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
dsd.get_model_state_dict(model)  # everyone builds the communicator first
if rank == world - 1:
    os._exit(3)  # dies before the full gather
start = time.monotonic()
try:
    dsd.get_model_state_dict(model, options=dsd.StateDictOptions(full_state_dict=True))
except dsd.Error as e:
    print(f"SURVIVOR {rank} got {e.code_name} after {time.monotonic() - start:.1f}s: {e}", flush=True)
    sys.exit(0)
print(f"rank {rank}: the call succeeded without its peer", flush=True)
sys.exit(1)
