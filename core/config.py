"""Config loading: dataclass schema -> preset -> YAML -> command-line dotlist, merged with OmegaConf.

Every trainer and command describes its settings as dataclasses next to the code that uses them and composes
them into one top-level config. ``load_config`` merges, in this fixed order,

1. the structured schema (types and defaults),
2. the preset named by the YAML or the command line (``model.preset=2d-S-S``), when the schema has presets,
3. the YAML file,
4. the dotlist overrides (``model.decoder.depth=12``),

and returns the dataclass instance, so ``__post_init__`` validation runs. A YAML may start from another one with a
top-level ``extends: tokenizer/gigatok`` (a name under conf/ or a path relative to the YAML's folder): the parent
is merged first and the child's keys win, so a recipe states only what differs from its base. An unknown key or a value of the
wrong type raises :class:`ConfigError` naming the key and the file, before any work starts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


class ConfigError(ValueError):
    """A user mistake in a config file or override; the message names the key."""


def conf_dir() -> Path:
    """The conf/ folder: the installed ``tokscale.conf`` package, or the checkout's conf/."""
    try:
        import tokscale.conf as conf_pkg

        return Path(conf_pkg.__file__).resolve().parent
    except ImportError:  # pragma: no cover - running from a bare checkout
        return CONF_DIR


def resolve_config_path(name: str | Path) -> Path:
    """A YAML path, or a name relative to conf/ with or without ``.yaml`` (``tokenizer/demo``)."""
    p = Path(name)
    if p.is_file():
        return p
    for cand in (conf_dir() / p, conf_dir() / p.with_suffix(".yaml")):
        if cand.is_file():
            return cand
    raise ConfigError(
        f"config file {str(name)!r} not found: expected a YAML path or a name under {conf_dir()} "
        f"(for example tokenizer/demo)"
    )


def schema_names() -> list[str]:
    """Config schemas by name: one per registered trainer (tokscale.registry), its conf/<name>/ folder."""
    from tokscale.registry import trainer_specs

    return sorted(trainer_specs())


def schema_task(name: str):
    """The Task class whose config schema is called ``name``."""
    from tokscale.registry import trainer

    if name not in schema_names():
        raise ConfigError(f"unknown config schema {name!r}; expected one of {schema_names()}")
    return trainer(name)


def infer_schema_name(path: Path) -> str:
    """The YAML's top-level ``schema:`` key (run directories record it); otherwise conf/<schema>/<file>.yaml."""
    raw = OmegaConf.load(path)
    if isinstance(raw, DictConfig) and "schema" in raw:
        return str(raw.schema)
    if path.parent.name in schema_names():
        return path.parent.name
    raise ConfigError(
        f"{path}: cannot tell which schema this config uses; put it under conf/<schema>/ or add a top-level "
        f"'schema:' key with one of {schema_names()}"
    )


def load_yaml(path: Path, _seen: tuple[Path, ...] = ()) -> DictConfig:
    """A config YAML with its ``extends:`` chain merged in (parents first) and the ``extends`` key removed."""
    path = path.resolve()
    if path in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path))
        raise ConfigError(f"config 'extends' forms a cycle: {chain}")
    try:
        raw = OmegaConf.load(path)
    except (OmegaConfBaseException, ValueError) as err:  # YAML syntax errors surface as ValueError subclasses
        raise ConfigError(f"{path}: not a readable YAML config: {str(err).splitlines()[0]}") from None
    if not isinstance(raw, DictConfig):
        raise ConfigError(f"{path}: a config file is a YAML mapping, got {type(raw).__name__}")
    if "extends" not in raw:
        return raw
    parent_name = raw.extends
    if not isinstance(parent_name, str) or not parent_name:
        raise ConfigError(
            f"{path}: 'extends' must name a config (for example tokenizer/gigatok), got {parent_name!r}"
        )
    local = [c for c in (path.parent / parent_name, path.parent / f"{parent_name}.yaml") if c.is_file()]
    parent_path = local[0] if local else resolve_config_path(parent_name)
    parent = load_yaml(parent_path, (*_seen, path))
    child = OmegaConf.masked_copy(raw, [k for k in raw if k != "extends"])
    return _merge(parent, child, str(path))


def _describe(err: OmegaConfBaseException, source: str) -> str:
    key = getattr(err, "full_key", None) or getattr(err, "key", None)
    msg = str(err).splitlines()[0]
    where = f" (from {source})" if source else ""
    if key:
        return f"config key {key!r}{where}: {msg}"
    return f"config error{where}: {msg}"


def _merge(base: DictConfig, other: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as err:
        raise ConfigError(_describe(err, source)) from None


def load_config(
    schema: type[T],
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    presets: Callable[[str], dict] | None = None,
    preset_key: str = "model.preset",
) -> T:
    """Merge schema -> preset -> YAML -> overrides and return the validated dataclass instance.

    ``presets(name)`` returns the nested dict a preset name stands for (merged at ``preset_key``'s parent);
    it raises ValueError for an unknown name.
    """
    if not dataclasses.is_dataclass(schema):
        raise TypeError(f"{schema} is not a dataclass")
    cfg = OmegaConf.structured(schema)
    yaml_cfg = OmegaConf.create()
    src = ""
    if path is not None:
        p = resolve_config_path(path)
        src = str(p)
        yaml_cfg = load_yaml(p)
        if "schema" in yaml_cfg:
            yaml_cfg = OmegaConf.masked_copy(yaml_cfg, [k for k in yaml_cfg if k != "schema"])
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"override {item!r} is not of the form key=value (for example model.decoder.depth=12)"
            )
    try:
        cli_cfg = OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as err:
        raise ConfigError(_describe(err, "command line")) from None

    if presets is not None:
        # The preset is named by the YAML or the command line; it sits under the schema, beneath both.
        peek = OmegaConf.merge(yaml_cfg, cli_cfg)
        name = OmegaConf.select(peek, preset_key, default=None)
        if name is not None:
            try:
                preset = presets(str(name))
            except ValueError as err:
                raise ConfigError(f"config key {preset_key!r}: {err}") from None
            parent = preset_key.rpartition(".")[0]
            nested = OmegaConf.create()
            if parent:
                OmegaConf.update(nested, parent, preset, force_add=True)
            else:
                nested.merge_with(preset)
            cfg = _merge(cfg, nested, f"preset {name!r}")
    cfg = _merge(cfg, yaml_cfg, src)
    cfg = _merge(cfg, cli_cfg, "command line")
    try:
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        raise ConfigError(_describe(err, src or "command line")) from None
    except ValueError as err:
        raise ConfigError(f"{src or 'config'}: {err}") from None


def to_yaml(cfg: Any) -> str:
    """The resolved YAML of a dataclass config (what `config show` prints and run dirs store)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Any) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def diff_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts (for resume-compatibility checks)."""
    keys = []
    for k in sorted(set(a) | set(b)):
        full = f"{prefix}{k}"
        va, vb = a.get(k, None), b.get(k, None)
        if isinstance(va, dict) and isinstance(vb, dict):
            keys += diff_keys(va, vb, full + ".")
        elif va != vb:
            keys.append(full)
    return keys
