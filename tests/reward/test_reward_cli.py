import json

import torch

from palm_rlhf import PaLM
from palm_rlhf.cli.main import main
from palm_rlhf.data.preferences import PairwiseRecord, write_preferences
from palm_rlhf.data.synthetic import rule_preference_pairs


def test_train_then_score_from_the_command_line(tmp_path, capsys):
    torch.manual_seed(0)
    base = PaLM(num_tokens=256, dim=32, depth=1, heads=2, dim_head=16).save_pretrained(tmp_path / "base")
    prefs = tmp_path / "prefs.jsonl"
    write_preferences(prefs, rule_preference_pairs(20, seed=0))
    out = tmp_path / "run"
    assert main(["reward", "train", "--base", str(base), "--data", str(prefs), "--out", str(out), "--no-progress",
                 "--set", "max_steps=2", "batch_size=4", "val_fraction=0.2"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["final"] == str(out / "final")

    responses = tmp_path / "responses.jsonl"
    responses.write_text('{"prompt": "Reply: ", "response": "aeiou", "id": 7}\n')
    scores = tmp_path / "scores.jsonl"
    assert main(["reward", "score", str(out / "final"), "--data", str(responses), "--out", str(scores)]) == 0
    row = json.loads(scores.read_text())
    assert row["id"] == 7 and isinstance(row["reward"], float)

    assert main(["reward", "score", str(out / "final"), "--data", str(prefs), "--out", str(scores)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["pairs"] == 20 and 0.0 <= summary["accuracy"] <= 1.0


def test_bad_data_exits_2_with_line_and_field(tmp_path, capsys):
    base = PaLM(num_tokens=256, dim=32, depth=1, heads=2, dim_head=16).save_pretrained(tmp_path / "base")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(PairwiseRecord("p", "a", "b").to_dict()) + "\n" + '{"prompt": "p", "chosen": "a"}\n')
    assert main(["reward", "train", "--base", str(base), "--data", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "bad.jsonl:2: missing field 'rejected'" in capsys.readouterr().err
