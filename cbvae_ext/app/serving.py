"""Where the page may be served: loopback only, unless the operator opts in to other machines.

``streamlit run`` reads ``.streamlit/config.toml`` from its working directory only: started anywhere but the
repository root it binds every interface, and a run folder is code (``decoder.ts``), so the page checks the
address the server was started with and refuses to serve instead of relying on the working directory.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping

from cbvae_ext.app.markup import md_escape

__all__ = ["ALLOW_REMOTE_ENV", "LOCAL_COMMAND", "remote_refusal"]

#: Environment variable that allows serving on a non-loopback address (``1``).
ALLOW_REMOTE_ENV = "CBVAE_APP_ALLOW_REMOTE"
#: The command that serves the page on this machine only.
LOCAL_COMMAND = "streamlit run app/streamlit_app.py --server.address 127.0.0.1"


def _loopback(address: str) -> bool:
    if address.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.strip().strip("[]")).is_loopback
    except ValueError:  # a host name other than localhost may resolve to any interface
        return False


def remote_refusal(address: str | None, environ: Mapping[str, str]) -> str | None:
    """Why the page must not be served on ``address`` (Streamlit's ``server.address``), or None when it may.

    Unset, ``0.0.0.0``, ``::`` and every non-loopback address are refused unless ``environ`` sets
    ``CBVAE_APP_ALLOW_REMOTE=1``.
    """
    if address and _loopback(address):
        return None
    if environ.get(ALLOW_REMOTE_ENV, "").strip() == "1":
        return None
    where = f"server.address is {md_escape(address)}" if address else "server.address is unset"
    return (
        f"Not serving: this page would be reachable from other machines ({where}: every network interface), "
        f"and a run folder is code. Restart with `{LOCAL_COMMAND}`, or set {ALLOW_REMOTE_ENV}=1 to serve it "
        "to other machines on purpose."
    )
