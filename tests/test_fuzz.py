"""Protocol fuzz through a real daemon: 5000 malformed messages mixed into two valid streams
(tools/fuzz_daemon.py does the sending; the expectations below come from the protocol, not from
the daemon): nothing crashes or stalls, every rejection is counted under its reason and stream,
every valid frame is denoised, NaN/Inf pixels and finite ones that are no measurement (1e30) are
counted and never reach outputs or weights."""

from __future__ import annotations

from collections import Counter

import pytest
from tool_modules import load_tool

fuzz_daemon = load_tool("fuzz_daemon")


def test_the_plan_labels_every_malformed_message_as_the_protocol_says():
    plan = fuzz_daemon.build_plan(600, seed=1)
    assert plan.malformed == 600 and set(plan.sent_by_category) == set(fuzz_daemon.CATEGORIES)
    # The hand-written labels agree with the protocol's decoder (docs/protocol.md's table).
    from umvd_live.wire.protocol import ProtocolError, decode_frame

    for category, items in fuzz_daemon.FIXED.items():
        for parts, reason in items:
            with pytest.raises(ProtocolError) as err:
                decode_frame(parts)
            assert err.value.reason == reason, (category, parts[:2])


@pytest.mark.timeout(300)
def test_fuzz_5000_malformed_messages(tmp_path):
    r = fuzz_daemon.run_fuzz(5000, rate=4000.0, workdir=tmp_path, settle_s=120)
    st = r["status"]
    assert r["malformed_sent"] == 5000 and r["all_accounted"], r["log_tail"]

    # Every rejection counted, under the reason and on the stream the protocol prescribes.
    got = {name: Counter(s["rejected"]) for name, s in st["streams"].items()}
    got["-"] = Counter(st["rejected_unattributed"])
    expected = {s: Counter(c) for s, c in r["expected_rejections"].items()}
    assert got["-"] == expected["-"]
    assert got["cam0"] == expected["cam0"]
    assert not got["flt"]
    assert set(st["streams"]) == {"cam0", "flt"}  # junk under other names made no stream
    assert expected["cam0"]["bad_shape"] > 100 and expected["cam0"]["bad_dtype"] > 100
    assert st["inbox"]["overflow"] == 0

    # The daemon kept answering and stayed within bounded memory (a [100000, 100000] uint16
    # frame alone would be 20 GB: shapes are refused before anything is allocated).
    assert r["status_failures"] == 0 and r["status_requests"] > 0
    assert r["peak_rss_mb"] < 2048

    # Every valid frame was denoised, once, finite; the raw input was republished.
    for stream, indices in r["valid_indices"].items():
        assert sorted(r["denoised"][stream]) == sorted(indices), stream
        assert r["raw_republished"][stream] == len(indices)
    assert r["nonfinite_outputs"] == 0

    # seq anomalies on valid frames: counted, and the stream went on.
    cam0, flt = st["streams"]["cam0"], st["streams"]["flt"]
    assert {k: cam0[k] for k in ("drops", "seq_jumps", "seq_restarts")} == r["expected_seq"]["cam0"]

    # NaN/Inf pixels: counted, never trained on: the model learned on (loss, steps) and its
    # weights are finite; once live, frames with NaN/Inf still get live, finite outputs.
    assert flt["nonfinite_frames"] == r["nonfinite_frames_sent"] > 10
    assert flt["nonfinite_pixels"] == r["nonfinite_pixels_sent"]
    assert cam0["nonfinite_frames"] == 0
    assert r["flt_trained_before_tail"] and flt["model_step"] >= 20
    assert flt["loss"] is not None and flt["loss"] == flt["loss"]  # finite, not NaN
    assert r["flt_weights_finite"]
    assert r["tail_live_outputs"] >= r["tail_frames"] - 3  # the first may precede the switch

    assert r["shutdown"]["ok"] and r["exit_code"] == 0
    assert "exited cleanly" in r["log_tail"]
