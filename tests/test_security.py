"""Security: loopback-only binds unless --allow-remote with CURVE; CURVE refuses unknown clients
on every socket (tested on loopback, where CURVE can be enabled too); control paths stay inside
the output and state directories; nothing named in a message is executed or unpickled."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch
import zmq
from command_line import run_umvd_live
from test_daemon import HALF, DaemonProcess

from umvd_live.adapters.publisher import FramePublisher
from umvd_live.daemon.service import write_ready_file
from umvd_live.engine.checkpoint import FORMAT, save_checkpoint
from umvd_live.wire.control_client import ControlClient
from umvd_live.wire.protocol import decode_output
from umvd_live.wire.security import (
    CurveServer,
    CurveServerConfig,
    SecurityError,
    apply_client,
    check_bind,
    create_keypair,
)

pytestmark = pytest.mark.timeout(180)


def test_keys_subcommand_writes_a_private_pair_and_never_overwrites(tmp_path):
    out = run_umvd_live("keys", str(tmp_path / "keys"), "daemon")
    assert out.returncode == 0, out.stderr
    public, secret = tmp_path / "keys" / "daemon.key", tmp_path / "keys" / "daemon.key_secret"
    assert public.is_file() and secret.is_file()
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert "secret-key" in secret.read_text() and "secret-key" not in public.read_text()
    before = secret.read_bytes()
    again = run_umvd_live("keys", str(tmp_path / "keys"), "daemon")
    assert again.returncode == 2 and "not overwriting" in again.stderr
    assert secret.read_bytes() == before


def test_binding_beyond_loopback_needs_allow_remote_and_curve(tmp_path):
    for endpoint in ("tcp://127.0.0.1:5555", "tcp://localhost:*", "tcp://[::1]:*", "ipc:///tmp/x"):
        check_bind(endpoint, allow_remote=False, curve=False)
    for endpoint in ("tcp://0.0.0.0:5555", "tcp://*:5555", "tcp://192.168.1.4:5555", "tcp://eth0:5555"):
        with pytest.raises(SecurityError, match="loopback"):
            check_bind(endpoint, allow_remote=False, curve=False)
        with pytest.raises(SecurityError, match="CURVE"):
            check_bind(endpoint, allow_remote=True, curve=False)
        check_bind(endpoint, allow_remote=True, curve=True)

    # The daemon refuses before it binds anything (so these ports are never opened).
    from umvd_live.apps.cli import build_parser, daemon_config_from_args
    from umvd_live.daemon.service import Daemon

    create_keypair(tmp_path, "server")
    (tmp_path / "empty").mkdir()
    local = ["--output", "tcp://127.0.0.1:*", "--control", "tcp://127.0.0.1:*"]
    curve = ["--curve-server-key", str(tmp_path / "server.key_secret"), "--curve-clients"]
    cases = {
        "loopback addresses only": ["--input", "tcp://0.0.0.0:*", *local],
        "needs CURVE": ["--allow-remote", "--input", "tcp://0.0.0.0:*", *local],
        "no client public key": ["--input", "tcp://127.0.0.1:*", *local, *curve, str(tmp_path / "empty")],
        "no such directory": ["--input", "tcp://127.0.0.1:*", *local, *curve, str(tmp_path / "nope")],
        "only loopback producers": ["--input-connect", "tcp://10.1.2.3:5555", *local],
    }
    for message, argv in cases.items():
        config = daemon_config_from_args(build_parser().parse_args(["serve", *argv]))
        daemon = Daemon(config, make_denoiser=None)
        with pytest.raises(SecurityError, match=message):
            daemon.start()
        assert daemon.transport.output is None  # nothing was bound
        daemon.close()
    with pytest.raises(SecurityError, match="--curve-clients"):
        daemon_config_from_args(build_parser().parse_args(["serve", "--curve-server-key", "x.key_secret"]))
    # And through the command line: a clear message, exit status 2.
    refused = run_umvd_live("serve", "--input", "tcp://0.0.0.0:*", *local, "--preset", "lite", "--device", "cpu")
    assert refused.returncode == 2 and "loopback" in refused.stderr


def test_a_tilde_left_by_the_shell_is_the_home_directory(tmp_path, monkeypatch):
    """docs/security.md's set-up typed where "~" reaches the program as is (cmd.exe, PowerShell,
    a quoted path): keys go to the home directory, and the daemon lets their client in."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("USERPROFILE", str(home))  # Windows' home
    monkeypatch.chdir(tmp_path)
    create_keypair("~/.umvd/keys", "daemon")
    create_keypair("~/.umvd/keys", "acq-pc")
    keys = home / ".umvd" / "keys"
    assert sorted(p.name for p in keys.iterdir()) == ["acq-pc.key", "acq-pc.key_secret", "daemon.key",
                                                      "daemon.key_secret"]
    assert not (tmp_path / "~").exists(), "no secret keys in a stray ./~ folder"
    (home / ".umvd" / "clients").mkdir()
    (home / ".umvd" / "clients" / "acq-pc.key").write_bytes((keys / "acq-pc.key").read_bytes())

    ctx = zmq.Context()
    curve = CurveServer(CurveServerConfig(Path("~/.umvd/keys/daemon.key_secret"), Path("~/.umvd/clients")))
    curve.start(ctx)
    server, client = ctx.socket(zmq.REP), ctx.socket(zmq.REQ)
    try:
        curve.apply(server)
        server.bind("tcp://127.0.0.1:*")
        apply_client(client, "~/.umvd/keys/acq-pc.key_secret", "~/.umvd/keys/daemon.key")
        client.connect(server.getsockopt_string(zmq.LAST_ENDPOINT))
        client.send(b"ping")
        assert server.poll(10000), "the allowed client got through the handshake"
        server.recv()
        server.send(b"pong")
        assert client.poll(10000) and client.recv() == b"pong"
    finally:
        server.close(linger=0)
        client.close(linger=0)
        curve.stop()
        ctx.term()


@pytest.fixture
def curve_keys(tmp_path):
    keys = tmp_path / "keys"
    create_keypair(keys / "server", "daemon")
    create_keypair(keys / "mine", "acq-pc")  # allowed: its public key is copied to clients/
    create_keypair(keys / "mine", "viewer")
    create_keypair(keys / "stranger", "intruder")  # a valid pair the daemon does not know
    (keys / "clients").mkdir()
    for name in ("acq-pc", "viewer"):
        (keys / "clients" / f"{name}.key").write_bytes((keys / "mine" / f"{name}.key").read_bytes())
    return keys


def test_curve_lets_allowed_clients_in_and_refuses_the_others(tmp_path, curve_keys):
    k = curve_keys
    d = DaemonProcess(tmp_path, "--allow-remote", "--curve-server-key", str(k / "server" / "daemon.key_secret"),
                      "--curve-clients", str(k / "clients"), "--catchup-ms", "60000")
    ctx = zmq.Context.instance()
    socks: list[zmq.Socket] = []

    def request(msg: dict, client: str | None, timeout_ms: int = 20000) -> dict | None:
        req = ctx.socket(zmq.REQ)
        req.setsockopt(zmq.RCVTIMEO, timeout_ms)
        req.setsockopt(zmq.LINGER, 0)
        if client is not None:
            apply_client(req, client, k / "server" / "daemon.key")
        req.connect(d.control)
        try:
            req.send(msgpack.packb(msg))
            return msgpack.unpackb(req.recv())
        except zmq.Again:
            return None
        finally:
            req.close()

    try:
        viewer = k / "mine" / "viewer.key_secret"
        assert request({"cmd": "status"}, None, 1500) is None  # no key: no reply
        assert request({"cmd": "status"}, str(k / "stranger" / "intruder.key_secret"), 1500) is None
        assert request({"cmd": "status"}, str(viewer))["curve"] is True

        # Producers: without CURVE, with an unknown key, with the allowed key.
        plain = FramePublisher(d.input, "plain")
        stranger = FramePublisher(d.input, "stranger", client_key=k / "stranger" / "intruder.key_secret",
                                  server_key=k / "server" / "daemon.key")
        allowed = FramePublisher(d.input, "cam0", client_key=k / "mine" / "acq-pc.key_secret",
                                 server_key=k / "server" / "daemon.key")
        socks += [plain, stranger, allowed]
        assert allowed.wait_for_subscriber(20)
        assert not plain.wait_for_subscriber(1.5) and not stranger.wait_for_subscriber(1.5)

        # Viewers: only the one with an allowed key receives anything.
        sub_ok = ctx.socket(zmq.SUB)
        apply_client(sub_ok, viewer, k / "server" / "daemon.key")
        sub_no = ctx.socket(zmq.SUB)
        for s in (sub_ok, sub_no):
            s.setsockopt(zmq.SUBSCRIBE, b"")
            s.setsockopt(zmq.RCVHWM, 10000)
            s.connect(d.output)
            socks.append(s)
        time.sleep(1.0)  # the subscription follows the handshake

        rng = np.random.default_rng(0)
        n = 20
        for _ in range(n):
            for pub in (plain, stranger, allowed):
                pub.publish(rng.poisson(20, (32, 32)).astype(np.uint16))
            time.sleep(0.02)
        deadline = time.monotonic() + 60
        while (request({"cmd": "status"}, str(viewer))["streams"].get("cam0", {}).get("frames_in") or 0) < n:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        status = request({"cmd": "status"}, str(viewer))
        assert set(status["streams"]) == {"cam0"}  # the refused producers' frames never arrived
        assert status["rejected_unattributed"] == {}

        got = []
        deadline = time.monotonic() + 30
        while len([m for m in got if m.kind == "denoised"]) < n - HALF and time.monotonic() < deadline:
            if sub_ok.poll(100):
                got.append(decode_output(sub_ok.recv_multipart()))
        assert [m.header["seq"] for m in got if m.kind == "denoised"] == list(range(n - HALF))
        assert not sub_no.poll(500)  # the viewer without a key got nothing
        assert request({"cmd": "shutdown"}, str(viewer))["ok"]
        assert d.wait() == 0
        assert "CURVE on: 2 allowed client key(s)" in d.log()
    finally:
        for s in socks:
            s.close()
        d.kill()


def test_publisher_needs_both_curve_keys(curve_keys):
    with pytest.raises(ValueError, match="both"):
        FramePublisher("tcp://127.0.0.1:1", "cam0", client_key=curve_keys / "mine" / "acq-pc.key_secret")
    with pytest.raises(SecurityError, match="no secret key"):  # a public key is not a key pair
        FramePublisher("tcp://127.0.0.1:1", "cam0", client_key=curve_keys / "mine" / "acq-pc.key",
                       server_key=curve_keys / "server" / "daemon.key")


class RunsCode:
    """A pickle that would create a file if it were ever unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_control_paths_stay_inside_the_directories_and_nothing_runs(tmp_path):
    state = tmp_path / "state"
    d = DaemonProcess(tmp_path, "--state-dir", str(state))
    outside = tmp_path / "outside"
    outside.mkdir()
    try:
        from test_daemon import run_producer

        run_producer(d.input, [["cam0", 32, 32, "<u2"]] * 12, rate=0)
        deadline = time.monotonic() + 30
        while d.request({"cmd": "status"})["streams"].get("cam0", {}).get("frames_in") != 12:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        saved = d.request({"cmd": "save_model", "path": "good.pt"})
        assert saved["ok"] and Path(saved["path"]) == (state / "good.pt").resolve()

        (state / "dirlink").symlink_to(outside)
        (state / "filelink.pt").symlink_to(outside / "target.pt")
        d.model_dir.mkdir(exist_ok=True)  # --output-dir: recordings
        (d.model_dir / "reclink").symlink_to(outside)
        escapes = ["../evil.pt", "../../evil.pt", str(outside / "evil.pt"), "/etc/passwd",
                   "dirlink/evil.pt", "filelink.pt", "sub/../../evil.pt", "~/evil.pt", "a\x00b.pt", ""]
        for path in escapes:
            for cmd in ("save_model", "load_model"):
                reply = d.request({"cmd": cmd, "stream": "cam0", "path": path})
                assert reply["ok"] is False, (cmd, path, reply)
        for path in ["../rec.ome.tif", str(outside / "rec.ome.tif"), "reclink/rec.ome.tif", "/tmp/rec.ome.tif"]:
            reply = d.request({"cmd": "record_start", "path": path})
            assert reply["ok"] is False, (path, reply)
        assert list(outside.iterdir()) == [] and not (tmp_path / "evil.pt").exists()

        # A model file that would run code when unpickled is refused as weights-only loading
        # finds an object; the code never runs.
        marker = tmp_path / "pwned"
        torch.save({"format": FORMAT, "info": {}, "state_dict": {"w": RunsCode(marker)}}, state / "evil.pt")
        reply = d.request({"cmd": "load_model", "stream": "cam0", "path": "evil.pt"})
        assert reply["ok"] is False and "not a readable" in reply["error"]
        # Commands are looked up by name in a fixed table: nothing named in a message runs.
        for cmd in ("__init__", "_save_model", "os.system", "__class__", "eval", ["status"]):
            reply = d.request({"cmd": cmd, "path": f"touch {marker}"})
            assert reply["ok"] is False and "unknown command" in reply["error"]
        assert not marker.exists()
        assert d.request({"cmd": "shutdown"})["ok"] and d.wait() == 0
    finally:
        d.kill()
    refused = run_umvd_live("serve", "--init", str(state / "evil.pt"), "--input", "tcp://127.0.0.1:*")
    assert refused.returncode == 2 and "--init" in refused.stderr and not marker.exists()


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX file modes (Windows keeps only a read-only bit)")
def test_model_and_ready_files_get_the_mode_the_umask_gives_not_owner_only(tmp_path):
    """Written through a temporary file and renamed, model files and the ready file still get
    the mode any file gets under the umask (other users' tools read them), not 0600."""
    umask = os.umask(0o022)
    try:
        save_checkpoint(tmp_path / "m.pt", {"w": torch.zeros(1)}, {})
        write_ready_file(tmp_path / "ready.json", {"input": "a", "output": "b", "control": "c"})
        os.umask(0o077)
        save_checkpoint(tmp_path / "private.pt", {"w": torch.zeros(1)}, {})
    finally:
        os.umask(umask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == {"m.pt": 0o644, "ready.json": 0o644, "private.pt": 0o600}


# ---- the control socket and the inbox under a flood: bounded memory, every client answered ------
def _serving_daemon(tmp_path: Path, seen: list[int] | None = None, **fields):
    """A daemon in this process, its frame loop on a thread (its streams' engines `StepCounter`s;
    no input socket unless ``fields``, more of its `DaemonConfig`, bind one); ``seen`` collects
    the size of every request the control thread hands to the service."""
    from test_daemon import StepCounter

    from umvd_live.daemon.config import DaemonConfig
    from umvd_live.daemon.service import Daemon

    d = Daemon(DaemonConfig(**({"input_bind": None, "output": "tcp://127.0.0.1:*", "control": "tcp://127.0.0.1:*",
                                "output_dir": tmp_path} | fields)), StepCounter)
    if seen is not None:
        on_request = d._on_request

        def noting(data: bytes):
            seen.append(len(data))
            return on_request(data)

        d._on_request = noting  # type: ignore[method-assign]
    d.start()
    loop = threading.Thread(target=d.serve, name="frame-loop", daemon=True)
    loop.start()
    return d, loop


def _stop_daemon(d, loop: threading.Thread) -> None:
    d.request_stop("test over")
    loop.join(30)
    d.close()


def _ask(endpoint: str, body: bytes, timeout_s: float) -> dict | None:
    """One request on a fresh REQ socket; None when no reply came within ``timeout_s``."""
    req = zmq.Context.instance().socket(zmq.REQ)
    req.setsockopt(zmq.LINGER, 0)
    req.connect(endpoint)
    try:
        req.send(body)
        return msgpack.unpackb(req.recv()) if req.poll(int(timeout_s * 1000)) else None
    finally:
        req.close()


FLOODER = """
import sys, time, msgpack, zmq
sock = zmq.Context().socket(zmq.DEALER)
sock.setsockopt(zmq.LINGER, 0)
sock.connect(sys.argv[1])
request = [b"", msgpack.packb({"cmd": "status"})]
print("flooding", flush=True)
began = time.monotonic()
while time.monotonic() - began < 60:  # never reads a reply; ends with the test (or after 60 s)
    for _ in range(1000):
        sock.send_multipart(request)
"""


def test_a_client_flooding_control_requests_does_not_starve_the_others(tmp_path):
    """A DEALER that sends ``status`` requests without pause and reads no reply: before, the
    control thread read until the socket was empty, which it never was, so no other client got a
    reply, and it held every request it took (263k, 587 MB in the review). Now it reads a bounded
    number per turn, holds a bounded number, and answers the flooder's others ``busy``."""
    seen: list[int] = []
    d, loop = _serving_daemon(tmp_path, seen)
    endpoint = d.endpoints["control"]
    flooder = subprocess.Popen([sys.executable, "-c", FLOODER, endpoint], stdout=subprocess.PIPE, text=True)
    try:
        assert flooder.stdout is not None and flooder.stdout.readline().strip() == "flooding"
        control = d.transport.control
        assert control is not None
        deadline = time.monotonic() + 30
        while len(seen) < 1000:  # the flood is on
            assert time.monotonic() < deadline and flooder.poll() is None, "the flood never reached the daemon"
            time.sleep(0.05)
        for _ in range(3):
            reply = _ask(endpoint, msgpack.packb({"cmd": "status"}), timeout_s=10)
            assert reply is not None, "a status request got no reply within 10 s while another client flooded"
            assert reply["ok"] and "streams" in reply, reply
        assert flooder.poll() is None, "the flood ended before the status requests were answered"
        from umvd_live.daemon.transport import MAX_WAITING_REQUESTS

        assert control.waiting <= MAX_WAITING_REQUESTS and control.busy > 0
    finally:
        flooder.kill()
        flooder.wait()
        _stop_daemon(d, loop)


def test_past_the_limits_a_control_request_is_answered_busy_at_once():
    """At most ``max_per_client`` requests wait for their reply per connection and
    ``max_waiting`` in all; past that the request never reaches the service: its reply is at once
    an error in the format of every other, and the requests within the limits are answered."""
    from concurrent.futures import Future

    from umvd_live.daemon.transport import ControlServer, PendingReply
    from umvd_live.wire.protocol import pack

    hanging: list[Future] = []
    handled: list[str] = []

    def handle(data: bytes) -> PendingReply:
        cmd, reply = msgpack.unpackb(data)["cmd"], Future()
        handled.append(cmd)
        if cmd == "slow":
            hanging.append(reply)  # answered when the test says so
        else:
            reply.set_result(pack({"ok": True, "cmd": cmd}))
        return PendingReply(reply)

    ctx = zmq.Context()
    server = ControlServer(ctx, "tcp://127.0.0.1:*", handle, max_waiting=6, max_per_client=4)
    server.start()
    socks: list[zmq.Socket] = []

    def dealer() -> zmq.Socket:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(server.endpoint)
        socks.append(sock)
        return sock

    def replies(sock: zmq.Socket, n: int) -> list[dict]:
        got = []
        while len(got) < n and sock.poll(10_000):
            empty, body = sock.recv_multipart()
            got.append(msgpack.unpackb(body))
        return got

    try:
        a, b = dealer(), dealer()
        for _ in range(10):
            a.send_multipart([b"", msgpack.packb({"cmd": "slow"})])
        busy_a = replies(a, 6)
        assert len(busy_a) == 6 and all(r["ok"] is False and r["error"].startswith("busy: too many requests waiting")
                                        and "this connection" in r["error"] for r in busy_a), busy_a
        for _ in range(4):
            b.send_multipart([b"", msgpack.packb({"cmd": "slow"})])
        busy_b = replies(b, 2)  # 4 + 2 waiting: the total is spent
        assert len(busy_b) == 2 and all(r["error"].startswith("busy: too many requests waiting (6)")
                                        for r in busy_b), busy_b
        assert handled == ["slow"] * 6 and server.waiting == 6 and server.busy == 8
        assert _ask(server.endpoint, msgpack.packb({"cmd": "status"}), 10)["error"].startswith("busy")

        for future in hanging:  # answered: the limits are free again
            future.set_result(pack({"ok": True, "cmd": "slow"}))
        assert [r["ok"] for r in replies(a, 4) + replies(b, 2)] == [True] * 6
        assert _ask(server.endpoint, msgpack.packb({"cmd": "status"}), 10) == {"ok": True, "cmd": "status"}
        assert server.waiting == 0 and server.is_alive()
    finally:
        for sock in socks:
            sock.close()
        server.stop()
        ctx.term()


def test_an_oversized_control_request_is_refused_before_it_is_held_whole(tmp_path):
    """The control socket takes no message part much over the 64 KiB a request may have: a larger
    one ends its connection as it arrives (no reply) instead of being received whole (300 MB in
    the review) before its refusal; one just over 64 KiB still gets the clear error reply."""
    from umvd_live.daemon.control import MAX_REQUEST_BYTES

    seen: list[int] = []
    d, loop = _serving_daemon(tmp_path, seen)
    endpoint = d.endpoints["control"]
    try:
        just_over = msgpack.packb({"cmd": "status", "pad": "x" * MAX_REQUEST_BYTES})
        assert MAX_REQUEST_BYTES < len(just_over) < MAX_REQUEST_BYTES + 4096
        reply = _ask(endpoint, just_over, timeout_s=10)
        assert reply is not None and reply["ok"] is False and "header_too_large" in reply["error"], reply

        assert _ask(endpoint, b"\x00" * (8 << 20), timeout_s=3) is None  # dropped: no reply
        assert seen and max(seen) == len(just_over), "the 8 MB request reached the service"
        status = _ask(endpoint, msgpack.packb({"cmd": "status"}), timeout_s=10)
        assert status is not None and status["ok"], status
        from umvd_live.daemon.transport import CONTROL_MAX_MSG_BYTES

        assert len(just_over) < CONTROL_MAX_MSG_BYTES < 8 << 20
    finally:
        _stop_daemon(d, loop)


def test_an_error_in_the_input_thread_does_not_end_it():
    """A MemoryError (or a bug) while a message is taken is logged and counted; the thread goes
    on taking frames (before, it ended silently and the daemon took no more input)."""
    from umvd_live.daemon.config import DaemonConfig
    from umvd_live.daemon.transport import Inbox, InputReceiver

    inbox = Inbox(max_bytes=1 << 20)
    put = inbox.put
    failures = [MemoryError()]

    def failing_put(item):
        if failures:
            raise failures.pop()
        return put(item)

    inbox.put = failing_put  # type: ignore[method-assign]
    ctx = zmq.Context()
    receiver = InputReceiver(ctx, DaemonConfig(input_bind="tcp://127.0.0.1:*"), inbox)
    receiver.start()
    pub = ctx.socket(zmq.XPUB)
    pub.setsockopt(zmq.LINGER, 0)
    try:
        pub.connect(receiver.endpoints[0])
        assert pub.poll(10_000), "the receiver never subscribed"
        pub.recv()
        pub.send_multipart([b"first", b"", b""])  # its put raises
        pub.send_multipart([b"second", b"", b""])
        deadline = time.monotonic() + 10
        while len(inbox) == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert receiver.is_alive() and receiver.errors == 1
        assert [item.parts[0] for item in inbox.drain(0)] == [b"second"]
    finally:
        receiver.stop()
        pub.close()
        ctx.term()


def _publish_and_wait(pub: FramePublisher, client: ControlClient, count: int, frames_in: int) -> None:
    """Publish ``count`` frames, then wait until the daemon's status counts ``frames_in`` on the stream."""
    for _ in range(count):
        assert pub.publish(np.full((16, 16), 7, np.uint16))
    deadline = time.monotonic() + 30
    while client.request("status")["streams"].get(pub.stream, {}).get("frames_in") != frames_in:
        assert time.monotonic() < deadline, f"the daemon never counted {frames_in} frames"
        time.sleep(0.05)


def test_a_command_that_raises_is_answered_with_its_error_and_the_daemon_serves_on(tmp_path, monkeypatch, caplog):
    """A command whose handling raises gets a reply in the format of every refusal that names the
    command and the exception, is logged with its traceback and counted (``control.failed``), and
    the daemon goes on taking frames and answering. Before, a failure outside the command's own
    call (its reply not a map) ended the frame loop: no reply (the client waited for its timeout),
    no more frames; and the reply to a command that raised named neither it nor a count. Reachable
    from outside: ``save_model`` into a folder that is a file raises on the state worker. A
    refusal (a request the daemon declines, weights for another network) is no failure."""
    save_checkpoint(tmp_path / "other-net.pt", {"w": torch.ones(1)}, {"step": 5, "foreign": True})
    (tmp_path / "blocker").write_bytes(b"")  # a file where save_model needs a folder
    d, loop = _serving_daemon(tmp_path, input_bind="tcp://127.0.0.1:*")
    client = ControlClient(d.endpoints["control"], timeout_s=10)
    pub = FramePublisher(d.endpoints["input"], "cam0")
    try:
        assert pub.wait_for_subscriber(10)
        _publish_and_wait(pub, client, 3, frames_in=3)
        monkeypatch.setattr(d, "stop_recording", lambda: None)  # a reply that is not a map (a bug)
        reply = client.request("record_stop")
        assert reply["ok"] is False and reply["error"].startswith("record_stop failed: TypeError: "), reply
        monkeypatch.setattr(d, "stop_recording", lambda: 1 / 0)  # a command that raises on the frame loop
        assert client.request("record_stop") == {
            "ok": False, "error": "record_stop failed: ZeroDivisionError: division by zero"}
        reply = client.request("save_model", path="blocker/cam0.pt")  # raises on the state worker
        assert reply["ok"] is False and reply["error"].startswith("save_model failed: FileExistsError: "), reply
        refused = client.request("load_model", path="other-net.pt")
        assert refused["ok"] is False and "another network" in refused["error"] and "failed" not in refused["error"]
        assert client.request("pause_training", stream="nope")["ok"] is False

        _publish_and_wait(pub, client, 3, frames_in=6)  # frames and commands go on
        assert client.request("save_model", path="cam0.pt")["ok"] and (tmp_path / "cam0.pt").is_file()
        control = client.request("status")["control"]
        assert (control["failed"], control["errors"]) == (3, 0), control
        failures = [r for r in caplog.records if r.getMessage().startswith("control command")]
        assert [r.getMessage() for r in failures] == ["control command record_stop failed"] * 2 + [
            "control command save_model failed"] and all(r.exc_info for r in failures)
        assert loop.is_alive()
    finally:
        client.close()
        pub.close()
        _stop_daemon(d, loop)


def test_the_socket_threads_errors_are_in_the_status(tmp_path, monkeypatch):
    """An unexpected error in the input or the control thread's loop is logged and the thread goes
    on (`test_an_error_in_the_input_thread_does_not_end_it`); ``status`` counts them
    (``inbox.errors``, ``control.errors``, with the control socket's other counters), as the
    terminal status does: before, they were in the log only."""
    from umvd_live.daemon.status import render_lines

    d, loop = _serving_daemon(tmp_path, input_bind="tcp://127.0.0.1:*")
    control = d.transport.control
    assert control is not None
    put, send_ready = d.transport.inbox.put, control._send_ready
    failures = {"put": [MemoryError()], "send": [RuntimeError("a bug")]}

    def failing_put(item):
        if failures["put"]:
            raise failures["put"].pop()
        return put(item)

    def failing_send_ready(sock):
        if failures["send"]:
            raise failures["send"].pop()
        return send_ready(sock)

    monkeypatch.setattr(d.transport.inbox, "put", failing_put)
    monkeypatch.setattr(control, "_send_ready", failing_send_ready)
    client = ControlClient(d.endpoints["control"], timeout_s=10)
    pub = FramePublisher(d.endpoints["input"], "cam0")
    try:
        assert client.request("status")["ok"]  # its reply's turn fails; the next sends it
        assert pub.wait_for_subscriber(10)
        _publish_and_wait(pub, client, 3, frames_in=2)  # the first is lost to the MemoryError
        status = client.request("status")
        assert status["inbox"]["errors"] == 1 and status["inbox"]["overflow"] == 0
        assert set(status["control"]) == {"waiting", "busy", "late", "failed", "errors"}
        assert (status["control"]["errors"], status["control"]["busy"], status["control"]["failed"]) == (1, 0, 0)
        assert status["control"]["waiting"] >= 1  # this request's own reply, not sent yet
        assert "daemon: errors (see the log): input thread 1, control thread 1, commands failed 0" in \
            render_lines(status)
        assert control.is_alive() and d.transport.receiver is not None and d.transport.receiver.is_alive()
    finally:
        client.close()
        pub.close()
        _stop_daemon(d, loop)


def test_the_inbox_budget_counts_the_batch_the_frame_loop_still_holds():
    """--inbox-mb bounds what the daemon holds of its input: the batch the frame loop took is
    counted until it asks for the next, so the queue cannot fill up again meanwhile (2x)."""
    from umvd_live.daemon.transport import Inbox, Received

    def item() -> Received:
        return Received([b"t", b"h", bytes(1000)], 0.0, 1002)

    inbox = Inbox(max_bytes=2 * item().cost)
    assert inbox.put(item()) and inbox.put(item()) and not inbox.put(item())
    batch = inbox.drain(0)  # the loop works on these two
    assert len(batch) == 2 and inbox.nbytes == 0
    assert not inbox.put(item()) and inbox.overflow == 2
    assert inbox.drain(0) == []  # done with them
    assert inbox.put(item()) and inbox.put(item())
