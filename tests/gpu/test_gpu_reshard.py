"""Resharding loads of CUDA tensors across world sizes 1 -> 2 -> 1: two processes on the one
GPU under tools/dsdrun, Gloo with CUDA tensors (gpu_reshard_worker.py does the work)."""
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "gpu_reshard_worker.py")
DSDRUN = os.environ["DSDRUN"]


def run(cmd, timeout=200):
    env = dict(os.environ, OMP_NUM_THREADS="2")
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-6000:]
    return out


def test_world_1_to_2_to_1_on_one_gpu(tmp_path):
    root = str(tmp_path)
    assert "save1 ok" in run([sys.executable, WORKER, "save1", root])
    out = run([DSDRUN, "-n", "2", "--timeout", "240", "--grace", "10", sys.executable, WORKER, "w2", root],
              timeout=280)
    for rank in (0, 1):
        for step in ("load 1 -> 2 ok", "save at world 2 ok", "reshard Shard(0) -> Shard(1) ok",
                     "full state dict gather ok"):
            assert f"rank {rank}: {step}" in out, f"rank {rank} did not report '{step}':\n{out[-4000:]}"
    assert "load1 ok" in run([sys.executable, WORKER, "load1", root])
