"""A training job's ``settings``: the ``train`` command's options a client may set, as JSON.

The whitelist is the ``train`` parser itself (:func:`sss_lib.trainer.run.add_train_arguments`)
less the options that name files or decide where things run on the server (:data:`SERVER_OWNED`);
a setting's key is the option's destination (``--labeled-batch`` -> ``labeled_batch``). Values are
checked for their JSON type, turned into command-line tokens, parsed by that same parser (types,
choices) and built into the trainer's configuration (ranges), so a job the server accepts starts
with the settings the trainer would accept, and a bad one is refused at submission with the
trainer's own message.

``gpus`` (default 1) is the service's own setting: how many GPUs the job trains on
(``torchrun --nproc_per_node gpus``).

No torch here (the trainer's option and configuration modules load without it).
"""

from __future__ import annotations

import argparse
from typing import Any, Mapping

from ..errors import InputError, SSSError

#: Options the server sets itself: data and run folders, the model copy, resume, the device and
#: a checkpoint file (a client must not name files on the server).
SERVER_OWNED = frozenset({"help", "labeled", "run_dir", "unlabeled", "out", "resume", "device", "checkpoint"})
#: The service's own settings (not ``train`` options).
SERVICE_KEYS = frozenset({"gpus"})


class SettingsError(SSSError):
    """Settings the trainer would refuse (HTTP 422); the message names the setting and the fix."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # type: ignore[override]  # argparse would exit the server
        raise SettingsError(message)


def _parser() -> argparse.ArgumentParser:
    from ..trainer.run import add_train_arguments

    parser = _Parser(prog="settings", add_help=False)
    add_train_arguments(parser)
    return parser


def allowed_actions(parser: argparse.ArgumentParser | None = None) -> dict[str, argparse.Action]:
    """Setting name -> the ``train`` option behind it, for every option a client may set."""
    parser = parser or _parser()
    return {a.dest: a for a in parser._actions if a.dest not in SERVER_OWNED and a.option_strings}


def _long_option(action: argparse.Action) -> str:
    return next(o for o in action.option_strings if o.startswith("--"))


def _is_number(value: Any, integer: bool) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) if integer else isinstance(value, (int, float))


def _tokens(key: str, value: Any, action: argparse.Action) -> list[str]:
    """The command-line tokens for one setting (``[]`` when it asks for the option's absence)."""
    opt = _long_option(action)
    if isinstance(action, argparse.BooleanOptionalAction):
        if not isinstance(value, bool):
            raise SettingsError(f"settings.{key} must be true or false, got {value!r}")
        return [opt if value else "--no-" + opt[2:]]
    if action.nargs == 0:  # store_true
        if not isinstance(value, bool):
            raise SettingsError(f"settings.{key} must be true or false, got {value!r}")
        return [opt] if value else []
    if value is None:
        return []
    integer = action.type is int
    numeric = action.type in (int, float)
    if action.nargs in ("+", "*") or isinstance(action.nargs, int):
        items = value if isinstance(value, list) else [value] if action.nargs in ("+", "*") else None
        if items is None or (isinstance(action.nargs, int) and len(items) != action.nargs) or not items:
            count = action.nargs if isinstance(action.nargs, int) else "one or more"
            raise SettingsError(f"settings.{key} must be a list of {count} value(s), got {value!r}")
        for item in items:
            if numeric and not _is_number(item, integer):
                raise SettingsError(f"settings.{key} must hold numbers, got {item!r}")
            if not numeric and (not isinstance(item, str) or not item or item.startswith("-")):
                raise SettingsError(f"settings.{key} must hold names (not starting with '-'), got {item!r}")
        return [opt, *(repr(float(i)) if action.type is float else str(i) for i in items)]
    if numeric and not _is_number(value, integer):
        kind = "a whole number" if integer else "a number"
        raise SettingsError(f"settings.{key} must be {kind}, got {value!r}")
    if not numeric and not isinstance(value, str):
        raise SettingsError(f"settings.{key} must be a string, got {value!r}")
    return [f"{opt}={value}"]  # one token: a value starting with '-' cannot pass for another option


def settings_to_argv(settings: Mapping[str, Any] | None) -> list[str]:
    """The ``train`` command-line tokens for ``settings`` (service keys left out), checked.

    Raises:
        SettingsError: an unknown or server-owned key, a value of the wrong type, a value the
            parser refuses (a choice), or one the trainer's configuration refuses (a range).
    """
    settings = dict(settings or {})
    if not isinstance(settings, dict):
        raise SettingsError("settings must be a JSON object such as {\"iterations\": 300}")
    parser = _parser()
    actions = allowed_actions(parser)
    argv: list[str] = []
    for key in sorted(settings):
        if key in SERVICE_KEYS:
            continue
        if key in SERVER_OWNED:
            raise SettingsError(f"settings.{key} is chosen by the server, not the client; leave it out "
                                "(data go in 'labeled'/'unlabeled', the device is the server's)")
        action = actions.get(key)
        if action is None:
            raise SettingsError(f"unknown setting {key!r}; allowed: {', '.join(sorted(set(actions) | SERVICE_KEYS))}")
        argv += _tokens(key, settings[key], action)
    check_argv(argv, parser)
    return argv


def check_argv(argv: list[str], parser: argparse.ArgumentParser | None = None) -> None:
    """Parse ``argv`` as ``train`` options and build the trainer's configuration from them.

    Raises:
        SettingsError: what the parser or the configuration refuses, with its message.
    """
    from ..trainer.run import config_from_args

    parser = parser or _parser()
    args = parser.parse_args(["--labeled", "DATA", "--run-dir", "RUN", *argv])
    try:
        config_from_args(args)
    except (ValueError, InputError) as err:
        raise SettingsError(str(err).replace("TrainConfig: ", "")) from None


def job_gpus(settings: Mapping[str, Any] | None, available: int) -> int:
    """The GPUs a job asks for (``settings.gpus``, default 1), checked against the server's.

    Args:
        available: GPUs the server trains on (0: a CPU server, where a job runs one process).

    Raises:
        SettingsError: not a whole number >= 1, or more than the server has.
    """
    value = (settings or {}).get("gpus", 1)
    if not _is_number(value, True) or value < 1:
        raise SettingsError(f"settings.gpus must be a whole number >= 1, got {value!r}")
    if available == 0 and value > 1:
        raise SettingsError(f"settings.gpus is {value} but this server trains on the CPU (one process per job); "
                            "leave gpus out or set it to 1")
    if available and value > available:
        raise SettingsError(f"settings.gpus is {value} but this server has {available} GPU(s); ask for at most "
                            f"{available}")
    return int(value)


def namespace_to_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings of a parsed ``train`` command line: every allowed option whose value differs
    from its default, as JSON values (what ``train --server`` sends)."""
    settings: dict[str, Any] = {}
    for key, action in allowed_actions().items():
        value = getattr(args, key, action.default)
        if value == action.default:
            continue
        settings[key] = list(value) if isinstance(value, (list, tuple)) else value
    return settings
