"""`python -m umvd_live ...` in a child process, as a user types it: for the tests of the commands."""

import subprocess
import sys
from collections.abc import Mapping


def run_umvd_live(*args: object, timeout: float | None = 300,
                  env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the command with ARGS (each made a string) and capture its output as text; its exit
    status is the test's to check. The timeout only keeps a hung command from hanging the suite
    (None: pytest-timeout's limit for the whole test is the guard); ENV, where given, is the
    child's whole environment (as subprocess takes it)."""
    return subprocess.run([sys.executable, "-m", "umvd_live", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env, check=False)
