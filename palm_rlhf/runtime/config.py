"""Config dataclasses from YAML presets plus dotted `key=value` overrides.

    cfg = load_config(PretrainConfig, "configs/pretrain/tiny-stdlib.yaml", ["optim.lr=1e-3", "model.depth=2"])
    cfg = load_config(PretrainConfig, "tiny-stdlib")   # the same preset, by name, from any directory

`--config` takes a YAML file or the name of a preset shipped inside the package
(`palm_rlhf/configs/<kind>/<name>.yaml`, symlinked as `configs/` in a checkout): `tiny-stdlib`,
`pretrain/tiny-stdlib`, or a `configs/pretrain/tiny-stdlib.yaml` path that does not exist where
the command runs (an installed wheel). A file that exists always wins over a preset.

Nested dataclass fields are addressed with dots (`optim.lr`). Values are parsed as YAML
(`true`, `1e-3`, `[1, 2]`) and then coerced to the declared field type, so `out_dir=123`
stays a string and `lr=1e-3` (which YAML 1.1 reads as a string) becomes a float. An unknown
key raises `ConfigError` listing the valid keys. Validation itself lives in each dataclass's
`__post_init__`, which runs once when the object is built here.

Renamed keys keep working: a config dataclass declares its old spellings as a class attribute
`ALIASES: ClassVar[dict[str, str | Converted]] = {"steps": "max_steps", "lr": "optim.lr"}`; YAML keys and
overrides alike are translated, with one deprecation line per old spelling used. A new name may be
dotted (a flat old key moved into a section), an old name may be dotted (`"data.val_fraction":
"eval.fraction"`: a key moved out of a section), and an old key whose value changes meaning is a
`Converted(fn, "new keys")`: `fn(old_value, values)` returns the new keys' values, given the other
keys of the same section (`values`, old spellings already renamed; defaults filled by the caller). `config_help(cls)` lists every key
with its type, default and one-line meaning: `field(metadata={"help": ...})` if given, else the
trailing `# comment` of the field's line in the class body (a subclass that redeclares a field
without a comment inherits its parent's).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import logging
import textwrap
import tokenize
import typing
from pathlib import Path
from typing import Any, Iterable

import yaml

from ..errors import ConfigError

__all__ = ["Converted", "OldKeysAccepted", "load_config", "config_to_dict", "config_from_dict", "config_keys", "config_help", "list_run_presets",
           "resolve_config_path", "PRESET_DIR"]

log = logging.getLogger(__name__)

# the YAML presets, shipped as package data (pyproject [tool.setuptools.package-data])
PRESET_DIR = Path(__file__).resolve().parents[1] / "configs"
# configs/model/ holds PaLM sizes for `palm_rlhf.model.presets`, not run configs
_NOT_RUN_PRESETS = ("model",)


def _field_types(cls) -> dict[str, Any]:
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - unresolvable forward refs: fall back to the raw annotations
        hints = {}
    return {f.name: hints.get(f.name, f.type) for f in dataclasses.fields(cls)}


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def config_keys(cls, prefix: str = "") -> list[str]:
    """Every dotted key `cls` accepts, nested dataclasses flattened (`optim.lr`)."""
    keys = []
    for name, tp in _field_types(cls).items():
        if _is_dataclass_type(tp):
            keys.extend(config_keys(tp, f"{prefix}{name}."))
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _coerce(key: str, value, tp):
    """Turn a YAML-parsed value into the declared type, or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        tp = inner[0] if len(inner) == 1 else Any
        origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or tp is None:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{key}={value!r}: must be true or false")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r}: must be an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"{key}={value!r}: must be an integer")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r}: must be a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}={value!r}: must be a number") from None
    if tp is str:
        if value is None:
            return ""
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}={value!r}: must be a string")
        return str(value)
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()] if value.strip() else []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r}: must be a list")
        item_tp = args[0] if args and (origin is list or (len(args) == 2 and args[1] is Ellipsis)) else None
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{key}={value!r}: must have {len(args)} items")
            items = [_coerce(f"{key}[{i}]", v, t) for i, (v, t) in enumerate(zip(value, args))]
        else:
            items = [_coerce(f"{key}[{i}]", v, item_tp) if item_tp else v for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else list(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r}: must be a mapping")
        return dict(value)
    return value


@dataclasses.dataclass(frozen=True)
class Converted:
    """An old key whose value is translated: `fn(old_value, values) -> {new dotted key: value}`."""

    fn: typing.Callable[[Any, dict], dict]
    new: str  # what the deprecation line tells the user to write instead (e.g. "batch_size and micro_batch_size")


def _aliases(cls) -> dict:
    return getattr(cls, "ALIASES", None) or {}


def _warn_once(old: str, new: str, seen: set) -> None:
    if old not in seen:
        seen.add(old)
        log.warning("config key %r is deprecated; write %s instead", old,
                    new if " " in new or "=" in new else new + "=")


def _canonical(cls, name: str, prefix: str, seen: set) -> str:
    """`name`, or the key it is an old spelling of (logged once per load); a Converted key stays."""
    new = _aliases(cls).get(name)
    if new is None or isinstance(new, Converted):
        return name
    _warn_once(prefix + name, prefix + new, seen)
    return new


def _put(out: dict, key: str, value, prefix: str, old: str) -> None:
    """out[key] = value for a dotted key (nested dicts created); a key set twice is a ConfigError."""
    parts = key.split(".")
    node = out
    for part in parts[:-1]:
        sub = node.setdefault(part, {})
        if not isinstance(sub, dict):
            raise ConfigError(f"{prefix}{part}: expected a mapping of fields, got {sub!r}")
        node = sub
    if parts[-1] in node:
        raise ConfigError(f"{prefix}{old} and {prefix}{key} are both set; keep {prefix}{key} "
                          f"({prefix}{old} is its old name)")
    node[parts[-1]] = value


def _field_default(f: dataclasses.Field):
    """A field's default as a plain value (a nested section as a dict); MISSING if it has none."""
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return dataclasses.MISSING
    return config_to_dict(value) if dataclasses.is_dataclass(value) else value


def _defaults(cls) -> dict:
    out = {}
    for f in dataclasses.fields(cls):
        value = _field_default(f)
        if value is not dataclasses.MISSING:
            out[f.name] = value
    return out


def _normalize(cls, values: dict, prefix: str, seen: set, convert: bool = True, defaults: dict | None = None) -> dict:
    """`values` with every old spelling (ALIASES, nested groups included) renamed to its field;
    with `convert`, Converted old keys are translated too (after every rename, so they see the
    section's other keys whatever their order)."""
    if not isinstance(values, dict):
        return values
    aliases = _aliases(cls)
    values = dict(values)
    for old, new in aliases.items():  # old keys inside a section, moved out of it: "data.val_fraction"
        if "." not in old or isinstance(new, Converted):
            continue
        group, leaf = old.rsplit(".", 1)
        node = values
        for part in group.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node:
            node = dict(node)
            value = node.pop(leaf)
            _set_path(values, group, node)
            _warn_once(prefix + old, prefix + new, seen)
            _put(values, new, value, prefix, old)
    types = _field_types(cls)
    out: dict = {}
    converted = []
    for name, value in values.items():
        alias = aliases.get(name) if isinstance(name, str) else None
        if isinstance(alias, Converted):
            converted.append((name, value, alias))
            continue
        new = _canonical(cls, name, prefix, seen) if isinstance(name, str) else name
        if new == name and isinstance(value, dict) and isinstance(out.get(name), dict):
            merged = dict(out[name])  # a section already holding keys moved into it from flat old ones
            for k, v in value.items():
                _put(merged, k, v, f"{prefix}{name}.", k)
            out[name] = merged
        else:
            _put(out, new, dict(value) if isinstance(value, dict) else value, prefix, name)
    own_defaults = {**_defaults(cls), **(defaults or {})}
    for name, sub in list(out.items()):
        tp = types.get(name)
        if tp is not None and _is_dataclass_type(tp) and isinstance(sub, dict):
            nested = own_defaults.get(name)
            out[name] = _normalize(tp, sub, f"{prefix}{name}.", seen, convert,
                                   nested if isinstance(nested, dict) else None)
    if converted and not convert:  # kept as written for the final pass
        for name, value, _ in converted:
            out[name] = value
        return out
    current = {**own_defaults, **out}  # every converter sees the keys as written, not another's output
    updates: dict = {}
    for name, value, alias in converted:
        _warn_once(prefix + name, alias.new, seen)
        updates.update(alias.fn(value, current))
    for key, new_value in updates.items():
        _set_path(out, key, new_value)
    return out


def _set_path(out: dict, key: str, value) -> None:
    parts = key.split(".")
    node = out
    for part in parts[:-1]:
        nxt = node.get(part)
        node[part] = nxt = dict(nxt) if isinstance(nxt, dict) else {}
        node = nxt
    node[parts[-1]] = value


def config_from_dict(cls, values: dict, prefix: str = "", _seen: set | None = None):
    """Build (and so validate) `cls` from a nested dict; unknown keys raise ConfigError."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping of fields, got {values!r}")
    values = _normalize(cls, values, prefix, set() if _seen is None else _seen)
    types = _field_types(cls)
    unknown = sorted(set(values) - set(types))
    if unknown:
        raise ConfigError(f"unknown config key {prefix + unknown[0]!r}; valid keys: {', '.join(config_keys(cls, prefix))}")
    kwargs = {}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name, value in values.items():
        tp = types[name]
        if _is_dataclass_type(tp):
            if not isinstance(value, tp):  # the keys given, over this command's defaults for the section
                default = _field_default(fields[name])
                if isinstance(default, dict) and isinstance(value, dict):
                    value = {**default, **value}
                value = config_from_dict(tp, value, f"{prefix}{name}.")
            kwargs[name] = value
        else:
            kwargs[name] = _coerce(prefix + name, value, tp)
    try:
        return cls(**kwargs)
    except TypeError as e:  # a missing required field
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from None


class OldKeysAccepted(type):
    """Metaclass of the run configs: `DPOConfig(lr=1e-3, use_lora=False)` (old spellings as keyword
    arguments) is translated as a YAML file would be, with the same one-line notices, so Python
    callers keep working for a release too; a section given as a dict (`optim={"lr": 1e-3}`) sets
    those keys over the command's defaults for it."""

    def __call__(cls, *args, **kwargs):
        if kwargs and dataclasses.is_dataclass(cls):
            types = _field_types(cls)
            if any(k not in types or (_is_dataclass_type(types[k]) and isinstance(v, dict)) for k, v in kwargs.items()):
                kwargs = _translate_kwargs(cls, kwargs)  # old spellings, or a section given as a dict
        return super().__call__(*args, **kwargs)


def _translate_kwargs(cls, kwargs: dict) -> dict:
    plain = {k: config_to_dict(v) if dataclasses.is_dataclass(v) and not isinstance(v, type) else v
             for k, v in kwargs.items()}
    values = _normalize(cls, plain, "", set())
    types = _field_types(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out = {}
    for name, value in values.items():
        if name not in types:
            raise TypeError(f"{cls.__name__}() got an unexpected keyword argument {name!r}; valid keys: "
                            f"{', '.join(config_keys(cls))}")
        tp = types[name]
        if _is_dataclass_type(tp) and isinstance(value, dict):
            default = _field_default(fields[name])
            value = config_from_dict(tp, {**(default if isinstance(default, dict) else {}), **value}, f"{name}.")
        out[name] = value
    return out


def config_to_dict(config) -> dict:
    """A plain nested dict (tuples as lists) that YAML/JSON can store and `config_from_dict` reads back."""
    def plain(v):
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(dataclasses.asdict(config))


def _set_dotted(values: dict, cls, key: str, raw: str, seen: set) -> None:
    valid = config_keys(cls)
    alias = _aliases(cls).get(key)
    if "." in key and alias is not None and not isinstance(alias, Converted):  # a key moved out of a section
        _warn_once(key, alias, seen)
        key = alias
    parts = key.split(".")
    node, node_cls = values, cls
    i = 0
    while i < len(parts):
        part = parts[i]
        where = ".".join(parts[:i]) + "." if i else ""
        alias = _aliases(node_cls).get(part)
        if isinstance(alias, Converted) and i == len(parts) - 1:
            node[part] = yaml.safe_load(raw) if raw.strip() else ""  # translated when the config is built
            return
        new = _canonical(node_cls, part, where, seen)
        if new != part:  # a renamed key, perhaps moved into a section: "lr" -> "optim.lr"
            parts[i:i + 1] = new.split(".")
            continue
        types = _field_types(node_cls)
        if part not in types:
            raise ConfigError(f"unknown config key {key!r}; valid keys: {', '.join(valid)}")
        if i == len(parts) - 1:
            if _is_dataclass_type(types[part]):
                raise ConfigError(f"{key} is a group; set one of its keys, e.g. {key}.{config_keys(types[part])[0]}")
            node[part] = yaml.safe_load(raw) if raw.strip() else ""
            return
        if not _is_dataclass_type(types[part]):
            raise ConfigError(f"unknown config key {key!r}; valid keys: {', '.join(valid)}")
        sub = node.get(part)
        if not isinstance(sub, dict):
            sub = {} if sub is None else sub
            if not isinstance(sub, dict):
                raise ConfigError(f"{'.'.join(parts[:i + 1])}: expected a mapping in the YAML file")
            node[part] = sub
        node, node_cls = sub, types[part]
        i += 1


def list_run_presets() -> list[str]:
    """The run presets shipped with the package, as `kind/name` (`pretrain/tiny-stdlib`)."""
    return sorted(p.relative_to(PRESET_DIR).with_suffix("").as_posix() for p in PRESET_DIR.glob("*/*.yaml")
                  if p.parent.name not in _NOT_RUN_PRESETS)


def resolve_config_path(spec: str | Path) -> Path:
    """An existing YAML file as given, else the packaged preset `spec` names; ConfigError otherwise."""
    path = Path(spec)
    if path.is_file():
        return path
    parts = path.parts
    if not path.is_absolute() and parts:
        if parts[0] == "configs":  # a documented checkout path, run outside the checkout
            parts = parts[1:]
        name = Path(*parts) if parts else Path()
        if name.suffix in (".yaml", ".yml"):
            name = name.with_suffix("")
        name = name.as_posix()
        presets = list_run_presets()
        matches = [p for p in presets if name in (p, p.split("/", 1)[1])]
        if len(matches) == 1:
            return PRESET_DIR / f"{matches[0]}.yaml"
        if len(matches) > 1:
            raise ConfigError(f"--config {spec}: ambiguous preset name; use one of {', '.join(matches)}")
    raise ConfigError(f"--config {spec}: no such file or preset; presets shipped with palm-rlhf: "
                      f"{', '.join(list_run_presets())} (a name like 'tiny-stdlib' or 'pretrain/tiny-stdlib')")


def load_config(cls, path: str | Path | None = None, overrides: Iterable[str] = ()):
    """YAML file or preset name (optional) + dotted `key=value` overrides -> a validated `cls` instance."""
    values: dict = {}
    if path:
        path = resolve_config_path(path)
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise ConfigError(f"--config {path}: cannot read YAML ({e})") from None
        if not isinstance(values, dict):
            raise ConfigError(f"--config {path}: expected a mapping of config fields at the top level")
    seen: set = set()
    values = _normalize(cls, values, "", seen, convert=False)  # Converted keys wait for the overrides
    for item in overrides or ():
        if "=" not in item:
            raise ConfigError(f"override {item!r}: write it as key=value (e.g. optim.lr=1e-3)")
        key, raw = item.split("=", 1)
        _set_dotted(values, cls, key.strip(), raw, seen)
    return config_from_dict(cls, values, _seen=seen)


# ---------------------------------------------------------------- help text for `CMD --help`


def _field_comments(cls) -> dict[str, str]:
    """{field: trailing `# comment`} for the fields declared in `cls`'s own body."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
        tree = ast.parse(source)
        comments = {tok.start[0]: tok.string.lstrip("#").strip()
                    for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    except (OSError, TypeError, SyntaxError, tokenize.TokenError):  # no source (e.g. built in a REPL)
        return {}
    body = next((n.body for n in tree.body if isinstance(n, ast.ClassDef)), [])
    found = {}
    for node in body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            lines = range(node.lineno, (node.end_lineno or node.lineno) + 1)
            text = next((comments[i] for i in lines if i in comments), "")
            if text and not text.startswith("noqa"):
                found[node.target.id] = text
    return found


def _type_name(annotation, resolved) -> str:
    if isinstance(annotation, str):  # postponed annotations read as written: "str | None"
        return annotation
    return getattr(resolved, "__name__", None) or str(resolved).replace("typing.", "")


def config_help(cls, prefix: str = "", defaults=None) -> list[tuple[str, str, object, str]]:
    """(dotted key, type, default, one-line meaning) for every key `cls` accepts, nested groups flattened
    (a section's defaults are the command's: `DPOConfig`'s optim.lr, not `OptimConfig`'s)."""
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):  # a subclass's comment wins; a redeclared field keeps its parent's
        if dataclasses.is_dataclass(klass):
            comments.update(_field_comments(klass))
    types = _field_types(cls)
    rows = []
    for f in dataclasses.fields(cls):
        tp = types[f.name]
        if _is_dataclass_type(tp):
            section = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
            if defaults is not None:
                section = getattr(defaults, f.name, section)
            rows.extend(config_help(tp, f"{prefix}{f.name}.", section))
            continue
        if defaults is not None:
            default = getattr(defaults, f.name)
        elif f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "(required)"
        meaning = f.metadata.get("help") or comments.get(f.name, "")
        rows.append((prefix + f.name, _type_name(f.type, tp), default, meaning))
    return rows
