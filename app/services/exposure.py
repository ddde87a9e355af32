"""Sign-in where it matters: a web app reachable from other machines has accounts, or says loudly
that it has none.

On loopback (127.0.0.1, ::1, localhost) the only people who reach the page are the ones at this
machine, so no sign-in stays the quick start. Any other --host exposes the labels, the adapters
and the Admin tab to the network: `odpo serve`/`up` refuse to start without accounts, in one line
that names the fix, unless --insecure-no-auth says the operator means it (then a warning at start
and a banner on the dashboard).
"""
from __future__ import annotations

import ipaddress
import logging
import socket
from pathlib import Path
from typing import Optional

from odpo.app.services.accounts import USERS_FILE_NAME, AuthConfig, load_auth
from odpo.db.errors import OdpoError

log = logging.getLogger(__name__)

INSECURE_WARNING = ("no sign-in on {host}: anyone who can reach port {port} can label, undo others' votes "
                    "and use the Admin tab (roll back, export every label); add accounts with `odpo users add "
                    "NAME --admin` and drop --insecure-no-auth")


class ExposureError(OdpoError):
    """A network-facing web app without accounts."""


def is_loopback(host: str) -> bool:
    """True when every address `host` names is a loopback one (a name is resolved)."""
    name = (host or "").strip().strip("[]")
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        pass
    if name.lower() == "localhost":
        return True
    try:
        infos = socket.getaddrinfo(name, None)
    except socket.gaierror:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def sign_in_for(*, host: str, port: int, auth_file: Optional[Path], data_dir: Path,
                insecure_no_auth: bool) -> Optional[AuthConfig]:
    """The accounts the web app signs people in with (None: no sign-in), or ExposureError when a
    non-loopback host would have none."""
    auth = load_auth(auth_file, data_dir=data_dir)
    if auth is not None or is_loopback(host):
        return auth
    if not insecure_no_auth:
        raise ExposureError(f"--host {host} exposes odpo to your network without sign-in: add accounts with "
                            f"`odpo users add NAME --admin` (written to {Path(data_dir) / USERS_FILE_NAME}, "
                            "used from then on), or pass --insecure-no-auth if you really mean it")
    log.warning(INSECURE_WARNING.format(host=host, port=port))
    return None


def insecure_banner(*, host: str, port: int, auth_on: bool, insecure_no_auth: bool) -> Optional[str]:
    """The dashboard's warning line, when the app runs open on a network."""
    if auth_on or not insecure_no_auth or is_loopback(host):
        return None
    return INSECURE_WARNING.format(host=host, port=port)
