"""Shared test helpers: run the CLI as a user would, in a subprocess, from the project root."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, timeout=600, env=None):
    """`python cli.py ARGS` in the project root; returns the CompletedProcess (text, not checked)."""
    env = {**os.environ, "COLUMNS": "200", **(env or {})}
    return subprocess.run([sys.executable, "cli.py", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env)
