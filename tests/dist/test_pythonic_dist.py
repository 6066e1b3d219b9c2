"""The FSDP2 flow without comm= (issue 12) on 2 ranks under torchrun: fsdp2_no_comm.py."""
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def test_fsdp2_flow_without_comm_under_torchrun(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", DSD_TIMEOUT_S="60")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc-per-node", "2", os.path.join(HERE, "fsdp2_no_comm.py"), str(tmp_path)],
                       capture_output=True, text=True, timeout=280, env=env)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-6000:]
    assert p.stdout.count("fsdp2 no-comm flow ok") == 2, out[-3000:]
