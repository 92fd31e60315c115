"""The one dialect of the training commands: `palm-rlhf CMD --config PRESET key=value ...`."""

from __future__ import annotations

import json
import logging

import pytest
import yaml

from palm_rlhf.cli.dialect import import_object, run_trainer
from palm_rlhf.cli.main import main
from palm_rlhf.runtime.config import config_help, load_config

COMMANDS = {
    ("pretrain",): "palm_rlhf.trainers.pretrain.PretrainConfig",
    ("finetune",): "palm_rlhf.trainers.finetune.FinetuneConfig",
    ("reward", "train"): "palm_rlhf.trainers.reward.RewardTrainConfig",
    ("ppo",): "palm_rlhf.trainers.ppo.PPOConfig",
    ("grpo",): "palm_rlhf.trainers.grpo.GRPOConfig",
    ("rloo",): "palm_rlhf.trainers.rloo.RLOOConfig",
    ("reinforce-pp",): "palm_rlhf.trainers.reinforce_pp.ReinforcePPConfig",
    ("dpo",): "palm_rlhf.trainers.dpo.DPOConfig",
}
# the keys that mean the same thing in every command that has them (issue 14's table)
SHARED = ("model", "data", "prompts", "out_dir", "max_steps", "resume", "seed", "tokenizer", "report_to")


def _printed(capsys, argv) -> dict:
    assert main([*argv, "--print-config"]) == 0
    return yaml.safe_load(capsys.readouterr().out)


def _deprecations(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()]


def test_overrides_after_a_flag(capsys, caplog):
    """issue 19: `ppo --config ppo model=a --no-progress steps=1` said "unrecognized arguments: steps=1"."""
    with caplog.at_level(logging.WARNING):
        cfg = _printed(capsys, ["ppo", "--config", "ppo", "model=a", "--no-progress", "steps=1", "optim.lr=2e-4"])
    assert (cfg["model"], cfg["max_steps"], cfg["progress"], cfg["optim"]["lr"]) == ("a", 1, False, 2e-4)
    assert _deprecations(caplog) == ["config key 'steps' is deprecated; write max_steps= instead"]


def test_overrides_after_a_flag_reach_the_trainer(tmp_path, capsys):
    # without --print-config the same line parses and fails on the missing model, with one line
    code = main(["ppo", "--config", "ppo", f"model={tmp_path / 'a'}", "--no-progress", "max_steps=1",
                 f"out_dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert code == 2 and "unrecognized" not in err
    assert err.startswith("error: ") and err.count("\n") == 1 and "no such file or directory" in err


def test_stray_flags_are_still_rejected(capsys):
    with pytest.raises(SystemExit) as e:
        main(["ppo", "--config", "ppo", "model=a", "--bogus", "x=1"])
    assert e.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_old_reward_flags_are_aliases(capsys, caplog):
    with caplog.at_level(logging.WARNING):
        cfg = _printed(capsys, ["reward", "train", "--base", "runs/sft", "--data", "p.jsonl", "--out", "runs/rm",
                                "--no-resume", "--set", "max_steps=5", "lr=3e-4"])
    assert (cfg["model"], cfg["data"], cfg["out_dir"], cfg["resume"], cfg["max_steps"], cfg["optim"]["lr"]) == \
        ("runs/sft", "p.jsonl", "runs/rm", "never", 5, 3e-4)
    lines = _deprecations(caplog)
    assert len(lines) == 6  # one line per old spelling (lr= too: optim.lr=)
    assert "config key 'lr' is deprecated; write optim.lr= instead" in lines
    assert "--base is deprecated; write model=runs/sft" in lines
    assert "--no-resume is deprecated; write resume=never" in lines


def test_old_finetune_and_dpo_spellings(capsys, caplog):
    cfg = _printed(capsys, ["finetune", "--config", "lora", "--base", "runs/base", "--data", "sft.jsonl", "--resume"])
    assert (cfg["model"], cfg["data"], cfg["resume"]) == ("runs/base", "sft.jsonl", "must")
    cfg = _printed(capsys, ["dpo", "--config", "dpo", "preferences=p.jsonl", "steps=3", "model=runs/sft"])
    assert (cfg["data"], cfg["max_steps"], cfg["model"]) == ("p.jsonl", 3, "runs/sft")
    cfg = _printed(capsys, ["reward", "train", "base=runs/sft", "data=p.jsonl"])
    assert cfg["model"] == "runs/sft"


def test_explicit_key_wins_over_an_old_flag(capsys):
    cfg = _printed(capsys, ["reward", "train", "--out", "runs/old", "out_dir=runs/new", "model=m", "data=d"])
    assert cfg["out_dir"] == "runs/new"


@pytest.mark.parametrize("command", list(COMMANDS), ids=" ".join)
def test_print_config_is_the_resolved_config(tmp_path, capsys, command):
    cls = import_object(COMMANDS[command])
    printed = _printed(capsys, [*command, "seed=7", "out_dir=runs/here"])
    assert printed["seed"] == 7 and printed["out_dir"] == "runs/here"
    # the printed YAML is a preset: it loads back into the same config
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(printed))
    again = _printed(capsys, [*command, "--config", str(tmp_path / "c.yaml")])
    assert again == printed
    assert load_config(cls, tmp_path / "c.yaml").seed == 7


@pytest.mark.parametrize("command", list(COMMANDS), ids=" ".join)
def test_help_lists_every_key_with_type_default_and_meaning(capsys, command):
    with pytest.raises(SystemExit) as e:
        main([*command, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "examples:" in text and "config keys" in text
    rows = config_help(import_object(COMMANDS[command]))
    assert rows
    keys = [key for key, *_ in rows]
    for key in SHARED:
        if key in ("model", "data", "prompts", "tokenizer") and key not in keys:
            continue  # only RL has prompts; pretrain has no model, its data and tokenizer are data.sources/.tokenizer
        assert key in keys, f"{' '.join(command)} lacks {key}="
    lines = text.splitlines()
    for key, tp, _default, meaning in rows:
        head = next((i for i, line in enumerate(lines) if line.startswith(f"  {key}: {tp} = ")), None)
        assert head is not None, f"{key} missing from `{' '.join(command)} --help`"
        assert meaning, f"{COMMANDS[command]}.{key} has no one-line meaning (a trailing # comment)"
        assert meaning in lines[head] or meaning in lines[head + 1]


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith("palm-rlhf ")


@pytest.mark.parametrize("argv", [
    ["pretrain", "--config", "tiny-stdlib"],
    ["finetune", "model=m", "data=x.jsonl"],
    ["reward", "train", "model=m", "data=x.jsonl"],
    ["ppo", "model=m", "prompts=p.txt", "reward_fn=a:b"],
    ["grpo", "model=m", "prompts=p.txt", "reward_fn=a:b"],
    ["dpo", "model=m", "data=x.jsonl"],
], ids=lambda a: " ".join(a[:2]))
def test_an_out_dir_that_cannot_be_created_is_one_line(tmp_path, capsys, argv):
    (tmp_path / "afile").write_text("")
    assert main([*argv, f"out_dir={tmp_path / 'afile' / 'run'}", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: out_dir=") and "is a file; choose another out_dir" in err


def test_a_presets_missing_data_suggests_data_sources(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # shakespeare reads ../shared/data/tinyshakespeare.txt, absent here
    assert main(["pretrain", "--config", "shakespeare", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--config shakespeare reads ../shared/data/tinyshakespeare.txt" in err
    assert "data.sources=[path/to/corpus.txt]" in err


def test_summary_line_keeps_small_values(tmp_path, capsys):
    """The one-line JSON summary shows 4 significant digits: a decayed lr of 2e-5 is not printed as 0.0."""

    class Finished:
        def setup(self):
            pass

        def train(self):
            return [{"step": 30, "lr": 2e-5, "loss": 0.0123456, "kl_ref": 12.345678}]

        def cleanup(self):
            pass

    assert run_trainer(Finished(), tmp_path) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (printed["step"], printed["lr"], printed["loss"], printed["kl_ref"]) == (30, 2e-5, 0.01235, 12.35)
