"""The classes file (classes.yaml): class ids, names and colours, as the card stores them."""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from pydantic import ValidationError

from geoseg.errors import InputError, InputNotFoundError
from geoseg.model.card import ClassInfo


def load_classes(path: str | os.PathLike) -> tuple[ClassInfo, ...]:
    """Classes from a classes.yaml, sorted by id: a list of {id, name, color} (or {classes: [...]}).

    Ids must be unique integers 0-254; a missing colour is grey.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise InputNotFoundError(f"{path}: classes file not found; give a YAML list of {{id, name, color}}") from None
    except (UnicodeDecodeError, IsADirectoryError):
        raise InputError(f"{path}: not a text file; the classes file is YAML, a list of {{id, name, color}}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if isinstance(data, dict) and "classes" in data:
        data = data["classes"]
    if not isinstance(data, list) or not data:
        raise InputError(f"{path}: expected a non-empty list of {{id, name, color}} entries")
    classes = []
    for i, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise InputError(f"{path}: entry {i} is {entry!r}, expected a mapping with id, name, color")
        if isinstance(entry.get("id"), bool):  # YAML's yes/no would otherwise pass as 1/0
            raise InputError(f"{path}: entry {i} has id {entry['id']!r}; class ids are integers 0-254")
        try:
            classes.append(ClassInfo.model_validate(entry))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "entry"
            raise InputError(f"{path}: entry {i} ({where}): {first['msg']}; ids are 0-254, colours #rrggbb") from None
    ids = [c.id for c in classes]
    if len(set(ids)) != len(ids):
        dupes = sorted({x for x in ids if ids.count(x) > 1})
        raise InputError(f"{path}: class ids must be unique: {dupes} listed more than once")
    names = [c.name.casefold() for c in classes]
    dup_names = sorted({c.name for c in classes if names.count(c.name.casefold()) > 1})
    if dup_names:
        raise InputError(f"{path}: class names must be unique: {dup_names} listed more than once")
    return tuple(sorted(classes, key=lambda c: c.id))
