"""The one harness for tests that run Python in a fresh process (thread counts,
the disk cache, process-wide settings): run a script, return the JSON document
it prints last."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_json(script, *args, threads=None, env=None, timeout=600):
    """Run ``python -c script *args`` in the repository root; return the JSON of
    its last line of output.  ``threads`` sets NUMBA_NUM_THREADS; ``env`` adds
    variables.  Fails the test, with the process's stderr, if it exits non-zero."""
    full_env = dict(os.environ, PYTHONPATH=str(ROOT))
    if threads is not None:
        full_env["NUMBA_NUM_THREADS"] = str(threads)
    full_env.update(env or {})
    res = subprocess.run([sys.executable, "-c", script, *map(str, args)], env=full_env, cwd=ROOT,
                         capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"process exited with {res.returncode}:\n{res.stderr[-3000:]}"
    return json.loads(res.stdout.strip().splitlines()[-1])
