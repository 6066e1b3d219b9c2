"""Counts Meson's test log and prints the line CI reads: `N passed, N failed`.

Skipped tests (exit code 77, e.g. GPU tests on a machine without a GPU) are listed on a
line of their own before it. Exits non-zero when any test failed or the log is missing.
"""
import json
import sys


def main(path: str) -> int:
    try:
        with open(path, encoding="utf-8") as f:
            results = [json.loads(line) for line in f if line.strip()]
    except OSError as exc:
        print(f"no test log at {path}: {exc}")
        print("0 passed, 1 failed")
        return 1
    # A test that ran twice (e.g. `meson test` repeated) counts once, by its last result.
    last = {}
    for r in results:
        last[r["name"]] = r["result"]
    passed = sorted(n for n, r in last.items() if r in ("OK", "EXPECTEDFAIL"))
    skipped = sorted(n for n, r in last.items() if r == "SKIP")
    failed = sorted(n for n, r in last.items() if r not in ("OK", "EXPECTEDFAIL", "SKIP"))
    for name in failed:
        print(f"FAILED: {name} ({last[name]})")
    if skipped:
        print(f"{len(skipped)} skipped: {', '.join(skipped)}")
    print(f"{len(passed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
