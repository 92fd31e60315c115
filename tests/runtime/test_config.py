"""load_config: YAML + dotted overrides, type coercion, unknown keys listed."""

from dataclasses import dataclass, field
from typing import ClassVar

import pytest

from palm_rlhf.errors import ConfigError
from palm_rlhf.runtime.config import config_from_dict, config_help, config_keys, config_to_dict, load_config
from palm_rlhf.runtime.optim import OptimConfig


@dataclass
class _Model:
    dim: int = 32
    depth: int = 1


@dataclass
class _Cfg:
    out_dir: str = "runs/x"
    steps: int = 10
    flag: bool = False
    ratio: float = 0.5
    sizes: tuple[int, ...] = (1, 2)
    model: _Model = field(default_factory=_Model)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self):
        if self.steps <= 0:
            raise ConfigError(f"steps={self.steps}: must be > 0")


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 5\nmodel:\n  dim: 64\noptim:\n  lr: 1e-3\n")
    cfg = load_config(_Cfg, path, ["model.depth=3", "optim.name=lion", "out_dir=123", "flag=true", "sizes=[4, 5]"])
    assert (cfg.steps, cfg.model.dim, cfg.model.depth) == (5, 64, 3)
    # YAML 1.1 reads "1e-3" as a string: it is coerced to the declared float
    assert cfg.optim.lr == pytest.approx(1e-3) and isinstance(cfg.optim.lr, float)
    assert cfg.optim.name == "lion" and cfg.out_dir == "123" and cfg.flag is True and cfg.sizes == (4, 5)


def test_unknown_key_lists_valid_keys(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'model.width'.*model.dim"):
        load_config(_Cfg, None, ["model.width=3"])
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="optim.learning_rate.*optim.lr"):
        load_config(_Cfg, path)


def test_bad_values_name_the_field():
    with pytest.raises(ConfigError, match="steps='many'"):
        load_config(_Cfg, None, ["steps=many"])
    with pytest.raises(ConfigError, match="steps=0"):  # __post_init__ validation runs
        load_config(_Cfg, None, ["steps=0"])
    with pytest.raises(ConfigError, match="optim.name='sgd'"):
        load_config(_Cfg, None, ["optim.name=sgd"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(_Cfg, None, ["steps"])
    with pytest.raises(ConfigError, match="no such file"):
        load_config(_Cfg, "/nonexistent/c.yaml")


def test_round_trip_through_dict():
    cfg = load_config(_Cfg, None, ["model.dim=48", "sizes=[3]"])
    again = config_from_dict(_Cfg, config_to_dict(cfg))
    assert again == cfg
    assert "optim.lr" in config_keys(_Cfg) and "model" not in config_keys(_Cfg)


def test_bare_preset_names_resolve_inside_the_package(tmp_path, monkeypatch):
    from palm_rlhf.runtime.config import PRESET_DIR, list_run_presets, resolve_config_path

    monkeypatch.chdir(tmp_path)  # away from the checkout's configs/ link
    expected = PRESET_DIR / "pretrain" / "tiny-stdlib.yaml"
    assert expected.is_file() and "pretrain/tiny-stdlib" in list_run_presets()
    for spec in ("tiny-stdlib", "pretrain/tiny-stdlib", "configs/pretrain/tiny-stdlib.yaml", "tiny-stdlib.yaml"):
        assert resolve_config_path(spec) == expected, spec
    assert not any(p.startswith("model/") for p in list_run_presets())  # PaLM sizes are not run configs
    # a file that exists where the command runs wins over a preset of the same name
    (tmp_path / "tiny-stdlib.yaml").write_text("steps: 3\n")
    assert resolve_config_path("tiny-stdlib.yaml").resolve() == (tmp_path / "tiny-stdlib.yaml").resolve()
    assert load_config(_Cfg, "tiny-stdlib.yaml").steps == 3


def test_preset_by_name_loads_like_its_path():
    from palm_rlhf.trainers.pretrain import PretrainConfig

    by_name = load_config(PretrainConfig, "tiny-stdlib", ["max_steps=7"])
    assert by_name == load_config(PretrainConfig, "configs/pretrain/tiny-stdlib.yaml", ["max_steps=7"])
    assert by_name.max_steps == 7


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(ConfigError, match=r"--config tiny-stdlb: no such file or preset.*pretrain/tiny-stdlib.*rl/ppo"):
        load_config(_Cfg, "tiny-stdlb")
    with pytest.raises(ConfigError, match="no such file or preset"):
        load_config(_Cfg, "palm-8b")  # a model size, not a run config


# ---------------------------------------------------------------- ALIASES and help text


@dataclass
class _Group:
    ALIASES: ClassVar[dict[str, str]] = {"width": "dim"}

    dim: int = 8          # hidden width
    depth: int = 1


@dataclass
class _Base:
    out_dir: str = "runs/x"   # the run directory
    max_steps: int = 10       # steps in all


@dataclass
class _Renamed(_Base):
    ALIASES: ClassVar[dict[str, str]] = {"steps": "max_steps", "preferences": "data"}

    max_steps: int = 20       # redeclared without changing the meaning
    data: str = field(default="", metadata={"help": "preference JSONL"})
    group: _Group = field(default_factory=_Group)


def test_aliases_in_yaml_and_overrides(tmp_path, caplog):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 5\npreferences: p.jsonl\ngroup:\n  width: 16\n")
    with caplog.at_level("WARNING", logger="palm_rlhf.runtime.config"):
        cfg = load_config(_Renamed, path, ["steps=7", "group.width=32"])
    assert (cfg.max_steps, cfg.data, cfg.group.dim) == (7, "p.jsonl", 32)   # the override wins over the YAML
    lines = [r.getMessage() for r in caplog.records]
    # one line per old spelling used, naming the new key
    assert sorted(lines) == sorted([
        "config key 'steps' is deprecated; write max_steps= instead",
        "config key 'preferences' is deprecated; write data= instead",
        "config key 'group.width' is deprecated; write group.dim= instead",
    ])


def test_alias_and_new_name_together_in_yaml_is_an_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 5\nmax_steps: 6\n")
    with pytest.raises(ConfigError, match="steps and max_steps are both set; keep max_steps"):
        load_config(_Renamed, path)
    # config_from_dict (what reads a run's config.yaml back) translates too
    assert config_from_dict(_Renamed, {"steps": 3}).max_steps == 3


def test_config_help_rows():
    rows = {key: (tp, default, text) for key, tp, default, text in config_help(_Renamed)}
    assert list(rows) == ["out_dir", "max_steps", "data", "group.dim", "group.depth"]
    assert rows["out_dir"] == ("str", "runs/x", "the run directory")
    # a redeclared field keeps its own comment when it has one
    assert rows["max_steps"] == ("int", 20, "redeclared without changing the meaning")
    assert rows["data"] == ("str", "", "preference JSONL")          # field(metadata={"help": ...}) wins
    assert rows["group.dim"] == ("int", 8, "hidden width")
    assert rows["group.depth"] == ("int", 1, "")


def test_config_help_inherits_the_parents_comment():
    @dataclass
    class Child(_Base):
        max_steps: int = 3

    rows = {key: (default, text) for key, _, default, text in config_help(Child)}
    assert rows["max_steps"] == (3, "steps in all")


def test_small_stdlib_is_tiny_stdlib_wider_and_deeper():
    """The reward model's base in benchmarks/alignment.py: the same corpus, tokenizer and schedule as
    tiny-stdlib (so its reward model reads tiny-stdlib's text), a model 4.5x the parameters."""
    from dataclasses import replace

    from palm_rlhf.model import PaLM
    from palm_rlhf.trainers.pretrain import PretrainConfig

    tiny, small = load_config(PretrainConfig, "tiny-stdlib"), load_config(PretrainConfig, "small-stdlib")
    assert (small.model.dim, small.model.depth) == (128, 4) and (tiny.model.dim, tiny.model.depth) == (64, 2)
    assert replace(small, model=tiny.model, out_dir=tiny.out_dir) == tiny
    params = {name: PaLM(num_tokens=256, dim=c.model.dim, depth=c.model.depth, heads=c.model.heads,
                         dim_head=c.model.dim_head).num_parameters() for name, c in (("tiny", tiny), ("small", small))}
    assert params["small"] == 901_760 and params["tiny"] < 250_000, params
