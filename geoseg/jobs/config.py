"""geoseg's settings, layered the way dask layers its own configuration.

The packaged ``geoseg/geoseg.yaml`` becomes the ``geoseg`` namespace of dask's defaults (as
``distributed/config.py`` does for ``distributed``), so ``dask.config.get("geoseg.…")`` works
everywhere. A job resolves its settings from five layers, later wins: packaged defaults < dask
config files < the job file < environment (``DASK_GEOSEG__…``) < command line.

dask's own merged config already holds defaults, files and environment, but the job file has to
sit between files and environment, so the layers are collected here one by one.
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import dask.config
import yaml

from geoseg.errors import ConfigError

DEFAULTS_PATH = Path(__file__).resolve().parents[1] / "geoseg.yaml"
NAMESPACE = "geoseg"

with open(DEFAULTS_PATH) as _f:
    _PACKAGED: dict[str, Any] = yaml.safe_load(_f)

dask.config.update_defaults(_PACKAGED)


@dataclass(frozen=True)
class Layer:
    """One source of settings: its ``geoseg`` namespace and where relative paths in it start."""

    kind: str  # defaults | files | job | env | cli
    name: str  # how messages name it
    data: Mapping[str, Any]
    base: Path

    def has(self, loc: Sequence[str | int]) -> bool:
        node: Any = self.data
        for part in loc:
            if isinstance(node, Mapping) and part in node:
                node = node[part]
            elif isinstance(node, Mapping) and isinstance(part, str) and part.replace("_", "-") in node:
                node = node[part.replace("_", "-")]
            elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
                node = node[part]
            else:
                return False
        return True

    def describe(self, loc: Sequence[str | int]) -> str:
        """Where a value at ``loc`` was set, in the words a user would search for."""
        if self.kind == "env":
            return "DASK_GEOSEG__" + "__".join(str(p).upper() for p in loc if not isinstance(p, int))
        return self.name


def packaged_defaults() -> dict[str, Any]:
    return copy.deepcopy(_PACKAGED[NAMESPACE])


def defaults_layer() -> Layer:
    return Layer("defaults", "geoseg's packaged defaults", packaged_defaults(), Path.cwd())


def files_layer(paths: Iterable[str] | None = None) -> Layer:
    """The ``geoseg`` sections of dask's YAML config files (/etc/dask, ~/.config/dask, $DASK_CONFIG)."""
    try:
        found = dask.config.collect_yaml(list(paths if paths is not None else dask.config.paths))
    except Exception as exc:  # dask raises whatever the YAML parser raised, naming the file
        raise ConfigError(f"a dask config file cannot be read ({exc}); fix or remove it") from None
    data = dask.config.merge(*found).get(NAMESPACE) or {}
    return Layer("files", "dask config files", data if isinstance(data, dict) else {}, Path.cwd())


_TEXT_KEYS = frozenset({"name", "job_name", "queue", "account", "namespace", "image"})  # text even when it reads as a number


class _Yaml12(yaml.SafeLoader):
    """YAML with YAML 1.2's plain scalars: true/false only for booleans (not yes/no/on/off), and no base-60
    numbers (PyYAML's 1.1 reads a walltime 12:00:00 as 43200)."""


_Yaml12.yaml_implicit_resolvers = {  # 1.2's core schema has no timestamps either: 2024-01-01 stays text
    first: [(tag, rx) for tag, rx in resolvers if tag.rsplit(":", 1)[-1] not in ("bool", "int", "float", "timestamp")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Yaml12.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^[-+]?[0-9]+$"), list("-+0123456789"))
_Yaml12.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))

_Yaml12.add_constructor("tag:yaml.org,2002:int", lambda loader, node: int(loader.construct_scalar(node)))  # 0755 is 755


def parse_value(key: str, raw: str) -> Any:
    """A setting's value from text (``--set``, ``DASK_GEOSEG__...``): YAML 1.2 plain scalars and flow lists and maps
    (``none`` stays the word: dask's parser made it None; ``null`` is no value), names kept as text (a job named
    2024)."""
    if key.replace("-", "_") in _TEXT_KEYS:
        return raw
    try:
        value = yaml.load(raw, Loader=_Yaml12)  # noqa: S506  (a safe loader)
    except yaml.YAMLError:
        return raw
    return raw if value is None and raw.strip() not in ("null", "Null", "NULL", "~") else value


def _put(data: dict[str, Any], parts: Sequence[str], value: Any, source: str) -> None:
    """``value`` at the nested key ``parts`` of ``data``; ``source`` (the variable or --set) names a clash."""
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{source}: {part} is set to a value elsewhere; set the nested keys only")
    node[parts[-1]] = value


def env_layer(env: Mapping[str, str] | None = None) -> Layer:
    """``DASK_GEOSEG__A__B=value`` variables, read now (dask's own copy was read at import), values parsed as
    ``--set`` parses them."""
    prefix = f"DASK_{NAMESPACE.upper()}__"
    data: dict[str, Any] = {}
    for var, raw in sorted((os.environ if env is None else env).items()):
        if not var.startswith(prefix):
            continue
        parts = [p.lower() for p in var[len(prefix):].split("__") if p]
        if not parts:
            continue
        _put(data, parts, parse_value(parts[-1], raw), var)
    return Layer("env", "environment", data, Path.cwd())


def cli_layer(profile: str | None = None, settings: Iterable[str] = ()) -> Layer:
    """``--profile NAME`` and ``--set dotted.key=value`` (values parsed as YAML)."""
    data: dict[str, Any] = {}
    for item in settings:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, for example --set chunking.chunk_size=1024")
        parts = key.strip().split(".")
        _put(data, parts, parse_value(parts[-1], raw), f"--set {item!r}")
    if profile:
        data.setdefault("cluster", {})["profile"] = profile
    return Layer("cli", "the command line", data, Path.cwd())


def merge(layers: Sequence[Layer]) -> dict[str, Any]:
    """The layers merged, later wins, nested mappings merged key by key (``a-b`` matches ``a_b``; one layer
    giving both is refused: which one would win is not what it says). A cluster profile that a later layer gives
    another ``kind`` is replaced whole: a local profile's n_workers under a slurm one was said to be "unknown;
    did you mean n_workers?"."""
    for layer in layers:
        _one_spelling(layer, layer.data, ())
    merged: dict[str, Any] = {}
    for layer in layers:
        data = copy.deepcopy(dict(layer.data))
        before = (merged.get("cluster") or {}).get("profiles") if isinstance(merged.get("cluster"), Mapping) else None
        cluster = data.get("cluster")
        later = cluster.get("profiles") if isinstance(cluster, Mapping) else None
        if isinstance(before, dict) and isinstance(later, Mapping):
            for name, profile in later.items():
                old = before.get(name)
                if (isinstance(profile, Mapping) and isinstance(old, Mapping) and "kind" in profile
                        and old.get("kind", profile["kind"]) != profile["kind"]):
                    del before[name]
        merged = dask.config.merge(merged, data)
    return merged


def _one_spelling(layer: Layer, node: Any, loc: tuple[str, ...]) -> None:
    if not isinstance(node, Mapping):
        return
    seen: dict[str, str] = {}
    for k, v in node.items():
        if isinstance(k, str):
            canon = k.replace("-", "_")
            if canon in seen:
                where = ".".join((*loc, canon))
                raise ConfigError(f"{layer.describe((*loc, canon))}: {where} is given twice (as {seen[canon]} and {k}); keep one")
            seen[canon] = k
        _one_spelling(layer, v, (*loc, str(k)))


def origin(layers: Sequence[Layer], loc: Sequence[str | int]) -> Layer | None:
    """The layer whose value for ``loc`` won, if any set it."""
    for layer in reversed(layers):
        if layer.has(loc):
            return layer
    return None
