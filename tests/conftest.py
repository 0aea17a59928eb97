"""Shared test fixtures."""

import threading
import time

import pytest
import zmq

from umvd_live.wire.protocol import StreamEnd, decode_message


class Receiver(threading.Thread):
    """A plain SUB socket (bound on an ephemeral port) decoding with `decode_message`: frames in
    ``frames``, stream ends in ``ends``.

    It polls all the time: a bound SUB only sends its subscription to a new publisher when its
    owner thread services the socket.
    """

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.sock = zmq.Context.instance().socket(zmq.SUB)
        self.sock.setsockopt(zmq.RCVHWM, 100000)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.bind("tcp://127.0.0.1:*")
        self.endpoint = self.sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.frames: list = []
        self.ends: list[StreamEnd] = []
        self._halt = threading.Event()
        self.start()

    def run(self) -> None:
        while not self._halt.is_set():
            if self.sock.poll(20):
                message = decode_message(self.sock.recv_multipart())
                (self.ends if isinstance(message, StreamEnd) else self.frames).append(message)
        self.sock.close(linger=0)

    def wait_for(self, count: int, timeout_s: float = 20.0) -> list:
        deadline = time.monotonic() + timeout_s
        while len(self.frames) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.1)  # and anything extra that would be a bug
        return list(self.frames)

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


@pytest.fixture
def receiver():
    """A loopback frame receiver that adapters publish to."""
    rx = Receiver()
    yield rx
    rx.stop()
