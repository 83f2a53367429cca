"""One `kvedit bench` process per folder: a second one is refused while the first runs; a killed holder leaves no
false lock."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import FACTS

from kvedit.bench.folder import LOCK_FILE, FolderInUseError, check_bench_folder, load_cases_file, lock_bench_folder


CLI = "import sys; from kvedit.cli import main; sys.exit(main())"
HOLD = (
    "import sys, time; from kvedit.bench.folder import lock_bench_folder; lock_bench_folder(sys.argv[1]); "
    "print('locked', flush=True); time.sleep(float(sys.argv[2]))"
)


def _holder_pid(out):
    try:
        return json.loads((out / LOCK_FILE).read_text() or "{}").get("pid")
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def test_a_second_bench_process_on_a_folder_in_use_is_refused(tiny_folder, tmp_path):
    """Two `kvedit bench` processes on one --out both ran every case (24 lines for 12 records): the second is now
    refused, naming the first, while the first runs; the folder ends with each case once."""
    dataset = tmp_path / "facts.json"
    records = [
        {"prompt": p, "subject": s, "target_new": n, "target_true": t, "case_id": 10 * k + i}
        for k in range(3)
        for i, (p, s, n, t) in enumerate(FACTS)
    ]
    dataset.write_text(json.dumps(records))
    out = tmp_path / "run"
    argv = [sys.executable, "-c", CLI, "bench", "--model", tiny_folder, "--dataset", dataset, "--methods", "ft-keys"]
    argv = [str(a) for a in [*argv, "--out", out]]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while _holder_pid(out) != first.pid:
            assert first.poll() is None, f"the first process ended before locking the folder: {first.stderr.read()}"
            assert time.monotonic() < deadline, "the first process never locked the folder"
            time.sleep(0.005)
        os.kill(first.pid, signal.SIGSTOP)  # keep it mid-run, holding the folder, while the second one starts
        assert first.poll() is None, "the first process finished before the second could start; use more cases"
        second = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
        os.kill(first.pid, signal.SIGCONT)
        assert second.returncode == 2, second.stderr
        assert f"is in use by another kvedit process: pid {first.pid} on host " in second.stderr
        assert "running `" in second.stderr and f"--out {out}`" in second.stderr and " since " in second.stderr
        assert "Traceback" not in second.stderr
        output, errors = first.communicate(timeout=300)
    finally:
        first.kill() if first.poll() is None else None
    assert first.returncode == 0, errors
    keys = [(r["run"], r["case_id"]) for r in load_cases_file(out / "cases.jsonl")]
    assert len(keys) == len(set(keys)) == 2 * len(records)
    assert (out / LOCK_FILE).read_text() == ""  # a clean exit clears the holder's entry


def test_a_killed_holder_leaves_no_false_lock(tmp_path):
    """The lock is the kernel's (flock): a holder killed with SIGKILL holds nothing; its entry is taken over with a
    warning naming it. The process holding the lock may take it again."""
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out), "600"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(FolderInUseError, match=rf"pid {holder.pid} on host .*running `.*lock_bench_folder"):
            check_bench_folder(out)  # the look before any model work
        with pytest.raises(FolderInUseError, match=rf"in use by another kvedit process: pid {holder.pid}"):
            lock_bench_folder(out, wait=0.1)
    finally:
        holder.kill()
        holder.wait()
    assert _holder_pid(out) == holder.pid  # kill -9 ran no clean-up: the entry is left, the lock is not
    check_bench_folder(out)
    with pytest.warns(UserWarning, match=rf"taking over the lock left by pid {holder.pid} .* is no longer running"):
        lock_bench_folder(out)
    assert _holder_pid(out) == os.getpid()
    lock_bench_folder(out)  # again in the process that holds it: nothing happens
    check_bench_folder(out)
    # a holder that exits normally clears its entry: the next one takes the folder without a warning
    done = tmp_path / "done"
    subprocess.run([sys.executable, "-c", HOLD, str(done), "0"], check=True, capture_output=True, timeout=60)
    assert (done / LOCK_FILE).read_text() == ""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lock_bench_folder(done)
