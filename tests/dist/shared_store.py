"""dsd and torch.distributed in one process share rank 0's TCPStore server (both multi-tenant)
without their keys colliding, whichever starts first. Run under dsdrun (rank 0 hosts):

    dsdrun -n 2 python shared_store.py dsd_first|torch_first
"""
import datetime
import sys

import torch
import torch.distributed as dist

import dsd


def main(order: str) -> int:
    if order == "dsd_first":
        comm = dsd.Communicator.from_env(timeout=30)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
    if order == "torch_first":
        comm = dsd.Communicator.from_env(timeout=30)
    # A second dsd world over the same store gets keys of its own.
    again = dsd.Communicator.from_env(timeout=30)
    t = torch.full((3,), float(dist.get_rank()))
    dist.all_reduce(t)
    assert t.tolist() == [1.0] * 3, t
    comm.barrier()
    again.barrier()
    assert (comm.rank, comm.size) == (dist.get_rank(), dist.get_world_size())
    dist.destroy_process_group()
    print(f"rank {comm.rank}: shared store ok ({order})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
