"""Every command speaks the same way (issue 18, item 7): help on every command and option, one
``--log-level`` everywhere, one log format (`umvd_live.apps.logs`)."""

from __future__ import annotations

import argparse
import logging
import os
import re
import subprocess
import sys

import pytest
import torch

from umvd_live.apps import logs
from umvd_live.apps.cli import (
    acquire_config,
    bench_config,
    build_parser,
    daemon_config_from_args,
    demo_config,
    denoise_config,
    main,
    viewer_config,
)
from umvd_live.engine.device import DeviceUnavailable, pick_device, uses_bf16

LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (INFO|WARNING|DEBUG) ([\w.-]+): (.*)$")


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_every_command_and_option_has_help_and_a_log_level():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    summaries = {a.dest: a.help for a in sub._choices_actions}
    missing = []
    for name, command in sub.choices.items():
        if not summaries.get(name):
            missing.append(f"{name}: no summary in `umvd-live --help`")
        if not command.description:
            missing.append(f"{name}: no description in `umvd-live {name} --help`")
        for action in command._actions:
            if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
                continue  # -h; or an option hidden on purpose
            if not (action.help or "").strip():
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}: no help")
        assert "--log-level" in command._option_string_actions, f"{name} has no --log-level"
        # what `umvd-live NAME --help` prints: argparse formats the texts only then (a stray % fails)
        assert "--log-level" in command.format_help() and name in parser.format_help()
    assert not missing, "\n".join(missing)
    assert {"serve", "view", "acquire", "denoise"} <= set(sub.choices)


def test_log_level_parses_on_every_command():
    for name, command in _subcommands().items():
        action = command._option_string_actions["--log-level"]
        assert action.default == "info" and tuple(action.choices) == logs.LEVELS, name
    args = build_parser().parse_args(["acquire", "sim", "--log-level", "WARNING"])
    assert args.log_level == "warning"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--log-level", "loud"])


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, logging.getLogger("umvd_live").level,
             logging.getLogger("pymmcore-plus").level)
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in saved[0]:
        root.addHandler(handler)
    root.setLevel(saved[1])
    logging.getLogger("umvd_live").setLevel(saved[2])
    logging.getLogger("pymmcore-plus").setLevel(saved[3])


def test_one_format_our_level_and_libraries_warnings_only(restore_logging, capsys):
    library = logging.getLogger("pymmcore-plus")
    library.setLevel(logging.DEBUG)  # as pymmcore-plus sets its own logger
    logs.configure("info")
    logging.getLogger("umvd_live.daemon").info("ready")
    logging.getLogger("umvd_live.daemon").debug("not shown at info")
    library.debug("not shown: a library's debug")
    library.info("not shown: a library's info")
    library.warning("shown: a library's warning")
    lines = capsys.readouterr().err.splitlines()
    parsed = [LINE.match(line) for line in lines]
    assert all(parsed), lines
    assert [(m.group(1), m.group(2), m.group(3)) for m in parsed] == [
        ("INFO", "umvd_live.daemon", "ready"), ("WARNING", "pymmcore-plus", "shown: a library's warning")]

    logs.configure("warning")  # replaces the handler: no line twice
    logging.getLogger("umvd_live.viewer").info("quiet")
    logging.getLogger("umvd_live.viewer").warning("loud")
    assert [LINE.match(x).group(3) for x in capsys.readouterr().err.splitlines()] == ["loud"]

    logs.configure("debug")
    library.debug("everything at debug")
    logging.getLogger("umvd_live.recording.session").debug("ours too")
    assert [LINE.match(x).group(3) for x in capsys.readouterr().err.splitlines()] == [
        "everything at debug", "ours too"]


def test_serve_refuses_an_infinite_inbox_in_one_line(capsys):
    """inf would overflow in int() into a traceback."""
    assert main(["serve", "--inbox-mb", "inf"]) == 2
    err = capsys.readouterr().err
    assert "--inbox-mb must be a finite number > 0" in err and "Traceback" not in err


#: Free loopback ports for every socket of `serve`.
EPHEMERAL = ["--input", "tcp://127.0.0.1:*", "--output", "tcp://127.0.0.1:*", "--control", "tcp://127.0.0.1:*"]


def _umvd(*argv: str) -> subprocess.CompletedProcess[str]:
    """The real command in its own process: the exit status and what a user reads on stderr."""
    code = "import sys; from umvd_live.apps.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=60,
                          env=os.environ | {"QT_QPA_PLATFORM": "offscreen", "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("argv, message", [
    (["view", "--quit-after", "inf"], "umvd-live view: --quit-after must be a finite number > 0, got inf"),
    (["view", "--quit-after", "3000000"], "umvd-live view: --quit-after must be at most 2147483 s"),
    (["view", "--screenshot", "shot.png"], "umvd-live view: --screenshot needs --quit-after"),
    (["acquire", "sim", "--to", "127.0.0.1:5555"], "umvd-live acquire: --to must be an endpoint such as tcp://"),
    (["serve", *EPHEMERAL, "--seed", "-1"], "umvd-live serve: seed must be in 0..2**63-1, got -1"),
])
def test_a_mistake_gets_one_line_and_exit_status_2_before_anything_starts(argv, message):
    """The real command: one line naming the flag, no traceback, nothing started (no window, no
    socket, no daemon that says ready and then rejects every frame)."""
    proc = _umvd(*argv)
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(message), proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA device")
def test_serve_without_a_gpu_refuses_device_cuda_in_one_line():
    proc = _umvd("serve", *EPHEMERAL, "--device", "cuda")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == "umvd-live serve: --device cuda was asked for, but torch sees no CUDA device"


def test_a_missing_gpu_is_bad_input_for_serve_and_bench(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for argv in (["serve", *EPHEMERAL, "--device", "cuda"], ["bench", "--device", "cuda", "--size", "32", "32"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err == "umvd-live " + argv[0] + ": --device cuda was asked for, but torch sees no CUDA device\n"
    # denoise says so before reading its input (which can take minutes): here, before finding none
    assert main(["denoise", "missing.tif", "out.ome.tif", "--device", "cuda"]) == 2
    assert capsys.readouterr().err == ("umvd-live denoise: error: --device cuda was asked for, "
                                       "but torch sees no CUDA device\n")
    with pytest.raises(DeviceUnavailable):  # bad input (a ValueError) wherever the engine is made
        pick_device("cuda:1")
    # A GPU index beyond those there is refused up front too (here: a machine with two GPUs).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(DeviceUnavailable, match=r"--device cuda:2 .* sees 2 CUDA device\(s\): cuda:0 to cuda:1"):
        pick_device("cuda:2")


def test_bf16_by_default_only_on_the_engine_s_own_gpu_from_ampere_on(monkeypatch):
    """`torch.cuda.is_bf16_supported` says yes to emulated bf16 (pre-Ampere) and asks the current
    device: the compute capability of the engine's own device decides."""
    capabilities = {0: (8, 6), 1: (7, 5)}  # cuda:0 an Ampere, cuda:1 a Turing GPU
    asked: list[torch.device] = []

    def capability(device: torch.device) -> tuple[int, int]:
        asked.append(device)
        return capabilities[device.index]

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # emulation counts there
    assert uses_bf16("auto", torch.device("cuda:0"))
    assert not uses_bf16("auto", torch.device("cuda:1"))
    assert asked == [torch.device("cuda:0"), torch.device("cuda:1")]
    assert uses_bf16("bf16", torch.device("cuda:1")) and not uses_bf16("fp32", torch.device("cuda:0"))


def _parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


@pytest.mark.parametrize("flags, message", [
    (["--seed", "-1"], "seed must be in 0..2**63-1, got -1"),
    (["--seed", str(2**63)], "seed must be in 0..2**63-1"),
    (["--window", "1000001"], "window must be odd, from 3 to 101, got 1000001"),
    (["--catchup-ms", "-5"], "--catchup-ms must be >= 0 ms, got -5"),
    (["--status-interval", "0"], "--status-interval must be > 0 s"),
    (["--idle-s", "-1"], "--idle-s must be > 0 s"),
])
def test_serve_flags_are_checked_when_the_config_is_made(flags, message):
    with pytest.raises(ValueError) as refused:
        daemon_config_from_args(_parse("serve", *EPHEMERAL, *flags))
    assert message in str(refused.value)


@pytest.mark.parametrize("flags, message", [
    (["--steps-per-frame", "inf"], "steps_per_frame must be a finite number >= 0, got inf"),
    (["--steps-per-frame", "nan"], "steps_per_frame must be a finite number >= 0"),
    (["--blend-px", "inf"], "blend_px is a scale in pixels, finite and >= 0, got inf"),
    (["--threads", "0"], "--threads must be >= 1, got 0"),
    (["--batch", "0"], "--batch must be >= 1, got 0"),
    (["--seed", str(2**64)], "seed must be in 0..2**63-1"),
])
def test_denoise_flags_are_checked_before_the_movie_is_read(flags, message):
    with pytest.raises(ValueError) as refused:
        denoise_config(_parse("denoise", "in.tif", "out.ome.tif", *flags))
    assert message in str(refused.value)


def test_seeds_and_windows_are_taken_up_to_their_bounds_and_not_beyond():
    config = daemon_config_from_args(_parse("serve", *EPHEMERAL, "--seed", str(2**63 - 1), "--window", "101"))
    assert config.engine.seed == 2**63 - 1 and config.engine.window == 101
    for flags in (["--seed", str(2**63)], ["--window", "103"]):
        with pytest.raises(ValueError, match=flags[0][2:]):
            daemon_config_from_args(_parse("serve", *EPHEMERAL, *flags))


def test_a_model_path_that_is_a_folder_is_refused_before_denoising(tmp_path):
    with pytest.raises(ValueError, match="--save-model: .* is a folder"):
        denoise_config(_parse("denoise", "in.tif", "out.ome.tif", "--save-model", str(tmp_path)))


@pytest.mark.parametrize("flags, message", [
    (["--to", "127.0.0.1:5555"], "--to must be an endpoint such as tcp://127.0.0.1:5555"),
    (["--to", "tcp://127.0.0.1"], "--to must be an endpoint"),
    (["--wait-s", "nan"], "--wait-s must be a finite number of seconds >= 0, got nan"),
    (["--wait-s", "inf"], "--wait-s must be a finite number"),
    (["--wait-s", "-1"], "--wait-s must be a finite number"),
])
def test_acquire_refuses_a_malformed_endpoint_or_wait(flags, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        acquire_config(_parse("acquire", "sim", *flags))


def test_acquire_takes_the_endpoints_zeromq_connects_to_and_only_those():
    for to in ("tcp://127.0.0.1:5555", "tcp://[::1]:5555", "tcp://scope-pc.local:5555", "ipc:///tmp/umvd"):
        assert acquire_config(_parse("acquire", "sim", "--to", to, "--wait-s", "0")).publish.to == to
    for to in ("localhost:5555", "tcp://127.0.0.1:", "tcp://127.0.0.1:5555 "):
        with pytest.raises(ValueError, match="--to must be an endpoint"):
            acquire_config(_parse("acquire", "sim", "--to", to))


@pytest.mark.parametrize("flags, message", [
    (["--quit-after", "inf"], "--quit-after must be a finite number > 0, got inf"),
    (["--quit-after", "nan"], "--quit-after must be a finite number > 0"),
    (["--quit-after", "0"], "--quit-after must be a finite number > 0"),
    (["--quit-after", "3000000"], "--quit-after must be at most 2147483 s"),
    (["--screenshot", "shot.png"], "--screenshot needs --quit-after"),
])
def test_view_refuses_a_quit_time_qt_cannot_hold_or_a_screenshot_never_taken(flags, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        viewer_config(_parse("view", *flags))
    assert viewer_config(_parse("view", "--quit-after", "2147483", "--screenshot", "s.png")).output


#: Every flag (or argument) that names a file or folder, by command.
PATH_FLAGS = {
    "serve": ["--record", "--output-dir", "--state-dir", "--ready-file", "--init", "--prior",
              "--curve-server-key", "--curve-clients"],
    "denoise": ["input", "output", "--save-model", "--init", "--prior"],
    "batch": ["inputs", "--output-dir", "--manifest", "--scheduler", "--init", "--prior"],
    "bench": ["--json", "--save-model", "--init", "--prior"],
    "demo": ["--json"],
    "acquire": ["--file", "--config", "--mm-path", "--mda", "--save-dir"],
    "view": ["--screenshot"],
    "keys": ["directory"],
}


def test_a_leading_tilde_in_a_path_flag_is_the_home_folder(monkeypatch, tmp_path):
    """Windows shells and quoted paths leave ``~`` to the program: `serve --state-dir '~/umvd-state'`
    made ./~/umvd-state, `bench --json '~/sub/b.json'` wrote ./~/sub/b.json."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("USERPROFILE", str(tmp_path))  # Windows
    home = os.path.expanduser("~")
    commands = _subcommands()
    for name, flags in PATH_FLAGS.items():
        actions = {a.option_strings[0] if a.option_strings else a.dest: a for a in commands[name]._actions}
        for flag in flags:
            convert = actions[flag].type
            assert callable(convert), f"{name} {flag}: ~ not expanded"
            assert convert(os.path.join("~", "sub", "f")) == os.path.join(home, "sub", "f"), f"{name} {flag}"
            assert convert("auto") == "auto"  # --prior auto|none stays a word
    config = daemon_config_from_args(_parse("serve", *EPHEMERAL, "--state-dir", "~/umvd-state"))
    assert config.state_dir is not None and str(config.state_dir) == os.path.join(home, "umvd-state")
    bench = bench_config(_parse("bench", "--json", "~/sub/b.json"))
    assert bench.json_path is not None and str(bench.json_path) == os.path.join(home, "sub", "b.json")


#: `acquire` flags a source would fail on only after the daemon was waited for, or ignore.
ACQUIRE_MISTAKES = [
    (["sim", "--stream", "a b"], "--stream must be 1 to 64 letters, digits, '_', '.' or '-', got 'a b'"),
    (["sim", "--stream", "x" * 65], "--stream must be 1 to 64 letters"),
    (["replay", "--file", "movie.tif", "--stream", "a/b"], "--stream must be 1 to 64 letters"),
    (["sim", "--frames", "-3"], "--frames must be an integer >= 0, got -3"),
    (["sim", "--rate", "inf"], "--rate must be a finite number > 0, got inf"),
    (["replay", "--rate", "0"], "--rate must be a finite number > 0, got 0"),
    (["replay", "--rate", "nan"], "--rate must be a finite number > 0, got nan"),
    (["replay", "--frames", "-1"], "--frames must be an integer >= 0, got -1"),
    (["sim", "--photons", "inf"], "--photons must be a finite number > 0"),
    (["sim", "--seed", "-1"], "--seed must be an integer >= 0"),
    (["sim", "--size", "0", "64"], "--size must be positive"),
    (["replay", "--series", "-1"], "--series must be an integer >= 0"),
    (["replay", "--channel", "-2"], "--channel must be an integer >= 0"),
    (["pycromanager", "--retry-s", "-1"], "--retry-s must be a finite number >= 0, got -1"),
    (["pycromanager", "--retry-s", "nan"], "--retry-s must be a finite number >= 0, got nan"),
    (["pycromanager", "--poll-ms", "inf"], "--poll-ms must be a finite number >= 0"),
    (["pycromanager", "--connect-attempts", "0"], "--connect-attempts must be an integer >= 1"),
    (["pycromanager", "--mm-port", "70000"], "--mm-port must be a TCP port"),
    (["pymmcore-plus", "--queue", "0"], "--queue must be an integer >= 1, got 0"),
    (["pymmcore-plus", "--frames", "3", "--interval-ms", "-5"], "--interval-ms must be a finite number >= 0"),
    (["pymmcore-plus", "--frames", "3", "--exposure-ms", "nan"], "--exposure-ms must be a finite number >= 0"),
    # an option of another source (or mode), which it would ignore
    (["pymmcore-plus", "--config", "MM.cfg", "--frames", "3", "--save-dir", "raw"],
     "--save-dir is where pycromanager's owner mode saves the raw data"),
    (["pycromanager", "--save-dir", "raw"], "--save-dir is where pycromanager's owner mode saves"),
    (["pymmcore-plus", "--config", "MM.cfg", "--mda", "seq.yaml", "--frames", "3"],
     "--mda runs the sequence's own time points"),
    (["pymmcore-plus", "--config", "MM.cfg", "--mda", "seq.yaml", "--interval-ms", "100"],
     "--mda runs the sequence's own time plan"),
    (["pycromanager", "--exposure-ms", "10"], "--exposure-ms is set on pycromanager's own engine"),
    (["pycromanager", "--mode", "owner", "--frames", "3", "--exposure-ms", "10"],
     "--exposure-ms is set on pycromanager's own engine"),
]


@pytest.mark.parametrize("flags, message", ACQUIRE_MISTAKES)
def test_acquire_refuses_a_bad_stream_number_or_stray_option_naming_the_flag(flags, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        acquire_config(_parse("acquire", *flags))


@pytest.mark.parametrize("value", ["inf", "nan", "0", "-2"])
def test_rate_and_photons_are_refused_by_one_checker_in_the_same_words_everywhere(value):
    """`--rate` and `--photons` of `acquire` (checked by `AcquireConfig` itself, which cannot import
    the command line) and of `demo` and `bench` (checked by the command line) are refused by one
    checker, `apps.checks.finite_positive`: the same words, and no twin to drift apart."""
    from umvd_live.apps import acquire, checks
    from umvd_live.apps import cli as cli_module

    assert acquire.finite_positive is checks.finite_positive and cli_module.finite_positive is checks.finite_positive
    assert not hasattr(cli_module, "_finite_positive")
    for flag in ("--rate", "--photons"):
        with pytest.raises(ValueError) as expected:
            checks.finite_positive(flag, float(value))
        said = [str(expected.value)]
        for make, argv in ((acquire_config, ["acquire", "sim"]), (demo_config, ["demo"]),
                           (bench_config, ["bench"])):
            with pytest.raises(ValueError) as refused:
                make(_parse(*argv, flag, value))
            said.append(str(refused.value))
        with pytest.raises(ValueError) as direct:  # the config made by a script, not the command line
            acquire.AcquireConfig(source="sim", **{flag[2:].replace("rate", "rate_hz"): float(value)})
        said.append(str(direct.value))
        assert said == [f"{flag} must be a finite number > 0, got {float(value):g}"] * 5


@pytest.mark.parametrize("flags", [
    ["sim", "--stream", "cam0.GCaMP-z_2", "--frames", "0", "--rate", "1e-3", "--retry-s", "0"],
    ["pycromanager", "--mode", "owner", "--frames", "3", "--save-dir", "raw", "--config", "MM.cfg",
     "--exposure-ms", "0"],
    ["pymmcore-plus", "--config", "MM.cfg", "--mda", "seq.yaml", "--queue", "1"],
    ["pymmcore-plus", "--config", "MM.cfg", "--live", "--frames", "5", "--interval-ms", "10"],
])
def test_acquire_takes_its_options_at_their_bounds(flags):
    acquire_config(_parse("acquire", *flags, "--stream", "x" * 64))


@pytest.mark.parametrize("flags", [
    ["sim", "--stream", "a b"], ["sim", "--rate", "inf"], ["replay", "--rate", "0"],
    ["pycromanager", "--retry-s", "nan"], ["pymmcore-plus", "--queue", "0"],
    ["pymmcore-plus", "--config", "MM.cfg", "--frames", "3", "--save-dir", "raw"],
])
def test_acquire_says_a_mistake_in_one_line_before_waiting_for_the_daemon(flags):
    """The real command, with a daemon that would be waited for (--wait-s 30): one line, exit 2, at once."""
    proc = _umvd("acquire", *flags, "--to", "tcp://127.0.0.1:9", "--wait-s", "30")
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("umvd-live acquire: --"), proc.stderr


def test_an_mda_whose_streams_cannot_be_named_is_refused_before_the_core_loads(tmp_path):
    """A --stream of 62 characters takes no z plane (``.z0``): refused before any device moves,
    not one error per frame during the whole MDA."""
    (tmp_path / "mda.yaml").write_text("z_plan: {range: 2, step: 1}\n")
    proc = _umvd("acquire", "pymmcore-plus", "--config", str(tmp_path / "missing.cfg"), "--mda",
                 str(tmp_path / "mda.yaml"), "--stream", "s" * 62, "--wait-s", "0")
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "choose a shorter --stream" in lines[0] and "cannot load" not in lines[0]


def test_an_mda_none_of_whose_frames_could_be_published_fails(tmp_path, monkeypatch, capsys):
    """Every frame rejected (here: stream names past the check) is a failed acquisition, exit 1."""
    pytest.importorskip("pymmcore_plus")
    from test_mmcore import write_config

    from umvd_live.apps import acquire

    monkeypatch.setattr(acquire, "_check_stream_names", lambda *_: None, raising=False)
    (tmp_path / "mda.yaml").write_text("z_plan: {range: 2, step: 1}\n")
    config = acquire.AcquireConfig(source="pymmcore-plus", mda=str(tmp_path / "mda.yaml"),
                                   mm_config=str(write_config(tmp_path / "MMConfig.cfg")),
                                   publish=acquire.PublishConfig(to="tcp://127.0.0.1:9", stream="s" * 62, wait_s=0))
    assert acquire.run(config) == acquire.EXIT_FAILED
    out = capsys.readouterr()
    assert "3 frames acquired in 0 stream(s), 0 sent" in out.out
    assert "none of the MDA's 3 frames could be published" in out.err


def test_a_summary_prints_on_a_stdout_that_lacks_its_characters(tmp_path):
    """A redirected stdout on Windows is cp1252: an arrow or a sigma must not raise at the end."""
    code = ("import sys; from umvd_live.apps import bench, cli\n"
            "bench.run = lambda config: print('PSNR 20.0 \u2192 30.0 dB, \u03c3 2') or 0\n"
            "sys.exit(cli.main(['bench', '--json', sys.argv[1]]))")
    with open(tmp_path / "out.txt", "w") as out:
        proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "b.json")], stdout=out,
                              stderr=subprocess.PIPE, text=True, timeout=60,
                              env=os.environ | {"PYTHONIOENCODING": "cp1252", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out.txt").read_text(encoding="cp1252").strip() == "PSNR 20.0 \\u2192 30.0 dB, \\u03c3 2"


def test_bench_writes_its_json_before_printing_the_table(tmp_path, monkeypatch):
    """A table the terminal cannot print must not lose the figures of the whole run."""
    from umvd_live.apps import bench

    def unprintable(result, console=None):
        raise UnicodeEncodeError("cp1252", "\u2192", 0, 1, "character maps to <undefined>")

    monkeypatch.setattr(bench, "measure", lambda config: {"frames_published": 7})
    monkeypatch.setattr(bench, "pick_device", lambda device: None)
    monkeypatch.setattr(bench, "check_model_flags", lambda *_: None)
    monkeypatch.setattr(bench, "print_table", unprintable)
    config = bench_config(_parse("bench", "--json", str(tmp_path / "b.json")))
    with pytest.raises(UnicodeEncodeError):
        bench.run(config)
    assert '"frames_published": 7' in (tmp_path / "b.json").read_text()
