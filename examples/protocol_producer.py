"""A producer for `umvd-live serve` written only from docs/protocol.md (pyzmq, msgpack, numpy).

It streams a synthetic noisy movie at a fixed rate, mixes malformed messages in, collects the
denoised frames from the output socket, asks the daemon for its status and (with --shutdown)
shuts it down, then prints a summary. Exit status 0 when the daemon met the protocol's promises:
at least --min-fraction of the frames came back denoised, in seq order, with a latency in every
header and a state the protocol names, the network's own output (state "live") among them, and
the daemon still answered after the malformed messages. A "warmup" frame after a "live" one is no
failure: it is the window's temporal mean, shown while the model is not yet better than it (the
referee judges every frame of the warm start, from the first with the shipped prior, and those
within 90 frames of an abrupt change); the summary counts the frames of each state.

    umvd-live serve --preset lite &
    python examples/protocol_producer.py --frames 600 --size 128 128 --rate 30 --shutdown
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time

import msgpack
import numpy as np
import zmq

#: The states a denoised frame's header may carry (docs/protocol.md, "Output messages").
DOCUMENTED_STATES = {"live", "warmup", "adapting"}


def malformed_messages(stream: bytes, rng: np.random.Generator) -> list[list[bytes]]:
    """One of each kind of broken message the protocol says the daemon must survive."""
    good = {"v": 1, "seq": 0, "shape": [16, 16], "dtype": "<u2"}
    px = bytes(16 * 16 * 2)
    pack = msgpack.packb
    return [
        [stream, pack(good)],                                             # 2 parts
        [stream, pack(good), px, b"extra"],                               # 4 parts
        [stream, rng.bytes(40), px],                                      # not msgpack
        [stream, pack([1, 2, 3]), px],                                    # not a map
        [stream, pack({"v": 1, "shape": [16, 16], "dtype": "<u2"}), px],  # no seq
        [stream, pack(good | {"dtype": ">f8"}), px],                      # unsupported dtype
        [stream, pack(good | {"shape": [100000, 100000]}), px],           # absurd shape
        [stream, pack(good | {"shape": [-4, 16]}), px],                   # negative shape
        [stream, pack(good), px[:-2]],                                    # size != shape
        [b"\xff\xfe", pack(good), px],                                    # topic not UTF-8
    ]


class Collector(threading.Thread):
    """Reads the denoised frames of one stream from the daemon's output socket."""

    def __init__(self, ctx: zmq.Context, endpoint: str, stream: str):
        super().__init__(daemon=True)
        self.sock = ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.RCVHWM, 100000)
        self.sock.connect(endpoint)
        self.sock.setsockopt(zmq.SUBSCRIBE, f"{stream}/".encode())
        self.headers: list[dict] = []
        self.raw_seen = 0
        self.bad = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            if not self.sock.poll(100):
                continue
            topic, head, pixels = self.sock.recv_multipart()
            header = msgpack.unpackb(head)
            if topic.endswith(b"/raw"):
                self.raw_seen += 1
                continue
            image = np.frombuffer(pixels, dtype=header["dtype"]).reshape(header["shape"])
            if image.dtype != np.float32 or not np.isfinite(image).all():
                self.bad += 1
            self.headers.append(header)
        self.sock.close(linger=0)


def request(ctx: zmq.Context, endpoint: str, msg: dict, timeout_ms: int = 15000) -> dict:
    req = ctx.socket(zmq.REQ)
    req.setsockopt(zmq.RCVTIMEO, timeout_ms)
    req.setsockopt(zmq.LINGER, 0)
    req.connect(endpoint)
    try:
        req.send(msgpack.packb(msg))
        return msgpack.unpackb(req.recv())
    finally:
        req.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", default="tcp://127.0.0.1:5555")
    ap.add_argument("--output", default="tcp://127.0.0.1:5556")
    ap.add_argument("--control", default="tcp://127.0.0.1:5557")
    ap.add_argument("--stream", default="cam0")
    ap.add_argument("--frames", type=int, default=600)
    ap.add_argument("--size", type=int, nargs=2, default=(128, 128), metavar=("H", "W"))
    ap.add_argument("--rate", type=float, default=30.0)
    ap.add_argument("--photons", type=float, default=20.0, help="mean photons per pixel")
    ap.add_argument("--malformed-every", type=int, default=20, help="a malformed message every K frames (0: none)")
    ap.add_argument("--shutdown", action="store_true", help="send `shutdown` at the end")
    ap.add_argument("--min-fraction", type=float, default=0.95)
    ap.add_argument("--json", help="write the summary here")
    args = ap.parse_args()

    ctx = zmq.Context()
    collector = Collector(ctx, args.output, args.stream)
    collector.start()

    pub = ctx.socket(zmq.XPUB)
    pub.setsockopt(zmq.SNDHWM, 1000)
    pub.connect(args.input)
    if not pub.poll(10000):
        print(f"no daemon subscribed at {args.input}", file=sys.stderr)
        return 2
    pub.recv()  # the daemon's subscription
    time.sleep(1.0)  # let our own output subscription reach the daemon too (slow-joiner rule)

    rng = np.random.default_rng(0)
    h, w = args.size
    yy, xx = np.mgrid[:h, :w]
    bad = malformed_messages(args.stream.encode(), rng)
    topic = args.stream.encode()
    sent = dropped = malformed = 0
    t0 = time.time()
    for seq in range(args.frames):
        clean = args.photons * (1 + 0.6 * np.sin(xx / 9 + seq / 15) * np.cos(yy / 11 - seq / 40))
        image = rng.poisson(clean).astype("<u2")
        header = {"v": 1, "seq": seq, "shape": [h, w], "dtype": image.dtype.str,
                  "t": time.time() - t0, "meta": {"source": "protocol_producer", "frame": seq}}
        try:
            pub.send_multipart([topic, msgpack.packb(header), image.tobytes()], flags=zmq.NOBLOCK)
            sent += 1
        except zmq.Again:
            dropped += 1
        if args.malformed_every and seq % args.malformed_every == args.malformed_every // 2:
            try:
                pub.send_multipart(bad[malformed % len(bad)], flags=zmq.NOBLOCK)
                malformed += 1
            except zmq.Again:
                pass
        time.sleep(max(0.0, t0 + (seq + 1) / args.rate - time.time()))
    send_s = time.time() - t0

    # Everything but the last N//2 frames is out once the window has moved past them: wait
    # until the output has been quiet for a second.
    seen, quiet_since = -1, time.time()
    while time.time() - quiet_since < 1.0:
        if len(collector.headers) != seen:
            seen, quiet_since = len(collector.headers), time.time()
        time.sleep(0.05)
    status = request(ctx, args.control, {"cmd": "status"})
    reply = request(ctx, args.control, {"cmd": "shutdown"}) if args.shutdown else None
    time.sleep(1.0)  # the flushed frames
    collector.stop.set()
    collector.join()
    pub.close(linger=0)
    ctx.term()

    heads = collector.headers
    seqs = [hd["seq"] for hd in heads]
    first_live = next((i for i, hd in enumerate(heads) if hd["state"] == "live"), None)
    latencies = [hd["latency_ms"] for hd in heads if isinstance(hd.get("latency_ms"), (int, float))]
    live_latencies = [hd["latency_ms"] for hd in heads
                      if hd.get("state") == "live" and isinstance(hd.get("latency_ms"), (int, float))]
    states: dict[str, int] = {}
    for hd in heads:
        states[hd.get("state")] = states.get(hd.get("state"), 0) + 1
    stream_status = status.get("streams", {}).get(args.stream, {})
    summary = {
        "frames_sent": sent, "send_dropped": dropped, "malformed_sent": malformed,
        "send_fps": round(sent / send_s, 2),
        "denoised_received": len(heads),
        "fraction_received": round(len(heads) / max(sent, 1), 4),
        "in_order": seqs == sorted(seqs) and len(set(seqs)) == len(seqs),
        "meta_carried": all(hd.get("meta", {}).get("frame") == hd["seq"] for hd in heads),
        "first_live_seq": heads[first_live]["seq"] if first_live is not None else None,
        "states": states,  # frames received per state: "live", "warmup", "adapting" (the protocol's)
        "states_documented": set(states) <= DOCUMENTED_STATES,
        "latency_in_every_header": len(latencies) == len(heads),
        "latency_ms_median": round(statistics.median(latencies), 1) if latencies else None,
        "latency_ms_p99": round(float(np.percentile(latencies, 99)), 1) if latencies else None,
        "latency_ms_median_live": round(statistics.median(live_latencies), 1) if live_latencies else None,
        "last_model_step": heads[-1]["model_step"] if heads else None,
        "bad_images": collector.bad,
        "raw_received": collector.raw_seen,
        "status_ok_after_malformed": bool(status.get("ok")),
        "status_rejected": stream_status.get("rejected"),
        "status_rejected_unattributed": status.get("rejected_unattributed"),
        # how far the warm start got (1.0: done); until then the referee may show the mean ("warmup")
        "status_warmup_progress": (round(stream_status["warmup_progress"], 3)
                                   if isinstance(stream_status.get("warmup_progress"), float)
                                   else stream_status.get("warmup_progress")),
        "status_skipped": stream_status.get("skipped"),
        "status_drops": stream_status.get("drops"),
        "shutdown_reply": reply,
    }
    print(json.dumps(summary, indent=1))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(summary, fh, indent=1)
    ok = (summary["fraction_received"] >= args.min_fraction and summary["in_order"]
          and first_live is not None and summary["states_documented"] and summary["latency_in_every_header"]
          and summary["status_ok_after_malformed"] and collector.bad == 0
          and (reply is None or reply.get("ok")))
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
