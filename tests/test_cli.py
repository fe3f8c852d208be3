"""The shared key=value parsing of the entry points (stepwise/cli.py) and the stage=all step declaration."""

from __future__ import annotations

import pytest

from stepwise.cli import UsageError, parse_args, parse_bool, parse_int, parse_number


def test_parse_args_keys_values_and_repeats():
    assert parse_args(["a=1", "b=x=y", "c="]) == {"a": "1", "b": "x=y", "c": ""}
    assert parse_args(["k=1", "k=2", "o=x"], repeatable=("k",)) == {"k": ["1", "2"], "o": "x"}
    with pytest.raises(UsageError, match="given twice"):
        parse_args(["a=1", "a=2"])
    with pytest.raises(UsageError, match="key=value"):
        parse_args(["novalue"])
    with pytest.raises(UsageError, match="adding keys is not allowed.*'preset'"):
        parse_args(["+preset=tiny"])


def test_value_parsers_name_the_key():
    assert parse_bool("knn", "Yes") and not parse_bool("knn", "0")
    assert parse_int("workers", "3", minimum=1) == 3 and parse_number("t", "0.25") == 0.25
    for call, match in ((lambda: parse_bool("decode", "maybe"), "decode"),
                        (lambda: parse_int("workers", "0", minimum=1), "workers must be >= 1"),
                        (lambda: parse_int("seed", "abc"), "seed must be an integer"),
                        (lambda: parse_number("score_threshold", "nan"), "score_threshold")):
        with pytest.raises(UsageError, match=match):
            call()


def test_make_synthetic_refuses_plus_keys(tmp_path, capsys):
    from stepwise.make_synthetic import main

    assert main([f"out={tmp_path / 'x'}", "+preset=tiny"]) == 2
    assert "adding keys is not allowed" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_stage_all_declares_its_steps_once():
    from stepwise.config import load_config
    from stepwise.stages import TRAINING_OUTPUTS, stage_outputs
    from stepwise.stages.registry import training_stages

    cfg = load_config(["stage=all"])
    TRAINING_STEPS = training_stages()
    assert TRAINING_STEPS == tuple(s for s in cfg.stage.steps if "epochs" in cfg.stage[s])
    assert stage_outputs("select") == ("d_head.json", "d_tail.json")
    assert all(stage_outputs(s) == TRAINING_OUTPUTS for s in TRAINING_STEPS)
