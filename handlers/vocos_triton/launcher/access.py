"""Who may change the server and who may run inference: key files, tritonserver's restriction flags, TLS.

The admin key guards what changes the server (``Access.ADMIN_PROTOCOLS``: the repository API, whose
``load`` runs uploaded Python; shared memory; trace and log settings). It is always on unless the
operator turns it off: the launcher reads it from a file and creates that file (mode 0600, a random
token) when it does not exist, so a fresh ``make serve`` is never open. The optional API key guards
inference. Health, metadata, model config, statistics and metrics stay open (probes, dashboards).

tritonserver 2.51 takes the key values on its command line only (no file option), so they are
visible in ``/proc/<pid>/cmdline`` to other users of the same machine; the launcher never prints
them (:func:`redact`) and docs/exposure.md says so.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import re
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ..contract import Access

log = logging.getLogger("vocos_triton.launcher.access")

# tritonserver parses "<protocols>:<key>=<value>"; a value made of these characters cannot confuse it
_KEY_VALUE = re.compile(r"^[A-Za-z0-9._~+/-]{16,512}$")


class AccessError(ValueError):
    """A key or certificate file cannot be used as given."""


def read_or_create_key(path: Path) -> str:
    """The key stored in ``path``; a new random one (mode 0600) when the file does not exist."""
    try:
        # O_EXCL: never overwrite a key someone else is creating at the same moment
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return read_key(path)
    except OSError as exc:
        raise AccessError(f"{path}: cannot create the key file ({exc.strerror})") from exc
    value = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w") as handle:
        handle.write(value + "\n")
    log.info("created a new admin key in %s (mode 0600)", path)
    return value


def read_key(path: Path) -> str:
    """The key stored in ``path`` (one line; surrounding whitespace ignored)."""
    try:
        mode = path.stat().st_mode
        value = path.read_text().strip()
    except OSError as exc:
        raise AccessError(f"{path}: cannot read the key file ({exc.strerror})") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("%s: the key file is readable by other users (mode %o); chmod 600 it", path, mode & 0o777)
    if not _KEY_VALUE.match(value):
        raise AccessError(f"{path}: expected one line of 16 to 512 characters from A-Z a-z 0-9 . _ ~ + / - "
                          f"(e.g. `openssl rand -base64 32 | tr -d =`), got {len(value)} characters that do not fit")
    return value


def restriction_args(admin_key: Optional[str], api_key: Optional[str]) -> List[str]:
    """tritonserver flags restricting the admin protocols to ``admin_key`` and inference to ``api_key``.

    Each flag may be given several times with different keys (verified with 2.51); a protocol group
    listed under one key does not accept the other key.
    """
    args = []
    for protocols, key, value in ((Access.ADMIN_PROTOCOLS, Access.ADMIN_KEY, admin_key),
                                  (Access.API_PROTOCOLS, Access.API_KEY, api_key)):
        if value is None:
            continue
        spec = f"{','.join(protocols)}:{key}={value}"
        args += [f"--grpc-restricted-protocol={spec}", f"--http-restricted-api={spec}"]
    return args


@dataclass(frozen=True)
class Tls:
    """gRPC TLS: the server's certificate and key (PEM), and for mutual TLS the CA that signs clients."""

    cert: Path
    key: Path
    ca: Optional[Path] = None

    def check(self) -> None:
        for what, path in (("certificate", self.cert), ("key", self.key), ("CA", self.ca)):
            if path is not None and not path.is_file():
                raise AccessError(f"TLS {what} file not found: {path}")

    def args(self) -> List[str]:
        args = ["--grpc-use-ssl=true", f"--grpc-server-cert={self.cert}", f"--grpc-server-key={self.key}"]
        if self.ca is not None:
            args += [f"--grpc-root-cert={self.ca}", "--grpc-use-ssl-mutual=true"]
        return args


def redact(args: Sequence[str], secrets_: Sequence[Optional[str]]) -> str:
    """``args`` as one line for the log, with every key value replaced by ``***``."""
    line = " ".join(args)
    for value in secrets_:
        if value:
            line = line.replace(value, "***")
    return line


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def exposure_warnings(host: str, tls: bool, admin_key: bool, api_key: bool) -> List[str]:
    """What a server bound to ``host`` leaves open; empty on loopback."""
    if is_loopback(host):
        return []
    warnings = []
    if not admin_key:
        warnings.append(f"WARNING: listening on {host} WITHOUT AN ADMIN KEY: anyone who reaches the port can unload "
                        "models and load a model whose Python code they upload (remote code execution).")
    if not tls:
        warnings.append(f"WARNING: listening on {host} WITHOUT TLS: audio, results and keys cross the network in "
                        "plaintext (make serve TLS_CERT=... TLS_KEY=...).")
    if not api_key:
        warnings.append(f"note: listening on {host} without an API key: anyone who reaches the port may run "
                        "inference (make serve API_KEY_FILE=...).")
    if tls or admin_key:
        warnings.append("note: the HTTP and metrics endpoints are plaintext; keep them on a trusted network.")
    return warnings


def grpc_headers(key_name: str, value: Optional[str]) -> Dict[str, str]:
    """The gRPC metadata that carries ``value`` for ``key_name`` (empty without a value)."""
    return {Access.grpc_header(key_name): value} if value else {}
