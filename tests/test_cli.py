"""Every command speaks the same way (issue 18, item 7): help on every command and option, one
``--log-level`` everywhere, one log format (`umvd_live.apps.logs`)."""

from __future__ import annotations

import argparse
import logging
import re

import pytest

from umvd_live.apps import logs
from umvd_live.apps.cli import build_parser, main

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
