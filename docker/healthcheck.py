"""Container health probe: exit 0 when ``GET http://127.0.0.1:$KILN_PORT<path>`` answers 200.

Used by HEALTHCHECK (``/healthz``, liveness) and compose (``/readyz``, models loaded). Standard
library only: the slim image has no curl.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main(argv: list[str]) -> int:
    path = argv[1] if len(argv) > 1 else "/healthz"
    url = f"http://127.0.0.1:{os.environ.get('KILN_PORT', '8000')}{path}"
    try:
        with urllib.request.urlopen(url, timeout=4) as resp:  # noqa: S310 - fixed loopback URL
            return 0 if resp.status == 200 else 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"{url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
