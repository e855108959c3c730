"""Explicit configuration: one YAML file per setting, saved beside every output it produced."""

from __future__ import annotations

import copy
import os
import platform
from dataclasses import asdict, fields, is_dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import yaml

from mammo_tf.io import atomic_write_text, load_json

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration file is missing, malformed or names an unknown key."""


def load_config(path: str | os.PathLike) -> dict:
    """Read a YAML (or JSON) configuration file into a dict, with a clear error when malformed."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: configuration file not found")
    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(cfg).__name__}")
    cfg.setdefault("name", path.stem)
    return cfg


def save_config(cfg: Any, path: str | os.PathLike) -> Path:
    """Write a config (dict or dataclass) as YAML, atomically."""
    data = asdict(cfg) if is_dataclass(cfg) else cfg
    return atomic_write_text(path, yaml.safe_dump(_plain(data), sort_keys=False))


def from_dict(cls: type[T], data: dict | None) -> T:
    """Build dataclass `cls` from a dict, rejecting unknown keys (typos must not pass silently)."""
    data = dict(data or {})
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown keys {unknown} (known: {sorted(known)})")
    return cls(**data)


def merge(base: dict, override: dict | None) -> dict:
    """Deep-merge `override` into a copy of `base`."""
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def provenance(command: str | None = None) -> dict:
    """Who ran what where: command, date, hardware, library versions (stored with every result)."""
    import keras

    versions = {"python": platform.python_version(), "keras": keras.__version__, "backend": keras.backend.backend()}
    if keras.backend.backend() == "jax":
        import jax

        gpus = [f"{d.platform}:{d.id} {d.device_kind}" for d in jax.devices() if d.platform == "gpu"]
        versions["jax"] = jax.__version__
    else:
        import tensorflow as tf

        gpus = [d.name for d in tf.config.list_physical_devices("GPU")]
        versions["tensorflow"] = tf.__version__
    return {
        "command": command,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "hardware": {
            "cpu": _cpu_name(),
            "cpu_count": os.cpu_count(),
            "gpus": gpus or "none",
            "platform": platform.platform(),
        },
        "versions": versions,
    }


def hardware_label(prov: dict) -> str:
    """A provenance's machine in one line: CPU, cores and GPUs."""
    hw = prov["hardware"]
    gpus = hw["gpus"] if isinstance(hw["gpus"], str) else ", ".join(hw["gpus"])
    return f"{hw['cpu']} ({hw['cpu_count']} cores), GPU: {gpus}"


def keep_training_provenance(prov: dict, earlier_metrics: str | Path) -> dict:
    """On a re-evaluation, copy into ``prov`` how, when and where the models were trained (from the earlier metrics.json)."""
    path = Path(earlier_metrics)
    if path.is_file():
        old = load_json(path).get("provenance", {})
        trained = old.get("trained_by")
        if trained is None and "evaluate" not in str(old.get("command")):  # an evaluation records no training
            trained = {k: old[k] for k in ("command", "date", "wall_time_s", "hardware") if k in old}
        if trained:
            prov["trained_by"] = trained
    return prov


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return obj
