"""params.yaml: one section per step, each loaded into the frozen pydantic model its step declares."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from tasks.lib.errors import ConfigError

REPO_PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"
# A deployment (or a test) points every step, CLI and DAG at another params file with this variable.
PARAMS_ENV = "CLOUDSCREEN_PARAMS"
DEFAULT_PARAMS = REPO_PARAMS


def default_params() -> Path:
    """$CLOUDSCREEN_PARAMS, else the project's params.yaml (read at each call: a test or a DAG run may set it)."""
    return Path(os.environ.get(PARAMS_ENV) or REPO_PARAMS)


class StepParams(BaseModel):
    """Base of every step's parameter model: immutable, and unknown keys are an error, not ignored."""

    model_config = ConfigDict(frozen=True, extra="forbid")


P = TypeVar("P", bound=StepParams)


def read_params_file(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: params file not found") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` overrides (value parsed as YAML) to a copy of the params mapping."""
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for item in overrides:
        dotted, sep, raw = item.partition("=")
        if not sep or "." not in dotted:
            raise ConfigError(f"--set {item!r}: expected SECTION.KEY=VALUE")
        *sections, key = dotted.split(".")
        node = merged
        for name in sections:
            child = node.get(name)
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: no section {name!r} in params")
            node[name] = child = dict(child)
            node = child
        try:
            node[key] = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: value is not valid YAML: {exc}") from exc
    return merged


def load_section(section: str, model: type[P], path: Path | None = None, overrides: Sequence[str] = ()) -> P:
    """Load one step's section of params.yaml (default: `default_params()`), with overrides, into its model.

    Raises:
        ConfigError: the file, the section or a value is missing or invalid; the message names which.
    """
    path = path or default_params()
    data = apply_overrides(read_params_file(path), list(overrides))
    if section not in data:
        raise ConfigError(f"{path}: no section {section!r}")
    try:
        return model.model_validate(data[section])
    except ValidationError as exc:
        problems = "; ".join(f"{section}.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors())
        raise ConfigError(f"{path}: {problems}") from exc
