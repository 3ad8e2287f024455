"""Exit 0 if a package index answers, 1 if it cannot be reached: `make install` asks before it hands
PyTorch's CPU index to pip, which retries an index it cannot reach five times for torch and each of its
dependencies (more than a minute lost where only a mirror or a local index is reachable).

    python configs/index_answers.py https://download.pytorch.org/whl/cpu

Only a failure to connect (no such host, refused, unreachable, no answer in 15 s) or a server error
(which pip retries too) counts as no answer. Anything else is left to pip, which knows its own settings
(credentials, certificates, a proxy in pip.conf): a login asked for, a page not found, a URL this script
cannot read, a local index (file:, a path).
"""
from __future__ import annotations

import errno
import socket
import sys
import urllib.error
import urllib.request

NO_ROUTE = {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ECONNREFUSED, errno.ECONNRESET}


def answers(url: str, timeout: float = 15.0) -> bool:
    if not url.startswith(("http://", "https://")):
        return True
    try:
        urllib.request.urlopen(url.rstrip("/") + "/torch/", timeout=timeout).close()
    except urllib.error.HTTPError as exc:
        return exc.code < 500
    except urllib.error.URLError as exc:
        reason = exc.reason
        return not (isinstance(reason, (socket.gaierror, TimeoutError, ConnectionError))
                    or getattr(reason, "errno", None) in NO_ROUTE)
    except (TimeoutError, ConnectionError):
        return False
    except Exception:  # noqa: BLE001 (an URL urllib cannot read: pip may)
        return True
    return True


if __name__ == "__main__":
    sys.exit(0 if answers(sys.argv[1]) else 1)
