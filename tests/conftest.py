"""Shared test helpers: run the CLI as a user would, in a process of its own, from the project
root."""

import atexit
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# SIGKILL (a crash, the OOM killer) from inside the run, just before its 6th optimiser step: step 5
# has been logged, and it is neither a checkpoint (every 3rd) nor an epoch end (every 8th). A kill
# from the test after polling the log missed that one-step window on a fast machine (steps of a few
# ms), and the run ended first.
KILL_BEFORE_STEP_6 = r"""
import os, signal
from torch.optim.optimizer import register_optimizer_step_pre_hook
calls = []
def kill(optimizer, args, kwargs):
    calls.append(1)
    if len(calls) == 6:
        os.kill(os.getpid(), signal.SIGKILL)
register_optimizer_step_pre_hook(kill)
"""

_server = None  # run_cli's ForkedCli, started on first use


def run_cli(*args, timeout=600, env=None):
    """`python cli.py ARGS` in the project root; returns the CompletedProcess (text, not checked).
    Without `env`, the command is a child forked from one process that imported cli.py once for the
    whole session (ForkedCli below): what `python cli.py ARGS` runs, in a process of its own,
    without paying the import (~2 s) every time."""
    global _server
    if env is None:
        if _server is None or _server.server.poll() is not None:
            _server = ForkedCli().__enter__()
            atexit.register(_server.__exit__)
        return _server.run(*args, timeout=timeout)
    env = {**os.environ, "COLUMNS": "200", **env}
    return subprocess.run(
        [sys.executable, "cli.py", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(*args, nproc=2, timeout=300):
    """`torchrun --nproc-per-node NPROC cli.py ARGS` in the project root, on the loopback (gloo)
    with a free port and one thread per process; returns the CompletedProcess (text, not
    checked)."""
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "GLOO_SOCKET_IFNAME": "lo",
        "OMP_NUM_THREADS": "1",
        "COLUMNS": "200",
    }
    port = ["--master-addr", "127.0.0.1", "--master-port", free_port()]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        nproc,
        *port,
        "cli.py",
        *args,
    ]
    return subprocess.run(
        list(map(str, cmd)), cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env
    )


# One process imports cli.py (and what a run imports lazily) once, then forks a child for each
# command: the child runs cli.main(ARGS), what `python cli.py ARGS` runs, with its own stdout,
# stderr, pid and exit code, without paying the ~2 s import of torch again. A command may carry a
# prelude, Python run in the child before cli.main (e.g. KILL_BEFORE_STEP_6). The server answers a
# command with the child's pid at once, so a test can signal it while it runs, and reaps it on
# {"wait": pid}.
FORK_SERVER = r"""
import json, os, signal, sys, traceback
import cli
import rich.progress, torch._dynamo, torchvision.transforms.v2  # imported by runs lazily: once
for line in sys.stdin:
    request = json.loads(line)
    if "wait" in request:
        status = os.waitpid(request["wait"], 0)[1]
        print(json.dumps(os.waitstatus_to_exitcode(status)), flush=True)
        continue
    pid = os.fork()
    if pid == 0:
        signal.alarm(request["timeout"])  # a hung command dies, and is reported as killed
        for fd, name in ((1, "stdout"), (2, "stderr")):
            os.dup2(os.open(request[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        sys.argv = ["cli.py", *request["args"]]
        code = 1
        try:
            exec(request["prelude"], {})
            cli.main(request["args"])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
        except BaseException:
            traceback.print_exc()  # as the interpreter would print an uncaught exception
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    print(json.dumps(pid), flush=True)
"""


class ForkedCli:
    """`python cli.py ARGS` in processes forked from one that imported cli.py once. run(*args) ->
    CompletedProcess, as the command gives it; start(*args) -> the child's pid, and wait(pid) ->
    its CompletedProcess. Use as a context manager. cwd: the folder the commands run in (cli.py
    is still imported from the project root); env: more environment variables."""

    def __init__(self, cwd=ROOT, env=None):
        self.cwd = cwd
        self.env = {**os.environ, "COLUMNS": "200", "PYTHONPATH": str(ROOT), **(env or {})}
        self.started = {}  # pid: (args, {stdout, stderr: file})

    def __enter__(self):
        self.server = subprocess.Popen(
            [sys.executable, "-c", FORK_SERVER],
            cwd=self.cwd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=self.env,
        )
        self.tmp = tempfile.TemporaryDirectory()
        return self

    def ask(self, request):
        self.server.stdin.write(json.dumps(request) + "\n")
        self.server.stdin.flush()
        return json.loads(self.server.stdout.readline())

    def start(self, *args, prelude="", timeout=300):
        args = list(map(str, args))
        n = len(self.started)
        files = {name: os.path.join(self.tmp.name, f"{n}.{name}") for name in ("stdout", "stderr")}
        pid = self.ask({"args": args, "timeout": timeout, "prelude": prelude, **files})
        self.started[pid] = args, files
        return pid

    def wait(self, pid):
        code = self.ask({"wait": pid})
        args, files = self.started.pop(pid)
        out, err = (Path(files[name]).read_text() for name in ("stdout", "stderr"))
        return subprocess.CompletedProcess(["cli.py", *args], code, out, err)

    def run(self, *args, prelude="", timeout=300):
        return self.wait(self.start(*args, prelude=prelude, timeout=timeout))

    def __exit__(self, *exc):
        self.server.stdin.close()
        self.server.wait(timeout=60)
        self.tmp.cleanup()


def drawn_inputs(module, cfg, batch_size, seed=0, epoch=0):
    """A method's inputs of a batch of samples 0 .. batch_size - 1, as a loader draws them (its
    sample_inputs with the samples' Draws, after their crop's), on the CPU; {} if it draws none."""
    import torch

    import data_sets

    if not hasattr(module, "sample_inputs"):
        return {}
    keys = data_sets.sample_keys(seed, epoch, torch.arange(batch_size))
    return module.sample_inputs(cfg, data_sets.Draws(keys, first=1))
