"""runtime.run pieces on their own: out_dir checks, uneven splits, settings, final/ of a LoRA scope,
closing a run that never opened. (Every trainer on the whole runtime: tests/trainers/test_run_every_trainer.py.)"""

import pytest
import torch

from palm_rlhf.errors import CheckpointError, ConfigError
from palm_rlhf.model import PaLM
from palm_rlhf.model.checkpoint import load_adapter
from palm_rlhf.runtime.distributed import DistEnv
from palm_rlhf.runtime.run import ADAPTER_NAME, MergedAdapter, Run, RunSettings, check_out_dir


def test_out_dir_under_a_file_is_one_config_error(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError) as e:
        check_out_dir(tmp_path / "afile" / "x")
    assert str(e.value) == (f"out_dir={str(tmp_path / 'afile' / 'x')!r} cannot be used: "
                            f"{str(tmp_path / 'afile')!r} is a file; choose another out_dir")
    check_out_dir(tmp_path / "new" / "deep")
    assert (tmp_path / "new" / "deep").is_dir() and not any((tmp_path / "new" / "deep").iterdir())


@pytest.mark.parametrize("value, world, message", [
    (10, 4, "x=10 does not divide over 4 processes; use 8 or 12"),
    (3, 4, "x=3 does not divide over 4 processes; use 4"),
])
def test_uneven_split_names_the_nearest_valid_values(value, world, message):
    run = Run(RunSettings(), "t")
    run.env = DistEnv(world_size=world)
    with pytest.raises(ConfigError, match=message):
        run.check_divides("x", value)
    run.check_divides("x", 2 * world)  # fine


def test_settings_are_validated_once():
    with pytest.raises(ConfigError, match="resume='maybe'"):
        RunSettings(resume="maybe")
    with pytest.raises(ConfigError, match="report_to='csv'"):
        RunSettings(report_to=["jsonl", "csv"])
    with pytest.raises(ConfigError, match="max_steps=0"):
        RunSettings(max_steps=0)
    assert RunSettings(report_to="jsonl").report_to == ["jsonl"]


def test_resume_must_needs_a_checkpoint_and_close_is_safe_before_open(tmp_path):
    run = Run(RunSettings(out_dir=str(tmp_path / "r"), resume="must", report_to=["jsonl"]), "t")
    run.close()  # nothing opened: nothing to close
    run.open()
    with pytest.raises(CheckpointError, match="resume=must: no checkpoint"):
        run.resume_point()
    run.close()
    run.close()


def test_merged_adapter_final_equals_the_unmerged_scope(tmp_path):
    """final/ for a LoRA scope: the base with the scope folded in computes what base + scope computed,
    and adapter.safetensors alone restores the scope on the base."""
    torch.manual_seed(0)
    model = PaLM(num_tokens=64, dim=16, depth=2, heads=2, dim_head=8)
    model.add_finetune_params("actor", lora_r=4)
    model.add_finetune_params("critic", lora_r=4)
    with torch.no_grad():
        for p in model.finetune_parameters("actor"):
            p.normal_(0, 0.1)
    model.eval()
    x = torch.randint(0, 64, (2, 7))
    want = model(x, finetune_scope="actor")
    MergedAdapter(model, "actor").save_pretrained(tmp_path)
    merged = PaLM.from_pretrained(tmp_path).eval()
    assert not merged.finetune_modules  # no LoRA scope travels in the merged base
    torch.testing.assert_close(merged(x), want, rtol=1e-5, atol=1e-5)
    assert "actor" in model.finetune_modules  # the trainer's model is left as it was
    fresh = PaLM(num_tokens=64, dim=16, depth=2, heads=2, dim_head=8)
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("finetune_modules")},
                          strict=False)
    load_adapter(fresh, tmp_path / ADAPTER_NAME)
    torch.testing.assert_close(fresh.eval()(x, finetune_scope="actor"), want, rtol=1e-5, atol=1e-5)
