"""`python -m tuneforge.ui.worker RC_FILE -- COMMAND...`: run one job and record how it ended.

The page starts jobs through this so that a job outlives the page (own session) and its exit
code is on disk even when the page was restarted meanwhile; SIGTERM/SIGINT are passed on to the
job (the trainer then checkpoints and exits 143/130). Nothing of tuneforge is imported here.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m tuneforge.ui.worker RC_FILE -- COMMAND...", file=sys.stderr)
        return 2
    rc_file, command = argv[0], argv[2:]
    child = subprocess.Popen(command)

    def forward(signum: int, _frame) -> None:
        child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    rc = child.wait()
    tmp = f"{rc_file}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump({"rc": rc, "ended": time.time()}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, rc_file)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
