"""docs/config.md is generated from the config dataclasses; this fails when it is stale."""

from pathlib import Path

from palm_rlhf.cli.config_docs import render, training_commands

DOC = Path(__file__).resolve().parents[2] / "docs" / "config.md"


def test_config_reference_is_current():
    assert DOC.read_text() == render(), "docs/config.md is stale: run python -m palm_rlhf.cli.config_docs --write"


def test_every_training_command_has_a_section():
    names = [prog for prog, _ in training_commands()]
    for command in ("pretrain", "finetune", "reward train", "ppo", "grpo", "dpo"):
        assert f"palm-rlhf {command}" in names
        assert f"## `palm-rlhf {command}`" in DOC.read_text()
