"""Nothing a run starts outlives it: after `batchsight run --workers N` ends in any
way (success, a failed shard, SIGTERM, Ctrl-C), no worker or decode process it
started is alive, so on a GPU none holds the card's memory.

Each run happens under a small wrapper process that is a child subreaper
(PR_SET_CHILD_SUBREAPER): whatever the run leaves behind is re-parented to the
wrapper instead of to init, so it can be counted after the run's own process has
exited. No GPU here, so the GPU layout is set by hand where it matters, as the
several-workers-a-card test does (`local_gpus` returns 1 in the run's process):
its workers are then not daemonic and start decode processes of their own,
exactly the processes that held an H200 after a run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.dask_shards import process_alive
from tasks.catalog.reader import open_catalog
from tasks.sample_data import generate_samples, write_samples
from tasks.storage import LocalStore
from tests.helpers import ROOT, subprocess_env

pytestmark = [pytest.mark.usefixtures("prefect_harness"), pytest.mark.slow]

# Run in the wrapper: start the run, optionally signal it once it is mid-run, wait
# for it, then report every process still alive below the wrapper (and kill them).
SUBREAPER = r"""
import ctypes, json, os, signal, subprocess, sys, time
from pathlib import Path

ctypes.CDLL(None).prctl(36, 1)  # PR_SET_CHILD_SUBREAPER
cmd, sig, output, grace = json.loads(sys.argv[1])
me = os.getpid()

def parent_of(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[1]), fields[0]
    except OSError:
        return None, None

def below(root):
    tree, found = {}, []
    for name in os.listdir("/proc"):
        if name.isdigit():
            ppid, state = parent_of(int(name))
            if ppid is not None and state != "Z":
                tree.setdefault(ppid, []).append(int(name))
    todo = [root]
    while todo:
        for child in tree.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found

def cmdline(pid):
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()[:200]
    except OSError:
        return "?"

def reap():
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return

run = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
seen = set()
if sig:
    deadline = time.time() + 300
    while time.time() < deadline and run.poll() is None:
        seen |= set(below(run.pid))
        parts = Path(output, "tables", "embeddings")
        if parts.exists() and any(parts.rglob("*.parquet")):  # a shard has finished: the run is mid-way
            break
        time.sleep(0.1)
    seen |= set(below(run.pid))
    run.send_signal(sig)
out, _ = run.communicate(timeout=600)
left = below(me)
deadline = time.time() + grace
while left and time.time() < deadline:
    reap()
    time.sleep(0.2)
    left = below(me)
report = {"returncode": run.returncode, "output": out[-4000:], "seen": len(seen),
          "left": [[pid, cmdline(pid)] for pid in left]}
for pid in left:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
reap()
print(json.dumps(report))
"""

# The run itself, with the GPU layout set by hand where asked: then its local
# cluster's workers are not daemonic and decode in processes of their own.
LAUNCH = r"""
import sys
import flows.dask_shards
if sys.argv[1] == "gpu-layout":
    flows.dask_shards.local_gpus = lambda: 1
sys.argv = ["batchsight", *sys.argv[2:]]
from flows.cli import main
main()
"""

GRACE_S = 20  # for processes to go after the run's own process has exited (a worker's close is 10 s at most)


def run_under_subreaper(args: list[str], *, sig: int = 0, output: Path, env: dict[str, str],
                        layout: str = "gpu-layout") -> dict:
    cmd = [sys.executable, "-c", LAUNCH, layout, *map(str, args)]
    proc = subprocess.run([sys.executable, "-c", SUBREAPER, json.dumps([cmd, int(sig), str(output), GRACE_S])],
                          capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture
def bucket(tmp_path):
    write_samples(LocalStore(tmp_path / "src", create=True), generate_samples(40, seed=71, broken=False))
    return tmp_path / "src"


def run_args(src: Path, out: Path, weights: Path, *extra: str) -> list[str]:
    return ["run", "--source", src, "--output", out, "--model", "resnet18", "--weights", weights,
            "--batch-size", "4", "--shard-size", "5", "--workers", "2", "--decode-in", "processes", "--json", *extra]


@pytest.mark.parametrize("how", ["success", "failed-shard", "sigterm", "sigint"])
def test_no_process_a_run_starts_outlives_it(bucket, tmp_path, resnet18_weights, how):
    out = tmp_path / "out"
    env = subprocess_env()
    sig = {"sigterm": signal.SIGTERM, "sigint": signal.SIGINT}.get(how, 0)
    if how == "failed-shard":  # every worker that runs shard 0 is killed after writing its part: the run fails
        env["BATCHSIGHT_CRASH_AT"] = "after-shard-0"
    report = run_under_subreaper(run_args(bucket, out, resnet18_weights), sig=sig, output=out, env=env)
    assert report["left"] == [], f"{how}: left behind {report['left']}\n{report['output']}"
    if how == "success":
        assert report["returncode"] == 0, report["output"]
        assert len(open_catalog(str(out)).images) == 40
    else:
        assert report["returncode"] != 0, f"{how}: the run was not stopped mid-way\n{report['output']}"
        assert not (out / "CURRENT").exists()
    if sig:  # it was stopped while its workers and their decode processes ran
        assert report["seen"] >= 4, report
    if how == "sigterm":
        assert "terminated:" in report["output"]


def test_decode_processes_die_with_the_process_that_started_them(tmp_path):
    """A shard process killed outright (SIGKILL: the OOM killer, a lost node) takes
    its decode processes with it: they are forked with PR_SET_PDEATHSIG."""
    code = ("import os, sys, time\nfrom tasks.shard.read import decode_processes\n"
            "pool = decode_processes(2)\nprint(' '.join(str(p) for p in pool._processes), flush=True)\n"
            "time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    children = [int(p) for p in proc.stdout.readline().split()]
    assert len(children) == 2 and all(process_alive(p) for p in children)
    proc.kill()
    proc.wait()
    deadline = time.time() + 10
    while any(process_alive(p) for p in children) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(process_alive(p) for p in children), children
