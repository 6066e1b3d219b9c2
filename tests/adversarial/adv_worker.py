"""Worker processes of the adversarial suite.

`python adv_worker.py forkserver`: imports torch and dsd once, creates nothing else (no
thread pool, no communicator), then for each JSON command line on stdin forks a child that
runs it, prints "pid <pid>" at once and "exit <pid> <status>" when the child ends (killed
children too). A test can kill a child at any moment without paying Python's and torch's
start-up per trial.

Commands: {"op": "save" | "async_save" | "manager_save" | "load" | "sleep", ...}; see run()."""
from __future__ import annotations

import json
import os
import sys

import dsd
from adv_util import same, state


def run(cmd: dict) -> int:
    op = cmd["op"]
    try:
        if op == "save":
            dsd.save(state(cmd["which"], cmd.get("n", 4), cmd.get("numel", 4096)), cmd["path"],
                     overwrite=cmd.get("overwrite", True), format=cmd.get("format", "dsd"))
        elif op == "async_save":
            with dsd.AsyncCheckpointer() as ck:
                ck.save(state(cmd["which"], cmd.get("n", 4), cmd.get("numel", 4096)), cmd["path"],
                        overwrite=cmd.get("overwrite", True)).result()
        elif op == "manager_save":
            m = dsd.CheckpointManager(cmd["path"], keep_last=cmd.get("keep_last", 1))
            for step in cmd["steps"]:
                m.save(state(f"step{step}", cmd.get("n", 4), cmd.get("numel", 4096)), step)
        elif op == "load":
            # loads `path` `times` times; each must be exactly one of `whiches` (or an error)
            bad = 0
            for _ in range(cmd.get("times", 1)):
                try:
                    got = dsd.load_full(cmd["path"])
                except dsd.Error:
                    continue
                if not any(same(got, state(w, cmd.get("n", 4), cmd.get("numel", 4096))) for w in cmd["whiches"]):
                    bad += 1
            return 10 if bad else 0
        else:
            return 2
    except dsd.Error as e:
        sys.stderr.write(f"worker: {op}: {e.code_name}: {e}\n")
        return {"exists": 11, "no_space": 14}.get(e.code_name, 3)
    return 0


def forkserver() -> None:
    for line in sys.stdin:
        cmd = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = run(cmd)
            except BaseException as e:  # noqa: BLE001: a child never returns to the loop
                sys.stderr.write(f"worker: {cmd['op']}: {type(e).__name__}: {e}\n")
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        print(f"pid {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        print(f"exit {pid} {status}", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "forkserver":
        forkserver()
    else:
        sys.exit(run(json.loads(sys.argv[1])))
