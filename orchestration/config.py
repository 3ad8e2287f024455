"""Run config of each asset (the Launchpad): one typed field per setting of the step's params.yaml
section, described by params.yaml's own comment. A field left unset keeps params.yaml's value.
The params.yaml is the project's (RM_ROOT, else the folder Dagster starts in), read as the code
location loads.

The classes are made from rm_lib.settings' dataclasses, so a new setting appears here by itself.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Optional

import dagster as dg
import pydantic
import yaml

from rm_lib.errors import SettingsError
from rm_lib.settings import READ_BY_OTHER_STEPS, Params, shown_value

from .resources import project_params_file

CHECKOUT_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"  # its comments, where a project's lack them


class StepConfig(dg.Config):
    """Settings of one step for this run; unset fields keep params.yaml's values."""

    def overrides(self) -> list[str]:
        """The set fields as `section.key=value` overrides (values as JSON, which YAML reads back)."""
        section = type(self).section
        values = {key: _from_env(value) for key, value in self.model_dump().items()}  # an Any field keeps {env: X}
        return [f"{section}.{key}={json.dumps(value)}" for key, value in values.items() if value is not None]


def _comments(path: Path) -> dict[tuple[str, str], str]:
    """{(section, key): the comment after the key in params.yaml}."""
    found, section = {}, None
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return found
    for line in text.splitlines():
        top = re.match(r"^(\w+):", line)
        if top:
            section = top.group(1)
            continue
        item = re.match(r"^\s+(\w+):[^#]*#\s*(.+)$", line)
        if item and section:
            found[(section, item.group(1))] = item.group(2).strip()
    return found


def _optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        options = [o for o in typing.get_args(annotation) if o is not type(None)]
        if len(options) > 1:  # `auto` or a number (or true): Dagster config has no such union; the settings check
            return Optional[Any]  # the value, and a field of text refused `true` and `4096` as params.yaml writes them
        return annotation if type(None) in typing.get_args(annotation) else Optional[annotation]
    return Optional[annotation]


def _defaults(path: Path, section: str) -> dict[str, Any]:
    """params.yaml's values of `section`, for the descriptions only; {} without the file (the built-in
    defaults then), or with one that cannot be read: its mistake is the steps' to name, in one line, and
    the code location must load to show it."""
    try:
        values = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get(section) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError, AttributeError, RecursionError):  # nested too deep
        return {}
    return values if isinstance(values, dict) else {}


def _size(value: Any, budget: int) -> int:
    """About how many characters `value` takes as JSON, counted up to `budget` (a YAML alias bomb holds
    9**9 values, or 998 copies of a 1 MB string, in a few hundred bytes or one MB: past it the count stops)."""
    count, waiting = 0, [value]
    while waiting and count <= budget:
        item = waiting.pop()
        if isinstance(item, dict):
            count += 2 + 2 * len(item)
            waiting.extend(item.values())
            waiting.extend(item.keys())
        elif isinstance(item, (list, tuple)):
            count += 2 + len(item)
            waiting.extend(item)
        else:
            count += len(item) if isinstance(item, str) else 8
    return count


def _as_text(value: Any) -> str:
    """params.yaml's value as the description shows it: JSON, or cut short where it holds too much."""
    return json.dumps(value, default=str) if _size(value, 2_000) <= 2_000 else shown_value(value)


def config_class(section: str, params_file: Optional[Path] = None) -> type[StepConfig]:
    """A dg.Config class with every setting of `section` that no other step reads, all optional
    (unset = params.yaml), described by the project's params.yaml (`params_file`, by default the one
    the runs read: resources.project_params_file)."""
    params_file = params_file or project_params_file()
    settings_cls = typing.get_type_hints(Params)[section]
    hints = typing.get_type_hints(settings_cls)
    defaults = _defaults(params_file, section)
    comments = {**_comments(CHECKOUT_PARAMS), **_comments(params_file)}
    fields = {}
    for f in dataclasses.fields(settings_cls):
        if (section, f.name) in READ_BY_OTHER_STEPS:  # set for every step alike: params.yaml, the project's overrides
            continue
        default = defaults.get(f.name, f.default)
        note = comments.get((section, f.name))
        description = (f"{section}.{f.name}" + (f": {note}" if note else "")
                       + f". Unset: params.yaml's value ({_as_text(default)}).")
        fields[f.name] = (_optional(hints[f.name]), pydantic.Field(default=None, description=description))
    cls = pydantic.create_model(f"{section.capitalize()}Config", __base__=StepConfig, **fields)
    cls.section = section
    cls.__doc__ = f"Settings of the {section} step for this run (params.yaml's `{section}:` section)."
    return cls


DownloadConfig = config_class("download")
TokenizeConfig = config_class("tokenize")
FilterConfig = config_class("filter")
TrainConfig = config_class("train")
EvaluateConfig = config_class("evaluate")
PushConfig = config_class("push")


CONFIG_OF_SECTION: dict[str, type[StepConfig]] = {c.section: c for c in (
    DownloadConfig, TokenizeConfig, FilterConfig, TrainConfig, EvaluateConfig, PushConfig)}


def _from_env(value: Any) -> Any:
    """A value as the asset reads it: Dagster's `{env: NAME}` source is the variable's text (the run's own
    config keeps the source, and the config class would refuse it)."""
    if isinstance(value, dict) and list(value) == ["env"]:
        if value["env"] not in os.environ:  # Dagster refuses an unset one for a typed field: so do we
            raise SettingsError(f"{{env: {value['env']}}}: the environment variable {value['env']} is not set")
        return os.environ[value["env"]]
    return value


def launchpad_overrides(run_config: dict, asset: str, config_class: type[StepConfig]) -> list[str]:
    """The settings entered for `asset` in this run's config (the Launchpad), as overrides."""
    entered = ((run_config.get("ops") or {}).get(asset) or {}).get("config") or {}
    return config_class(**{key: _from_env(value) for key, value in entered.items()}).overrides()  # text: {env} refused


def run_overrides(run_config: dict, section_of_asset: dict[str, str]) -> list[str]:
    """Every asset's settings entered in this run's config, as overrides: the whole run's settings, checked
    before its first step changes anything (the CLI's `run` checks them all before download)."""
    return [override for asset, section in section_of_asset.items()
            for override in launchpad_overrides(run_config, asset, CONFIG_OF_SECTION[section])]
