"""Who may talk to the daemon: loopback only by default, ZeroMQ CURVE for anything beyond.

The daemon has three bound sockets (input, output, control). On loopback, the machine's own users
are trusted, as for any local service. Reaching the daemon from another machine (an acquisition PC
streaming to a GPU workstation) needs ``--allow-remote`` *and* CURVE: every connection is then
encrypted, and only clients whose public key is in the allowed-clients directory complete the
handshake (checked by a ZAP authenticator thread, `zmq.auth.thread.ThreadAuthenticator`). A refused
client's frames never reach the daemon, and it never receives a frame or a control reply.

Keys are ZeroMQ certificate files as `zmq.auth.create_certificates` writes them: ``NAME.key``
(public: copy it to the other side) and ``NAME.key_secret`` (public + secret: keep it private).
``umvd-live keys DIR NAME`` creates a pair (`create_keypair`).
docs/security.md walks through the set-up.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

log = logging.getLogger("umvd_live.daemon")


class SecurityError(ValueError):
    """A refused set-up: remote bind without authentication, missing or unreadable keys."""


def _tcp_host(endpoint: str) -> str | None:
    """The host of a ``tcp://`` endpoint, without an IPv6 address's brackets; None for another transport."""
    if not endpoint.startswith("tcp://"):
        return None
    return endpoint[len("tcp://"):].rsplit(":", 1)[0].strip("[]")


def is_loopback(endpoint: str) -> bool:
    """Whether binding ``endpoint`` keeps the socket on this machine."""
    host = _tcp_host(endpoint)
    if host is None:
        return endpoint.startswith(("ipc://", "inproc://"))
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # "*", an interface name, a host name: not provably local


def is_ipv6(endpoint: str) -> bool:
    """Whether ``endpoint`` names an IPv6 address (``tcp://[::1]:5555``)."""
    host = _tcp_host(endpoint)
    try:
        return host is not None and ipaddress.ip_address(host).version == 6
    except ValueError:
        return False


def enable_ipv6(sock: zmq.Socket, endpoints: Iterable[str | None]) -> None:
    """Give ``sock`` ZeroMQ's IPV6 option (before it binds or connects) if one of its
    ``endpoints`` is an IPv6 address: without it, ``[::1]`` cannot be bound or reached. Only then:
    with it, ``127.0.0.1`` binds as ``[::ffff:127.0.0.1]`` and ``localhost`` may resolve to ``::1``,
    which IPv4-only clients cannot reach."""
    if any(is_ipv6(endpoint) for endpoint in endpoints if endpoint):
        sock.setsockopt(zmq.IPV6, 1)


def check_bind(endpoint: str, *, allow_remote: bool, curve: bool) -> None:
    """Refuse a bind beyond loopback unless the operator allowed it and CURVE protects it."""
    if is_loopback(endpoint):
        return
    if not allow_remote:
        raise SecurityError(f"{endpoint}: the daemon binds loopback addresses only (127.0.0.1, [::1], "
                            "localhost); binding elsewhere needs --allow-remote and CURVE keys "
                            "(docs/security.md)")
    if not curve:
        raise SecurityError(f"{endpoint}: --allow-remote needs CURVE authentication: give "
                            "--curve-server-key and --curve-clients (docs/security.md)")


class PathNotAllowed(ValueError):
    """A path from a client (the control socket) that would leave its directory."""


def confine_path(requested: Any, base: str | os.PathLike) -> Path:
    """``requested`` resolved inside ``base``, or PathNotAllowed: a client names files only there.

    Refused: anything but a non-blank string; NUL bytes; any ``..`` component (``/`` or ``\\``);
    a leading ``~`` (never expanded: it would name the client's home); a drive- or root-relative
    path (Windows' ``C:x``, ``\\x``); an absolute path outside ``base``; ``base`` itself; and a
    path whose existing components are symlinks leading out. One rule for models and recordings:
    a client must not read or write outside the directory the operator chose. Missing
    directories inside are allowed (the caller creates them); files are later opened with
    O_EXCL|O_NOFOLLOW (recordings), so a symlink planted at the file name is not followed.
    """
    if not isinstance(requested, str) or not requested.strip():
        raise PathNotAllowed("path must be a non-empty string")
    if "\x00" in requested:
        raise PathNotAllowed("path contains a NUL byte")
    pure = PurePath(requested)
    if ".." in pure.parts or ".." in requested.replace("\\", "/").split("/"):
        raise PathNotAllowed(f"{requested!r}: '..' is not allowed")
    if not pure.is_absolute() and (pure.drive or pure.root or requested.startswith(("/", "\\", "~"))):
        raise PathNotAllowed(f"{requested!r} must be relative to the directory, or absolute inside it")
    root = Path(base).resolve()
    resolved = (root / pure).resolve(strict=False)  # follows every symlink that exists
    if resolved == root or not resolved.is_relative_to(root):
        raise PathNotAllowed(f"{requested!r} is outside the directory {str(root)!r}")
    return resolved


def read_keypair(path: str | os.PathLike) -> tuple[bytes, bytes]:
    """(public, secret) from a ``.key_secret`` file; SecurityError if it holds no secret key."""
    path = Path(path).expanduser()
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise SecurityError(f"{path}: cannot read a CURVE key pair ({exc})") from None
    if not public or not secret:
        raise SecurityError(f"{path}: no secret key in it (use the NAME.key_secret file)")
    return public, secret


def read_public_key(path: str | os.PathLike) -> bytes:
    path = Path(path).expanduser()
    try:
        public, _ = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise SecurityError(f"{path}: cannot read a CURVE public key ({exc})") from None
    if not public:
        raise SecurityError(f"{path}: no public key in it")
    return public


@dataclass(frozen=True)
class CurveServerConfig:
    """The daemon's key pair and the directory of client public keys it lets in."""

    server_secret_file: Path
    clients_dir: Path


class CurveServer:
    """Runs the ZAP authenticator and turns the daemon's sockets into CURVE servers."""

    def __init__(self, config: CurveServerConfig):
        self.config = config
        self.public, self._secret = read_keypair(config.server_secret_file)
        clients = Path(config.clients_dir).expanduser()  # "~" unexpanded by cmd.exe, PowerShell, quotes
        if not clients.is_dir():
            raise SecurityError(f"{clients}: no such directory of allowed client keys")
        try:
            self.allowed = zmq.auth.load_certificates(clients)
        except (OSError, ValueError) as exc:
            raise SecurityError(f"{clients}: unreadable client key ({exc})") from None
        if not self.allowed:
            raise SecurityError(f"{clients}: no client public key (*.key) in it: nobody could connect")
        self._clients = clients
        self._auth: ThreadAuthenticator | None = None

    def start(self, ctx: zmq.Context) -> None:
        """Start the authenticator; must happen before the sockets bind."""
        self._auth = ThreadAuthenticator(ctx, log=logging.getLogger("umvd_live.auth"))
        self._auth.start()
        self._auth.configure_curve(domain="*", location=str(self._clients))
        log.info("CURVE on: %d allowed client key(s) from %s", len(self.allowed), self._clients)

    def apply(self, sock: zmq.Socket) -> None:
        """Make ``sock`` a CURVE server (before it binds)."""
        sock.curve_secretkey = self._secret
        sock.curve_publickey = self.public
        sock.curve_server = True

    def stop(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None


def apply_client(sock: zmq.Socket, client_secret_file: str | os.PathLike,
                 server_public_file: str | os.PathLike) -> None:
    """Make ``sock`` (a producer's PUB, a viewer's SUB, a REQ) a CURVE client of the daemon;
    call before it connects."""
    public, secret = read_keypair(client_secret_file)
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_serverkey = read_public_key(server_public_file)


def create_keypair(directory: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """Write ``NAME.key`` and ``NAME.key_secret`` (mode 0600) in ``directory``; never overwrites."""
    directory = Path(directory).expanduser()  # else a "~" the shell left is a folder of that name
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise SecurityError(f"{name!r}: a key name is a plain file name")
    directory.mkdir(parents=True, exist_ok=True)
    public, secret = directory / f"{name}.key", directory / f"{name}.key_secret"
    for path in (public, secret):
        if path.exists():
            raise SecurityError(f"{path} exists already; not overwriting a key")
    old = os.umask(0o077)  # the secret file is never readable by others, even for an instant
    try:
        made_public, made_secret = zmq.auth.create_certificates(directory, name)
    finally:
        os.umask(old)
    os.chmod(made_public, 0o644)
    return Path(made_public), Path(made_secret)
