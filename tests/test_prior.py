"""The priors shipped in the package (`umvd_live.engine.priors`) and the referee that shows them only
while they beat the temporal mean on the stream's own frames."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from umvd_live.adapters.simulation import SimConfig, TwoPhotonSimulator
from umvd_live.engine import EngineConfig, StreamDenoiser
from umvd_live.engine.checkpoint import CheckpointError, save_checkpoint
from umvd_live.engine.model import PRESETS, UMVDNet
from umvd_live.engine.priors import find_prior, shipped_path


def _stream(frames: int = 40, size: int = 64, seed: int = 11) -> tuple[np.ndarray, np.ndarray]:
    return TwoPhotonSimulator(SimConfig(height=size, width=size, photons=2.0, seed=seed)).movie(frames)


def _run(movie: np.ndarray, prior: str) -> tuple[list, StreamDenoiser]:
    config = EngineConfig(preset="lite", device="cpu", train_mode="inline", steps_per_frame=0.0, prior=prior)
    den = StreamDenoiser(config)
    outputs = [o for frame in movie for o in den.push(frame)] + den.flush()
    den.close()
    return outputs, den


@pytest.mark.parametrize("preset", ["lite", "fast"])
def test_a_prior_ships_for_each_cpu_preset(preset: str) -> None:
    prior = find_prior("auto", preset, PRESETS[preset](7))
    assert prior is not None and prior.name == shipped_path(preset, 7).name
    assert "tools/train_prior.py" in prior.info["trained"]
    assert find_prior("auto", preset, PRESETS[preset](5)) is None  # made for N = 7 only


def test_a_stream_starts_live_on_the_prior() -> None:
    noisy, clean = _stream()
    outputs, den = _run(noisy, "auto")
    assert den.prior is not None and den.start_hash == den.prior.sha256
    live = [o.index for o in outputs if o.state == "live"]
    assert len(live) >= 0.8 * len(outputs)  # from its first full window, before any training
    assert den.stats()["prior"]["sha256"] == den.prior.sha256
    # and it is better than the temporal mean it replaces (judged here with the truth)
    scratch, _ = _run(noisy, "none")
    assert all(o.state == "warmup" for o in scratch)
    err = lambda outs: np.mean([np.mean((o.image - clean[o.index]) ** 2) for o in outs])  # noqa: E731
    assert err(outputs) < 0.8 * err(scratch)


def test_a_prior_that_hurts_is_not_shown(tmp_path) -> None:
    """A prior with the right shape but wrong weights (a scaled random network): the referee sees
    it lose to the temporal mean on the stream's own frames and shows the mean instead."""
    torch.manual_seed(0)
    spec = PRESETS["lite"](7)
    net = UMVDNet(spec)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(3.0)
    bad = save_checkpoint(tmp_path / "bad.pt", net.state_dict(), {"preset": "lite", "spec": spec.to_dict()})
    noisy, _ = _stream()
    outputs, den = _run(noisy, str(bad))
    assert den.prior is not None and not den.referee.trusted
    shown = sum(o.state == "live" for o in outputs)
    assert shown <= 2, shown  # the referee may need its first frame or two
    scratch, _ = _run(noisy, "none")
    same = [np.array_equal(a.image, b.image) for a, b in zip(outputs, scratch) if a.state == "warmup"]
    assert all(same)  # what it shows instead is exactly the temporal mean


def test_a_prior_for_another_network_is_refused(tmp_path) -> None:
    spec = PRESETS["fast"](7)
    other = save_checkpoint(tmp_path / "fast.pt", UMVDNet(spec).state_dict(),
                            {"preset": "fast", "spec": spec.to_dict()})
    with pytest.raises(CheckpointError, match="another network"):
        find_prior(str(other), "lite", PRESETS["lite"](7))


def test_init_wins_over_the_prior(tmp_path) -> None:
    noisy, _ = _stream(frames=12)
    saved = tmp_path / "session.pt"
    with StreamDenoiser(EngineConfig(preset="lite", device="cpu", train_mode="inline", steps_per_frame=0.0)) as first:
        first.push_many(list(noisy[:4]))
        first.save_weights(saved)
    with StreamDenoiser(EngineConfig(preset="lite", device="cpu", train_mode="inline", init=str(saved))) as den:
        den.push(noisy[0])
        assert den.prior is None and den.state == "live"


def test_a_live_stream_given_a_prior_for_another_network_starts_from_scratch(tmp_path) -> None:
    """`serve --prior PATH` with `--preset auto`: a stream whose size picks another network must
    not stall on every frame; it says so and starts from scratch (a file run refuses, above)."""
    spec = PRESETS["fast"](7)
    other = save_checkpoint(tmp_path / "fast.pt", UMVDNet(spec).state_dict(),
                            {"preset": "fast", "spec": spec.to_dict()})
    noisy, _ = _stream(frames=8)
    config = EngineConfig(preset="lite", device="cpu", train_mode="background", prior=str(other))
    with StreamDenoiser(config) as den:
        den.push_many(list(noisy))
        assert den.prior is None and den.frames_in == 8


@pytest.mark.parametrize("spec", ["none", "even window", "not a dict"])
def test_a_model_file_without_a_readable_spec_is_refused_clearly(tmp_path, spec) -> None:
    """No spec, one that is no network (an even window) or not a dict: a CheckpointError that says
    so, for `--init` and `load_weights`; a live stream given it as its prior starts from scratch."""
    lite = PRESETS["lite"](3)
    info = {"none": {}, "even window": {"spec": {**lite.to_dict(), "window": 4}}, "not a dict": {"spec": "lite"}}[spec]
    path = save_checkpoint(tmp_path / "w.pt", UMVDNet(lite).state_dict(), {"preset": "lite", **info})
    frame = _stream(frames=1, size=32)[0][0]
    config = EngineConfig(preset="lite", device="cpu", window=3, prior="none")
    with StreamDenoiser(replace(config, init=str(path))) as den, pytest.raises(CheckpointError, match="spec"):
        den.push(frame)
    with StreamDenoiser(config) as den:
        den.push(frame)
        with pytest.raises(CheckpointError, match="spec"):
            den.load_weights(path)
    with StreamDenoiser(replace(config, prior=str(path), train_mode="background")) as den:
        den.push(frame)
        assert den.prior is None and den.frames_in == 1


def test_a_model_file_of_the_right_network_but_other_tensors_is_refused_before_any_is_copied(tmp_path) -> None:
    """Its spec fits, its tensors do not (one missing): `--init` says so with the file's name; a
    live stream given it as its prior logs it and starts from scratch instead of failing at
    every first frame."""
    lite = PRESETS["lite"](3)
    state = UMVDNet(lite).state_dict()
    state.pop(next(iter(state)))
    path = save_checkpoint(tmp_path / "w.pt", state, {"preset": "lite", "spec": lite.to_dict()})
    frame = _stream(frames=1, size=32)[0][0]
    config = EngineConfig(preset="lite", device="cpu", window=3, prior="none")
    with StreamDenoiser(replace(config, init=str(path))) as den, \
            pytest.raises(CheckpointError, match=r"w\.pt: weights for another network \(missing"):
        den.push(frame)
    with StreamDenoiser(replace(config, prior=str(path), train_mode="background")) as den:
        den.push(frame)
        assert den.prior is None and den.frames_in == 1
