"""The container's healthcheck: GET $BONSAI_HEALTH_URL (the /health of what the container
serves: the MLflow server, the Prefect API, a worker's healthcheck server); exit 0 if it answers
200, 1 otherwise. Without BONSAI_HEALTH_URL the container serves nothing (a one-shot pipeline
run): healthy."""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    url = os.environ.get("BONSAI_HEALTH_URL")
    if not url:
        return 0
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return 0 if r.status == 200 else 1
    except (urllib.error.URLError, OSError) as e:
        print(f"bonsai: {url} does not answer: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
