"""vas._native under hostile arguments, fuzzed in a child process (native_fuzz.py) so
that a crash of the extension is reported with its signal instead of ending pytest."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from fuzzkit import SCALE, SENT

#: Examples in the suite (times VAS_FUZZ_SCALE); about 1 ms each.
EXAMPLES = 400


def test_native_functions_raise_only_documented_errors():
    script = os.path.join(os.path.dirname(__file__), "native_fuzz.py")
    fixed = ["--derandomize"] if SCALE == 1 else []  # the suite's inputs: as in fuzzkit
    proc = subprocess.run([sys.executable, script, str(EXAMPLES * SCALE), *fixed],
                          capture_output=True, text=True, timeout=120 + 5 * SCALE)
    assert proc.returncode == 0, (f"native fuzzing ended with {proc.returncode} "
                                  f"(a negative code is the signal that killed it):\n"
                                  f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    for function, count in json.loads(proc.stdout.splitlines()[-1])["calls"].items():
        SENT[f"native.{function}"] += count
