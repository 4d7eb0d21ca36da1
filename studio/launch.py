"""``python -m kiln.studio.launch ARGS``: the ``kiln`` command, as a studio job runs it.

The studio stops a job the way a person at a terminal would, with SIGINT (Ctrl-C: training stops at the
next batch and saves a resumable run). A process started with SIGINT ignored keeps ignoring it, so a
studio that was itself started in the background would start jobs it cannot stop: the job restores
Python's handler first. Everything else is ``kiln.cli.main``.
"""

from __future__ import annotations

import signal
import sys

from kiln.cli import main

if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(main(sys.argv[1:]))
