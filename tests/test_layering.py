"""The package layering holds: import-linter's contracts in pyproject.toml, run as `make test` does.

A back-edge (a lower package importing a higher one, lazily or not), a new top-level module with
no layer, or an import of another package's `_private` module breaks a contract and fails here.
"""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert exe, "import-linter is a dev dependency (pyproject.toml)"
    proc = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout
