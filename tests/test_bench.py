"""`umvd-live bench`: every figure of the JSON is there, with a sane type; no timing is asserted.

The runs are real (the daemon, its engine with background training, loopback sockets), on tiny
64x64 streams so the file takes well under a minute on two shared cores.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from umvd_live.apps import cli
from umvd_live.apps.bench import PsnrAccumulator, _pieces
from umvd_live.engine import EngineConfig, StreamDenoiser
from umvd_live.engine.checkpoint import load_checkpoint
from umvd_live.metrics import psnr

torch.set_num_threads(1)

pytestmark = pytest.mark.timeout(120)

NUMBER_KEYS = ("fps_in", "peak_rss_mb", "train_steps_per_s", "duration_s")
INT_KEYS = ("frames", "skipped", "train_steps", "cpu_count", "torch_threads", "frames_handed",
            "frames_published", "frames_received_by_viewer", "frames_evaluated", "producer_late")
#: Figures that exist only once the stream is past its warm start.
LIVE_KEYS = ("fps_out", "latency_ms_p50", "latency_ms_p99", "psnr_raw_db", "psnr_denoised_db", "warmup_s",
             "skipped_after_warmup")
REQUIRED = set(NUMBER_KEYS + INT_KEYS + LIVE_KEYS) | {
    "device", "preset", "size", "rate_hz", "torch_version", "load_average", "engine", "mode", "init",
    "inference_only", "latency_ms_all", "latency_ms_worst", "first_live_seq", "gc", "rss_mb", "ring", "batch",
}

TINY = ["--size", "64", "64", "--preset", "lite", "--device", "cpu", "--ring-mb", "64"]


def bench(tmp_path, *extra: str) -> dict:
    out = tmp_path / "bench.json"
    assert cli.main(["bench", *TINY, *extra, "--json", str(out)]) == 0
    return json.loads(out.read_text())


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_common(result: dict, frames: int) -> None:
    assert REQUIRED <= result.keys(), REQUIRED - result.keys()
    for key in NUMBER_KEYS:
        assert is_number(result[key]) and result[key] >= 0, (key, result[key])
    for key in INT_KEYS:
        assert isinstance(result[key], int) and result[key] >= 0, (key, result[key])
    assert result["size"] == [64, 64] and result["frames"] == frames
    assert result["device"] == "cpu" and result["preset"] == "lite"
    assert isinstance(result["torch_version"], str) and result["torch_version"]
    assert set(result["load_average"]) == {"start", "end"} and all(map(is_number, result["load_average"].values()))
    assert result["engine"]["train_mode"] == "background" and result["engine"]["window"] == 7
    assert 10 < result["peak_rss_streaming_mb"] <= result["peak_rss_mb"]  # MB, not kB or bytes
    # Every frame was handed over and got exactly one output: published (and seen) or skipped.
    assert result["frames_handed"] == frames
    assert result["frames_published"] + result["skipped"] == frames
    assert result["frames_received_by_viewer"] == result["frames_published"]
    assert result["viewer_errors"] == 0 and result["inbox_refused"] == 0


def test_psnr_accumulator_is_metrics_psnr_of_the_stacked_frames():
    rng = np.random.default_rng(1)
    truth = rng.uniform(1000, 5000, (5, 16, 12)).astype(np.float32)
    estimate = truth + rng.normal(0, 200, truth.shape).astype(np.float32)
    acc = PsnrAccumulator()
    assert acc.psnr() is None
    for e, t in zip(estimate, truth):
        acc.add(e, t)
    assert acc.psnr() == pytest.approx(psnr(estimate, truth), abs=1e-9)


def test_paced_run_with_training_writes_every_figure(tmp_path):
    model = tmp_path / "model.pt"
    result = bench(tmp_path, "--frames", "60", "--rate", "60", "--warmup-frames", "10",
                   "--warmup-steps", "8", "--save-model", str(model), "--oracle", "none")
    check_common(result, 60)
    assert result["mode"] == "paced" and result["rate_hz"] == 60.0 and result["inference_only"] is False
    assert result["batch"] == 1, "one window at a time on a CPU"
    assert result["latency_target_ms"] == pytest.approx(3 / 60 * 1000 + 100)
    assert is_number(result["fps_in"]) and result["fps_in"] > 0
    # On a loaded machine the warm start may not finish within 60 frames: then the live-only
    # figures are null, never made up; once it did, they are all numbers.
    live = result["warmup_s"] is not None
    for key in LIVE_KEYS:
        if key != "fps_out":  # fps_out falls back to every output when none was live
            assert is_number(result[key]) if live else result[key] is None, (key, result[key])
    assert is_number(result["fps_out"])
    assert result["frames_evaluated"] > 0 if live else result["frames_evaluated"] == 0
    load_checkpoint(model)  # --save-model wrote a checkpoint the engine can start from
    assert result["saved_model"]["path"] == str(model)
    # The activity report (issue 14) over the live outputs, or why there is none; no scripted events.
    assert result["events"] is None and result["oracle"] == "none"
    [segment] = result["activity"]
    assert segment["segment"] == "live outputs"
    if "skipped" not in segment:
        assert segment["span"][0] == result["first_live_seq"] and segment["frames"] >= 30
        assert set(segment["rows"]) == {"raw", "temporal mean, 5 frames", "denoised"}
        assert all(is_number(segment["rows"]["denoised"][m]) for m in ("psnr", "active_psnr"))
        # and per kind of source (the simulator's somata, puncta, processes), in every row
        for row in segment["rows"].values():
            assert row["by_kind"] and set(row["by_kind"]) <= {"soma", "punctum", "process"}
    else:
        assert not live or result["frames_evaluated"] < 30
    assert sum(result["states"].values()) == result["frames_published"]  # every output, whatever its state
    assert set(result["first_output_s"]) == set(result["states"])


def test_max_rate_inference_only_from_saved_weights(tmp_path):
    init = tmp_path / "init.pt"
    with StreamDenoiser(EngineConfig(preset="lite", device="cpu", train_mode="inline")) as den:
        den.push(np.zeros((64, 64), np.uint16), infer=False)
        den.save_weights(init)
    result = bench(tmp_path, "--frames", "40", "--max", "--inference-only", "--init", str(init), "--batch", "4")
    check_common(result, 40)
    assert result["batch"] == 4 and result["engine"]["max_batch"] == 4
    assert result["mode"] == "max" and result["rate_hz"] is None and result["latency_target_ms"] is None
    assert result["inference_only"] is True and result["init"] == str(init)
    assert result["train_steps"] == 0
    # Loaded weights skip the warm start: every output is live, none is skipped.
    assert result["skipped"] == 0 and result["frames_evaluated"] == 40
    for key in LIVE_KEYS:
        assert is_number(result[key]), (key, result[key])
    assert result["psnr_raw_db"] > 0  # the raw frames against their truth, in dB


@pytest.mark.parametrize("args, message", [
    (["--frames", "0"], "--frames"),
    (["--frames", "10", "--duration", "1"], "not both"),
    (["--events", "laser=3"], "bad event"),
    (["--events", "default", "--max"], "one paced stream"),
    (["--events", "default", "--streams", "2"], "one paced stream"),
    (["--init", "/nonexistent/weights.pt"], "weights.pt"),
    (["--size", "4", "4"], "8x8"),
    (["--ring-mb", "inf"], "--ring-mb must be a finite number > 0"),
    (["--rate", "inf"], "--rate must be a finite number > 0"),
    (["--rate", "inf", "--duration", "5"], "--rate must be a finite number > 0"),
    (["--duration", "inf"], "--duration needs"),
    (["--rss-every", "0"], "--rss-every must be a finite number > 0"),
    (["--rss-every", "nan"], "--rss-every must be a finite number > 0"),
    (["--events", "laser=3@99s", "--duration", "1"], "--events: an event at 99 s is at or after the session's end"),
    (["--events", "laser=3@1", "--frames", "30"], "at or after the session's end"),
    (["--events", "laser=3@1.99s", "--frames", "60"], "after the session's last frame (frame 59)"),
    (["--photons", "inf"], "--photons must be a finite number > 0"),
    (["--catchup-ms", "-5"], "--catchup-ms must be >= 0 ms, got -5"),
    (["--seed", "-1"], "seed must be in 0..2**63-1, got -1"),
    (["--prior", "/nonexistent/prior.pt"], "--prior: /nonexistent/prior.pt"),
    (["--score-every", "0"], "--score-every must be a finite number > 0, got 0"),
    (["--score-every", "nan"], "--score-every must be a finite number > 0, got nan"),
])
def test_bad_arguments_are_refused_with_a_clear_error(tmp_path, capsys, args, message):
    assert cli.main(["bench", *TINY, *args, "--json", str(tmp_path / "b.json")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "b.json").exists()


def test_an_existing_folder_for_a_file_is_refused_before_the_session(tmp_path, capsys):
    for flag in ("--save-model", "--json", "--save-outputs"):
        args = ["--json", str(tmp_path / "b.json"), flag, str(tmp_path)]
        assert cli.main(["bench", *TINY, "--frames", "5", *args]) == 2
        assert f"{flag}: {tmp_path} is a folder" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_several_streams_interleaved_have_a_row_each_and_totals(tmp_path):
    result = bench(tmp_path, "--frames", "40", "--rate", "60", "--warmup-frames", "10", "--warmup-steps", "8",
                   "--streams", "3")
    names = ["sim.c0", "sim.c1", "sim.c2"]
    assert REQUIRED <= result.keys() and result["stream_names"] == names and result["stream_count"] == 3
    rows = result["streams"]
    assert list(rows) == names
    # Each its own field of view and brightness.
    assert [rows[n]["photons"] for n in names] == [2.0, 1.0, 4.0] and [rows[n]["seed"] for n in names] == [0, 1, 2]
    for name in names:
        row = rows[name]
        assert row["frames_handed"] == 40 and row["frames_published"] + row["skipped"] == 40
        assert row["frames_received_by_viewer"] == row["frames_published"]
        assert is_number(row["fps_in"]) and row["fps_in"] > 0
    # The top level is the total.
    assert result["frames"] == 40 and result["frames_handed"] == 120
    for key in ("frames_published", "frames_received_by_viewer", "skipped", "train_steps", "frames_evaluated"):
        assert result[key] == sum(rows[n][key] for n in names), key
    assert result["fps_in"] == pytest.approx(sum(rows[n]["fps_in"] for n in names))
    assert result["viewer_errors"] == 0 and result["inbox_refused"] == 0
    # The daemon's own verdict, with the budget its three engines shared.
    capacity = result["capacity"]
    assert set(capacity["skipped"]) == set(names) and isinstance(capacity["over"], bool)
    assert capacity["budget"]["engines"] == 3 and capacity["budget"]["cores"] == result["cpu_count"]


def test_streams_must_be_at_least_one(tmp_path, capsys):
    assert cli.main(["bench", *TINY, "--streams", "0", "--json", str(tmp_path / "b.json")]) == 2
    assert "--streams" in capsys.readouterr().err


def test_scripted_session_bins_psnr_after_each_change(tmp_path):
    """--events: the issue-15 session scaled to 4 s at 60 Hz. What is asserted is the harness, not the
    engine: every bin and state is accounted for, and the raw frames' PSNR follows the laser."""
    result = bench(tmp_path, "--events", "default", "--duration", "4", "--rate", "60", "--warmup-frames", "20",
                   "--warmup-steps", "8", "--oracle", "none", "--score-every", "0.6")
    assert result["frames"] == 240 and result["frames_handed"] == 240
    events = result["events"]
    assert [row["change"] for row in events["rows"]] == ["stream start", "laser ×3", "stage move 40 px", "laser ×1/3"]
    assert [row["first_seq"] for row in events["rows"]] == [0, 120, 160, 200]
    assert events["bins_s"] == [[0, 0.25], [0.25, 0.5], [0.5, 1], [1, 2], [2, 4], [4, 8]]
    outputs = 0
    for row, end in zip(events["rows"], [120, 160, 200, 240]):
        frames = [b["frames"] for b in row["bins"]]
        assert sum(frames) == end - row["first_seq"] and frames[0] == 15, row  # every frame to the next change
        for b in row["bins"]:
            assert b["outputs"] == sum(b["states"].values()) <= b["frames"]
            outputs += b["outputs"]
    assert outputs == result["frames_published"]
    # The laser x3 brightens the raw frames (their PSNR against the truth's range rises; less than
    # 4.8 dB, since the read noise stays), x1/3 dims them again.
    first = [row["bins"][0]["psnr_raw_db"] for row in events["rows"]]
    assert first[1] > first[0] + 2.0 and first[3] < first[1] - 2.0, first
    # An activity segment per change, each with its own footprints; scored or not, said why.
    assert [a["segment"] for a in result["activity"]] == [row["change"] for row in events["rows"]]
    # --score-every: each scored segment again in spans of 36 frames (0.6 s at 60 Hz) that cover its
    # frames exactly, in order (a rest under 18 frames joins the span before it), each scored as
    # its segment is (30 frames at least) or said why not
    scored = 0
    for segment in result["activity"]:
        spans = [a for a in result["activity_over_time"] if a["segment"] == segment["segment"]]
        if "span" not in segment:
            assert spans == [] or [a["skipped"] for a in spans] == [segment["skipped"]]
            continue
        first, last = segment["span"]
        assert [(a["span"][0], a["span"][1] + 1) for a in spans] == _pieces(first, last + 1, 36)
        for a in spans:
            assert (a["from_s"], a["to_s"]) == (round(a["span"][0] / 60, 3), round((a["span"][1] + 1) / 60, 3))
            assert a["at_s"] == segment["at_s"]
            if "skipped" not in a:
                assert a["frames"] >= 30 and is_number(a["rows"]["denoised"]["trace_corr"])
                scored += 1
    assert scored or result["warmup_s"] is None or result["warmup_s"] > 3.0
    assert result["first_output_s"] and result["first_live_output_s"] == result["first_output_s"].get("live")
    assert "changes" in result  # the daemon's count where it reports one, else None


def test_score_every_cuts_a_span_into_pieces_a_short_rest_joining_the_last():
    assert _pieces(10, 100, 30) == [(10, 40), (40, 70), (70, 100)]
    assert _pieces(10, 110, 30) == [(10, 40), (40, 70), (70, 110)]  # a rest of 10 < 15 joins
    assert _pieces(10, 125, 30) == [(10, 40), (40, 70), (70, 100), (100, 125)]  # 25 >= 15 stands
    assert _pieces(0, 20, 30) == [(0, 20)]
    assert _pieces(5, 5, 30) == []


def test_adapting_outputs_count_in_the_steady_state(monkeypatch):
    """The outputs within 90 frames after a detected change ("adapting") are the network's own: the
    rate, latency and PSNR take them, else fps_out, over a span that still covers them, reads low."""
    from types import SimpleNamespace

    from umvd_live.apps import bench as b

    frames, rate = 600, 30.0
    clean = np.arange(frames * 16, dtype=np.float32).reshape(frames, 4, 4) % 7
    ring = b.FrameRing(np.zeros((frames, 4, 4), np.uint16), clean, 0.0, None)
    monitor = b.OutputMonitor("tcp://127.0.0.1:9", [("bench", ring)], frames)
    states = ["warmup"] * 100 + ["live"] * 200 + ["adapting"] * 90 + ["live"] * 210
    header = {}
    monkeypatch.setattr(monitor._subscriber, "decode",
                        lambda parts: SimpleNamespace(header=header, stream="bench", image=np.ones((4, 4))))
    for seq, state in enumerate(states):
        header.update(seq=seq, latency_ms=10.0, state=state)
        monitor._take([b"bench"])
    monitor._subscriber.close()
    monkeypatch.setattr(b, "_activity", lambda *a: [])
    monkeypatch.setattr(b, "_activity_over_time", lambda *a: None)
    monkeypatch.setattr(b, "ring_photons", lambda *a: 1.0)
    producer = SimpleNamespace(handed=(np.arange(frames) / rate)[None, :])
    cfg = SimpleNamespace(frames=frames, height=4, width=4)
    daemon_cfg = SimpleNamespace(engine=SimpleNamespace(window=7, seed=0))
    fig = b._stream_figures(cfg, daemon_cfg, 0, ring, producer, monitor, {}, {"frames_out": frames},
                            b._Progress(live_at=1.0), 30.0)
    assert fig["fps_out"] == pytest.approx(rate)
    assert fig["frames_evaluated"] == frames - 100
    assert fig["first_live_seq"] == 100
    assert fig["states"] == {"warmup": 100, "live": 410, "adapting": 90}


def test_json_is_strict_non_finite_figures_are_null(tmp_path, monkeypatch):
    """A NaN trace mean (no cell qualifies) or an infinite PSNR is written as null: bare NaN or
    Infinity is not JSON, and strict parsers (jq, JSON.parse) refuse the file."""
    from umvd_live.apps import bench as b

    result = {"frames_published": 1, "psnr_denoised_db": math.inf,
              "activity": [{"rows": {"denoised": {"trace_corr": math.nan, "lag_frames": np.float32("nan")}}}],
              "load_average": (1.0, -math.inf)}
    monkeypatch.setattr(b, "measure", lambda config: result)
    monkeypatch.setattr(b, "print_table", lambda result: None)
    out = tmp_path / "b.json"
    config = cli.bench_config(cli.build_parser().parse_args(["bench", *TINY, "--json", str(out)]))
    assert b.run(config) == 0

    def refuse(constant):
        raise ValueError(constant)

    written = json.loads(out.read_text(), parse_constant=refuse)
    assert written["psnr_denoised_db"] is None and written["load_average"] == [1.0, None]
    assert written["activity"][0]["rows"]["denoised"] == {"trace_corr": None, "lag_frames": None}


def test_the_pmt_gain_is_lowered_for_any_bright_stream_not_only_a_scripted_session():
    """Above 2 photons/pixel/frame at the brightest (--photons, a stream's BRIGHTNESS, a laser
    step) `bench` and `demo` lower the PMT gain in proportion, with or without --events: at the
    full gain --photons 8 (or stream 2, brightness 2) clips at 65535, and the truth is no longer
    the noisy frames' expected value. At the defaults the simulator is the one it always was."""
    from umvd_live.adapters.simulation import SimConfig, SimEvent, TwoPhotonSimulator
    from umvd_live.apps import harness
    from umvd_live.apps.harness import GAIN_PHOTONS, sim_config

    full = SimConfig().gain_adu
    assert sim_config(64, 64, 30.0, 2.0, 0) == SimConfig(height=64, width=64, rate_hz=30.0, photons=2.0, seed=0)
    assert sim_config(64, 64, 30.0, 2.0, 1, stream=1).gain_adu == full  # 1 photon
    assert sim_config(64, 64, 30.0, 2.0, 3, stream=3).gain_adu == full  # 1.5 photons
    assert sim_config(64, 64, 30.0, 8.0, 0).gain_adu == full * GAIN_PHOTONS / 8.0
    assert sim_config(64, 64, 30.0, 2.0, 2, stream=2).gain_adu == full * GAIN_PHOTONS / 4.0
    session = (SimEvent.laser(1.0, 3.0), SimEvent.laser(2.0, 1 / 3))
    assert sim_config(64, 64, 30.0, 2.0, 0, events=session).gain_adu == pytest.approx(723.33, abs=0.01)
    assert harness.fit_gain(SimConfig(photons=0.5, events=(SimEvent.laser(1.0, 4.0),))).gain_adu == full
    config = sim_config(64, 64, 30.0, 8.0, 0)
    noisy, clean = TwoPhotonSimulator(config).movie(150)
    assert clean.max() < 40000 and not (noisy == 65535).any()  # 0.46 % clipped at the full gain


def test_an_event_after_the_last_frame_is_refused_naming_the_last_time_allowed():
    """60 frames at 30 Hz end at 2 s, but the last frame is taken at 1.967 s: an event at 1.99 s
    takes effect from frame 60 (`SimEvent.first_frame`), which is never taken, yet would still lower
    the PMT gain for the session. Refused, naming the last time that is allowed (a frame's)."""
    from umvd_live.apps.harness import session_events

    with pytest.raises(ValueError, match=r"1\.99 s is after the session's last frame \(frame 59\).*"
                                         r"the last time allowed is 1\.966 s"):
        session_events("laser=3@1.99s", 60 / 30.0, rate_hz=30.0)
    with pytest.raises(ValueError, match="last frame"):
        session_events("laser=3@1.967s", 2.0, rate_hz=30.0)
    (event,) = session_events("laser=3@1.966s", 2.0, rate_hz=30.0)
    assert event.first_frame(30.0) == 59
    assert session_events("laser=3@1/2", 2.0, rate_hz=30.0)[0].first_frame(30.0) == 30
    with pytest.raises(ValueError, match=r"at or after the session's end \(2 s\).*last time allowed is 1\.966 s"):
        session_events("laser=3@2s", 2.0, rate_hz=30.0)


def test_saved_outputs_are_the_frames_the_figures_were_measured_on(tmp_path):
    """--save-outputs keeps the live run's frames for pictures: the raw and truth of the ring, and
    each output where it came (NaN where the preview skipped), its state beside it. The bench's
    own PSNR comes back from them."""
    path = tmp_path / "live.npz"
    result = bench(tmp_path, "--frames", "60", "--rate", "60", "--warmup-frames", "16", "--warmup-steps", "8",
                   "--save-outputs", str(path))
    with np.load(path) as saved:
        raw, truth, den, state = (saved[f"bench.{k}"] for k in ("raw", "truth", "denoised", "state"))
        states = list(saved["states"])
        assert float(saved["bench.offset_adu"]) > 0
    assert raw.shape == truth.shape == den.shape == (60, 64, 64) and raw.dtype == np.uint16
    assert state.shape == (60,) and (state >= 0).sum() == result["frames_published"]
    assert np.isnan(den[state < 0]).all() and np.isfinite(den[state >= 0]).all()
    with np.load(path) as saved:  # what each output was made with
        steps, gains = saved["bench.model_step"], saved["bench.amplitude_gain"]
    assert (steps[state >= 0] >= 0).all() and (steps[state < 0] == -1).all()
    assert (gains[state >= 0] > 0).all() and np.isnan(gains[state < 0]).all()
    warmup = states.index("warmup") if "warmup" in states else -1  # (a prior may skip the warm-up outputs)
    steady = (state >= 0) & (state != warmup)
    assert steady.sum() == result["frames_evaluated"] > 0
    assert psnr(den[steady], truth[steady]) == pytest.approx(result["psnr_denoised_db"], abs=0.01)
    assert psnr(raw[steady].astype(np.float32), truth[steady]) == pytest.approx(result["psnr_raw_db"], abs=0.01)


def test_save_outputs_must_be_an_npz(tmp_path, capsys):
    assert cli.main(["bench", *TINY, "--save-outputs", str(tmp_path / "x.tif")]) == 2
    assert "--save-outputs" in capsys.readouterr().err and list(tmp_path.iterdir()) == []
