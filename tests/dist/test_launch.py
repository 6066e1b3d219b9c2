"""Launching multi-process jobs and their failures, driven from one process: dsdrun's own
behaviour (environment, line forwarding, failure reports, grace period, job timeout), the
communicator under torchrun and mpirun, and the failure scenarios of dist_collectives (a peer
that exits mid-call, one that hangs, one that never shows up), whose output and exit status
are checked here. Paths come from the environment meson sets (DSDRUN, DIST_COLLECTIVES)."""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest

DSDRUN = os.environ["DSDRUN"]
PROG = os.environ["DIST_COLLECTIVES"]
HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT_MS = 5000  # the communicator timeout of the failure scenarios


def run(args, timeout=120, env_extra=None):
    env = dict(os.environ)
    env["DSD_TEST_TIMEOUT_MS"] = str(TIMEOUT_MS)
    env.update(env_extra or {})
    t0 = time.monotonic()
    p = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)
    p.seconds = time.monotonic() - t0
    sys.stdout.write(p.stdout)
    sys.stderr.write(p.stderr)
    return p


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def dsdrun(n, *cmd, grace=30, timeout=None):
    args = [DSDRUN, "-n", str(n), "--grace", str(grace)]
    if timeout:
        args += ["--timeout", str(timeout)]
    return run(args + [str(c) for c in cmd])


# --- dsdrun itself ---------------------------------------------------------------------------

def test_dsdrun_sets_torchrun_variables_and_prefixes_lines():
    p = dsdrun(3, "sh", "-c", 'echo "$RANK $WORLD_SIZE $LOCAL_RANK $LOCAL_WORLD_SIZE $MASTER_ADDR $MASTER_PORT"; '
               'echo "err $RANK" >&2; printf "tail $RANK"')
    assert p.returncode == 0, p.stderr
    port = re.search(r"\[rank 0\] 0 3 0 3 127\.0\.0\.1 (\d+)\n", p.stdout).group(1)
    for i in range(3):
        assert f"[rank {i}] {i} 3 {i} 3 127.0.0.1 {port}\n" in p.stdout  # one port for all
        assert f"[rank {i}] err {i}\n" in p.stderr
        assert f"[rank {i}] tail {i}\n" in p.stdout  # the unterminated last line too
    q = run([DSDRUN, "-n", "1", "--port", "23456", "sh", "-c", "echo $MASTER_PORT"])
    assert q.stdout == "[rank 0] 23456\n"


def test_dsdrun_reports_a_failed_rank_and_terminates_the_others_after_the_grace_period():
    p = dsdrun(3, "sh", "-c", 'if [ "$RANK" = 1 ]; then exit 5; fi; exec sleep 60', grace=1)
    assert p.returncode == 5
    assert p.seconds < 20
    assert re.search(r"dsdrun: rank 1 \(pid \d+\) exited with status 5", p.stderr)
    assert "terminating ranks 0, 2" in p.stderr
    assert "FAILED: rank 0 was killed by signal 15 (Terminated) (terminated by dsdrun); rank 1 exited " \
           "with status 5; rank 2 was killed by signal 15" in p.stderr


def test_dsdrun_names_a_rank_killed_by_a_signal():
    p = dsdrun(2, "sh", "-c", 'if [ "$RANK" = 0 ]; then kill -SEGV $$; fi', grace=5)
    assert p.returncode == 128 + 11
    assert re.search(r"rank 0 \(pid \d+\) was killed by signal 11", p.stderr)


def test_dsdrun_job_timeout():
    p = dsdrun(2, "sleep", "60", timeout=1)
    assert p.returncode == 124
    assert p.seconds < 20
    assert "the job ran past --timeout 1s; terminating ranks 0, 1" in p.stderr


def test_dsdrun_usage_errors():
    assert run([DSDRUN]).returncode == 2
    p = run([DSDRUN, "-n", "2"])
    assert p.returncode == 2 and "no command given" in p.stderr
    p = run([DSDRUN, "-n", "2", "/nonexistent/program"])
    assert p.returncode == 127 and "cannot run /nonexistent/program" in p.stderr


# --- failure scenarios of the communicator ---------------------------------------------------

def test_peer_exits_mid_call_every_survivor_gets_an_error():
    p = dsdrun(3, PROG, "peer_exit", grace=30)
    assert p.returncode == 3, "dsdrun must fail with the dead rank's status"
    assert re.search(r"dsdrun: rank 2 \(pid \d+\) exited with status 3", p.stderr)
    assert "FAILED: rank 2 exited with status 3\n" in p.stderr  # survivors exited by themselves
    for r in (0, 1):
        assert re.search(rf"\[rank {r}\] got expected (comm|timeout) error after .* all_gather on rank {r} of 3 "
                         r"\(gloo, tcp://127\.0\.0\.1:\d+\) failed: ", p.stdout), p.stdout
        assert f"[rank {r}] rank {r}: peer_exit ok" in p.stdout


def test_hung_peer_times_out_on_every_waiting_rank():
    p = dsdrun(3, PROG, "peer_hang")
    assert p.returncode == 0, p.stderr
    for r in (0, 1):
        assert re.search(rf"\[rank {r}\] got expected timeout error after [0-9.]+ s: all_reduce on rank {r} of 3",
                         p.stdout), p.stdout
        assert f"[rank {r}] rank {r}: peer_hang ok" in p.stdout


@pytest.mark.parametrize("missing", [1, 0])
def test_rank_that_never_shows_up_is_a_timeout_naming_it(missing):
    p = dsdrun(3, PROG, "missing_peer", missing)
    assert p.returncode == 0, p.stderr
    present = [r for r in range(3) if r != missing]
    for r in present:
        assert f"[rank {r}] rank {r}: missing_peer ok" in p.stdout
    if missing == 1:
        assert "rank(s) 1 never joined" in p.stdout
    else:
        assert "could not reach the store" in p.stdout


def test_file_store_rendezvous(tmp_path):
    p = dsdrun(3, PROG, "file_store", tmp_path / "store")
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("file_store ok") == 3


@pytest.mark.parametrize("order", ["dsd_first", "torch_first"])
def test_dsd_and_torch_distributed_share_the_store(order):
    p = dsdrun(2, sys.executable, os.path.join(HERE, "shared_store.py"), order, timeout=120)
    assert p.returncode == 0, p.stderr[-5000:]
    assert p.stdout.count(f"shared store ok ({order})") == 2


# --- other launchers -------------------------------------------------------------------------

def test_torchrun_launches_the_collectives():
    p = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3",
             "--no-python", PROG, "collectives"], timeout=240,
            env_extra={"DSD_TEST_TIMEOUT_MS": "20000"})
    assert p.returncode == 0, p.stderr
    for r in range(3):
        assert f"rank {r}: collectives ok" in p.stdout
        # Under torchrun the agent hosts the store and every rank is a client of it.
        assert f"rank {r}: launcher torchrun, store hosted by the agent" in p.stdout


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="no mpirun")
def test_mpirun_launches_the_collectives():
    p = run(["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2",
             "-x", f"MASTER_PORT={free_port()}", "-x", "DSD_TEST_TIMEOUT_MS", PROG, "collectives"],
            timeout=240, env_extra={"DSD_TEST_TIMEOUT_MS": "20000"})
    assert p.returncode == 0, p.stderr
    for r in range(2):
        assert f"rank {r}: collectives ok" in p.stdout
        assert f"rank {r}: launcher mpirun" in p.stdout


def test_torchrun_dtensor_round_trip():
    p = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
             os.path.join(HERE, "dtensor_roundtrip.py")], timeout=280)
    assert p.returncode == 0, p.stderr[-5000:]
    assert p.stdout.count("dtensor round trip ok") == 4


def test_layouts_against_pytorch_on_four_ranks():
    p = dsdrun(4, sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
               os.path.join(HERE, "test_layout_oracle.py"), timeout=280)
    assert p.returncode == 0, p.stdout[-5000:]
    assert p.stdout.count("7 passed") == 4
