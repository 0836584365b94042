"""A job's settings are the ``train`` command's options: what ``train --server`` sends becomes, on the
server, the same trainer configuration a local run of that command line builds."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from sss_lib.service.job_settings import (SERVER_OWNED, SettingsError, allowed_actions, job_gpus,
                                          namespace_to_settings, settings_to_argv)
from sss_lib.trainer.run import add_train_arguments, config_from_args


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    return parser.parse_args(argv)


def test_remote_settings_rebuild_the_local_configuration():
    local = ["--labeled", "D", "--run-dir", "R", "--backbone", "sam2.1_hiera_tiny", "--iterations", "40",
             "--seed", "3", "--window", "-200", "300", "--val-cases", "case_001", "case_004", "--no-dfe",
             "--no-dfe-zero-init-gain", "--lr-head", "0.001", "--teacher-points", "off", "--labeled-batch", "6",
             "--device", "cuda", "--out", "x.ssstask"]
    args = parse(local)
    settings = namespace_to_settings(args)
    # Only what differs from the defaults travels, never the files or the device.
    assert settings == {"backbone": "sam2.1_hiera_tiny", "iterations": 40, "seed": 3, "window": [-200.0, 300.0],
                        "val_cases": ["case_001", "case_004"], "no_dfe": True, "dfe_zero_init_gain": False,
                        "lr_head": 0.001, "teacher_points": "off", "labeled_batch": 6}
    remote = parse(["--labeled", "D", "--run-dir", "R", "--device", "cuda", "--out", "x.ssstask",
                    *settings_to_argv(settings)])
    a, b = config_from_args(args), config_from_args(remote)
    assert dataclasses.asdict(a) == dataclasses.asdict(b)


def test_whitelist_leaves_out_server_owned_options():
    allowed = allowed_actions()
    assert not SERVER_OWNED & set(allowed)
    assert {"iterations", "backbone", "seed", "labeled_batch", "window", "val_cases"} <= set(allowed)


@pytest.mark.parametrize("settings, words", [
    ({"iterations": "300"}, "whole number"),
    ({"iterations": 2.5}, "whole number"),
    ({"lr_head": "fast"}, "a number"),
    ({"no_dfe": "yes"}, "true or false"),
    ({"window": [1, 2, 3]}, "list of 2"),
    ({"val_cases": "--resume"}, "not starting with '-'"),
    ({"backbone": "--random-init"}, "invalid choice"),
    ({"checkpoint": "/etc/passwd"}, "chosen by the server"),
    ({"device": "cuda"}, "chosen by the server"),
    ({"ema_decay": 1.5}, "ema_decay"),
    ({"val_fraction": 1.0}, "val_fraction"),
])
def test_bad_settings_are_refused_with_the_reason(settings, words):
    with pytest.raises(SettingsError, match=words):
        settings_to_argv(settings)


def test_gpus_against_the_server():
    assert job_gpus({}, 0) == 1 and job_gpus({"gpus": 2}, 4) == 2
    for settings, available, words in (({"gpus": 0}, 2, ">= 1"), ({"gpus": 3}, 2, "at most 2"),
                                       ({"gpus": 2}, 0, "CPU"), ({"gpus": True}, 2, ">= 1")):
        with pytest.raises(SettingsError, match=words):
            job_gpus(settings, available)
