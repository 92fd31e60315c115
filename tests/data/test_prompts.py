"""data.prompts.read_prompts: the one reader of prompt files (feedback app, PPO, GRPO)."""

import pytest

from palm_rlhf.data.prompts import read_prompts
from palm_rlhf.errors import DataError


def test_txt_escapes_and_blank_lines(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("def load(path):\\n\n\n   \nplain\n")
    assert read_prompts(path) == ["def load(path):\n", "plain"]


def test_errors_name_the_key_that_gave_the_file(tmp_path):
    with pytest.raises(DataError, match=r"^prompts=.*missing.txt: cannot read \(no such file\)"):
        read_prompts(tmp_path / "missing.txt", key="prompts=")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(DataError, match=r"^--prompts .*empty.txt: no prompts found"):
        read_prompts(tmp_path / "empty.txt")
