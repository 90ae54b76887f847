"""The job file: what to segment, with which model, where to, how chunked, on which cluster.

::

    scenes:                       # paths or globs (one scene per file, named by its stem) ...
      - data/image.tif
      - tiles/*.tif
      - name: lc08_scene          # ... or one scene of single-band files, stacked in this order
        bands: [LC08_B2.TIF, LC08_B3.TIF, LC08_B4.TIF, LC08_B5.TIF]
    model: models/landcover       # a model directory
    output: out                   # every scene gets out/<name>/; job.json goes in out/
    chunking: {chunk_size: 1024, halo: null, exact: false, tile_size: null, precision: auto, batch_size: 2}
    inference: {tta: card, mmu: "1000"}   # optional: TTA and post-processing in place of the card's
    outputs: {cog: true, vectors: true}
    objects: {instance_model: models/buildings, max_object_size: 60m}   # optional: panoptic
    cluster:
      profile: gpu
      profiles:
        gpu: {kind: slurm, queue: gpu, cores: 8, memory: 64GiB, model_resources: {GPU: 1}}

Relative paths start at the job file's folder (on the command line and in the environment: at
the current directory). Validating the file (``validate_spec``) touches nothing but the file;
``expand_scenes`` resolves globs; ``geoseg.jobs.runner.plan`` checks the inputs themselves.
"""

from __future__ import annotations

import difflib
import glob
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Iterable, Literal, Mapping, Sequence

import yaml
from pydantic import Field, NonNegativeInt, PositiveInt, PrivateAttr, ValidationError, field_validator, model_validator

from geoseg.errors import ConfigError, InputNotFoundError
from geoseg.io import storage
from geoseg.jobs import config
from geoseg.jobs.profiles import KINDS, PROFILE_CLASSES, AnyProfile, Settings, TLSFiles, scheduler_profile

SCHEDULER_PROFILE = "scheduler"  # the profile --scheduler ADDRESS makes
_NAME = re.compile(r"^[^/\\\x00.][^/\\\x00]*$")
RESERVED_NAMES = ("job.json",)  # what the job itself writes into its output root (geoseg.jobs.runner.JOB_NAME)


class Chunking(Settings):
    chunk_size: PositiveInt | None = None
    halo: NonNegativeInt | None = None
    exact: bool = False
    tile_size: PositiveInt | None = None
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    batch_size: PositiveInt = 2


class Inference(Settings):
    """Test-time augmentation and post-processing in place of the card's (as ``geoseg predict`` takes them)."""

    tta: Literal["card", "none", "d4"] = "card"
    majority: Annotated[int, Field(ge=0, le=16)] | None = None  # with mmu: replaces the card's post-processing
    mmu: str | int | None = None  # "16" or "6=4,1=16" (pixels): replaces the card's; majority 0 alone: none

    @field_validator("mmu")
    @classmethod
    def _mmu(cls, v: str | int | None) -> str | int | None:
        from geoseg.model.card import PostProcess, parse_mmu

        PostProcess(**parse_mmu(v))  # a ValueError saying what to give
        return v

    def postprocess(self) -> Any:
        """The PostProcess in place of the card's, or None (the card's)."""
        from geoseg.model.card import postprocess_in_place

        return postprocess_in_place(self.majority, self.mmu)


class Outputs(Settings):
    cog: bool = True
    vectors: bool = True


class Objects(Settings):
    """Objects with the class map (panoptic), or settings of an instance/SAM ``model``."""

    instance_model: str | None = None  # an instance or SAM model laid over the semantic model's map
    max_object_size: str | int | None = None  # pixels (64, 64px) or metres (30m): the chunks' halo
    score_threshold: float | None = Field(default=None, ge=0, le=1)
    nms_iou: float | None = Field(default=None, ge=0, le=1)
    prompts: str | None = None  # SAM: points or boxes, one object each


class SceneEntry(Settings):
    """One ``scenes`` item: ``path`` (a raster or a glob) or ``bands`` (single-band files, stacked)."""

    name: Annotated[str, Field(pattern=_NAME.pattern)] | None = None
    path: str | None = None
    bands: Annotated[list[str], Field(min_length=1)] | None = None

    @model_validator(mode="after")
    def _one_source(self) -> "SceneEntry":
        if (self.path is None) == (self.bands is None):
            raise ValueError("give either path: (a raster or a glob) or bands: (a list of single-band files), not "
                             + ("both" if self.path is not None else "neither"))
        return self


class ClusterSettings(Settings):
    profile: str = "local"
    profiles: dict[str, AnyProfile] = {}


class JobSpec(Settings):
    """A validated job: every layer merged (defaults < config files < job file < env < command line)."""

    version: Literal[1] = 1
    name: str | None = None
    scenes: Annotated[list[SceneEntry], Field(min_length=1)]
    model: Annotated[str, Field(min_length=1)]
    output: Annotated[str, Field(min_length=1)]
    chunking: Chunking = Chunking()
    outputs: Outputs = Outputs()
    inference: Inference = Inference()
    objects: Objects = Objects()
    cluster: ClusterSettings = ClusterSettings()
    scenes_in_flight: PositiveInt = 2

    _source: Path = PrivateAttr(default=Path("job.yaml"))
    _layers: tuple[config.Layer, ...] = PrivateAttr(default=())

    @field_validator("scenes", mode="before")
    @classmethod
    def _entries(cls, v: Any) -> Any:
        # Shorthands: "a.tif" is {path: a.tif}; [b1.tif, b2.tif] is {bands: [...]}.
        if isinstance(v, str):
            v = [v]
        if isinstance(v, list):
            return [{"path": e} if isinstance(e, str) else {"bands": e} if isinstance(e, list) else e for e in v]
        return v

    @property
    def source(self) -> Path:
        return self._source

    @property
    def layers(self) -> tuple[config.Layer, ...]:
        return self._layers

    @property
    def job_name(self) -> str:
        return self.name or self._source.stem

    @property
    def profile(self) -> Any:
        return self.cluster.profiles[self.cluster.profile]

    @property
    def model_dir(self) -> Path | str:
        """The model directory: a Path, or the URL as given (geoseg.io.storage)."""
        return self.model if storage.is_url(self.model) else Path(self.model)

    @property
    def output_root(self) -> Path | str:
        """The output root: a Path, or a URL prefix such as s3://bucket/run."""
        return self.output.rstrip("/") if storage.is_url(self.output) else Path(self.output)

    def predict_options(self, *, overwrite: bool = False, resume: bool = False) -> Any:
        from dask.utils import parse_timedelta

        from geoseg.pipeline import PredictOptions

        c, p = self.chunking, self.profile
        return PredictOptions(
            chunk_size=c.chunk_size, halo=c.halo, exact=c.exact, tile_size=c.tile_size, precision=c.precision,
            batch_size=c.batch_size, device=p.device, overwrite=overwrite, resume=resume,
            cog=self.outputs.cog, vectors=self.outputs.vectors,
            tta=None if self.inference.tta == "card" else self.inference.tta, postprocess=self.inference.postprocess(),
            model_resources=dict(p.model_resources) if p.model_resources else None,
            # how long the model tasks wait for a worker that can run them, at the start and mid-job
            worker_timeout=float(parse_timedelta(getattr(p, "timeout", None) or "30s", default="s")),
            max_object_size=None if self.objects.max_object_size is None else str(self.objects.max_object_size),
            **{k: getattr(self.objects, k) for k in ("instance_model", "score_threshold", "nms_iou", "prompts")},
        )

    def settings(self) -> dict[str, Any]:
        """The resolved settings, as a job file would hold them."""
        return self.model_dump(mode="json")

    def expand_scenes(self) -> list["Scene"]:
        """The scenes this job names: globs resolved, names given or derived, one output folder each."""
        out = self.output_root
        root = out.resolve() if isinstance(out, Path) else None
        base = self._source.resolve().parent
        scenes: list[Scene] = []
        for i, entry in enumerate(self.scenes):
            where = f"{self._source}: scenes[{i}]"
            if entry.path is not None:
                paths = _expand(entry.path, where, root, base)
                if entry.name and len(paths) > 1:
                    raise ConfigError(f"{where}: {entry.path} matches {len(paths)} files but has one name ({entry.name}); "
                                      "drop name: (each file is then named by its stem) or narrow the pattern")
                scenes += [Scene(entry.name or _stem(p), (p,), storage.join(out, entry.name or _stem(p))) for p in paths]
            else:
                files = []
                for band in entry.bands or ():
                    match = _expand(band, where, root, base)
                    if len(match) > 1:
                        raise ConfigError(f"{where}: band {_short(band, base)} matches {len(match)} files "
                                          f"({', '.join(_short(m, base) for m in match[:3])}"
                                          f"{', ...' if len(match) > 3 else ''}); a band is one file: narrow the pattern")
                    files += match
                name = entry.name or _folder_name(files[0])
                if not name or not _NAME.match(name):
                    raise ConfigError(f"{where}: cannot name this scene after its folder ({name!r}); add name:")
                scenes.append(Scene(name, tuple(files), storage.join(out, name)))
        seen: dict[str, Scene] = {}
        for s in scenes:
            if s.name.casefold() in RESERVED_NAMES:
                raise ConfigError(f"{self._source}: a scene named {s.name!r} ({_short(s.inputs[0], base)}) would take the "
                                  f"name of the job's own {s.name} in the output root; give it another name: "
                                  "(write the scene as {name: ..., path: ...})")
            key = s.name.casefold()  # Tile and tile are one folder on case-insensitive file systems (macOS, Windows, SMB)
            if key in seen:
                raise ConfigError(f"{self._source}: two scenes are named {seen[key].name!r} and {s.name!r} "
                                  f"({_short(seen[key].inputs[0], base)} and {_short(s.inputs[0], base)}) and would share "
                                  "one output folder (names are compared ignoring case); give one a name: "
                                  "(write the scene as {name: ..., path: ...})")
            seen[key] = s
        return scenes


@dataclass(frozen=True)
class Scene:
    """One scene of a job: its name, input rasters (one, or band files in order) and output folder."""

    name: str
    inputs: tuple[str, ...]
    out_dir: Path | str  # a Path, or a URL under a URL output root


def _is_remote(p: str) -> bool:
    return storage.is_url(p) or p.startswith("/vsi")


def _short(p: str, base: Path | None = None) -> str:
    """A path as a message shows it: relative to ``base`` (the job's folder) or the current
    folder where it lies below one of them, else absolute."""
    for start in (base, Path.cwd()):
        if start is None:
            continue
        try:
            rel = os.path.relpath(p, start)
        except ValueError:
            continue
        if not rel.startswith(".."):
            return rel
    return p


def _stem(p: str) -> str:
    return Path(p.rstrip("/")).stem


def _folder_name(p: str) -> str:
    return Path(p).resolve().parent.name if not _is_remote(p) else Path(p).parent.name


def _expand(pattern: str, where: str, output_root: Path | None, base: Path) -> list[str]:
    """A path as given (checked to exist) or a glob's matching files, sorted, outside the output root.

    URLs and GDAL /vsi paths are taken as given (no globbing); opening them checks them.
    """
    if _is_remote(pattern):
        return [pattern]
    if not glob.has_magic(pattern):
        if not os.path.isfile(pattern):
            # the whole path: shown relative to the current folder, it read as relative to the job file's
            raise InputNotFoundError(f"{where}: {os.path.normpath(os.path.abspath(pattern))}: no such file; check the "
                                     "path (relative paths in a job file start at its folder)")
        return [pattern]
    # Earlier results are never inputs: a pattern such as data/**/*.tif must not pick them up on a re-run.
    files = [p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
    found = sorted(p for p in files if not (output_root and Path(p).resolve().is_relative_to(output_root)))
    if not found and files:
        raise InputNotFoundError(f"{where}: the {len(files)} file(s) {_short(pattern, base)} matches lie in the job's "
                                 f"output folder {output_root}, whose files are never inputs; write the outputs elsewhere")
    if not found:
        raise InputNotFoundError(f"{where}: {_short(pattern, base)} matches no file; check the pattern "
                                 "(relative paths in a job file start at its folder)")
    return found


# -- reading and resolving ---------------------------------------------------------------------

class UniqueKeyLoader(config._Yaml12):
    """YAML's safe loader with YAML 1.2's plain scalars, as ``--set`` and the environment read them (a walltime
    12:00:00 stays text, not PyYAML's base-60 43200; yes/no are words), names as text (a scene named 2024), and
    a key given twice in one mapping refused (plain YAML keeps the last without a word)."""

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        merged = 0
        if isinstance(node, yaml.MappingNode):  # merge keys (<<: *base) first: the keys they bring come first
            own = sum(1 for key_node, _ in node.value if key_node.tag != "tag:yaml.org,2002:merge")
            self.flatten_mapping(node)
            merged = len(node.value) - own
        seen: dict[Any, Any] = {}
        for i, (key_node, value_node) in enumerate(node.value):
            key = self.construct_object(key_node, deep=deep)
            if (isinstance(key, str) and key.replace("-", "_") in config._TEXT_KEYS
                    and isinstance(value_node, yaml.ScalarNode) and value_node.style is None
                    and value_node.tag != "tag:yaml.org,2002:null"):
                value_node.tag = "tag:yaml.org,2002:str"
            if i < merged:  # brought in by a merge key: the mapping's own keys override it, as YAML has them
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"{key!r} is given twice in one mapping (lines {seen[key].line + 1} and "
                    f"{key_node.start_mark.line + 1}); keep one", key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def read_job_file(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such job file; check the path")
    try:
        data = yaml.load(path.read_text(), Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f"line {mark.line + 1}: " if mark is not None else ""
        raise ConfigError(f"{path}: {at}not valid YAML ({getattr(exc, 'problem', None) or exc}); fix the syntax") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the job file ({exc})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a job file is a mapping of settings (scenes:, model:, output:, ...), "
                          f"not a {type(data).__name__}")
    return data


def _anchor(value: Any, base: Path) -> Any:
    if isinstance(value, str) and value and not _is_remote(value):
        p = Path(os.path.expanduser(value))
        return os.path.normpath(p if p.is_absolute() else base / p)
    return value


def anchor_paths(layer: config.Layer) -> config.Layer:
    """The layer with its relative paths made absolute against the layer's own base folder."""
    data = dict(layer.data)
    base = layer.base
    for key in ("model", "output"):
        if key in data:
            data[key] = _anchor(data[key], base)
    scenes = data.get("scenes")
    if isinstance(scenes, (str, list)):
        out = []
        for e in [scenes] if isinstance(scenes, str) else scenes:
            if isinstance(e, list):
                e = [_anchor(b, base) for b in e]
            elif isinstance(e, dict):
                e = {**e, **{k: _anchor(e[k], base) for k in ("path",) if k in e}}
                if isinstance(e.get("bands"), list):
                    e["bands"] = [_anchor(b, base) for b in e["bands"]]
            else:
                e = _anchor(e, base)
            out.append(e)
        data["scenes"] = out
    objects = data.get("objects")
    if isinstance(objects, dict):
        data["objects"] = {**objects, **{k: _anchor(objects[k], base) for k in ("instance_model", "prompts") if objects.get(k)}}
    cluster = data.get("cluster")
    if isinstance(cluster, dict) and isinstance(cluster.get("profiles"), dict):
        profiles = {}
        for name, prof in cluster["profiles"].items():
            if isinstance(prof, dict) and isinstance(prof.get("tls"), dict):
                prof = {**prof, "tls": {k: _anchor(v, base) if k.replace("-", "_").endswith("_file") else v
                                        for k, v in prof["tls"].items()}}
            profiles[name] = prof
        data["cluster"] = {**cluster, "profiles": profiles}
    return config.Layer(layer.kind, layer.name, data, base)


def collect_layers(
    path: str | os.PathLike,
    *,
    env: Mapping[str, str] | None = None,
    profile: str | None = None,
    settings: Iterable[str] = (),
    config_files: Iterable[str] | None = None,
) -> tuple[config.Layer, ...]:
    path = Path(path)
    job = config.Layer("job", str(path), read_job_file(path), path.resolve().parent)
    layers = (config.defaults_layer(), config.files_layer(config_files), job, config.env_layer(env),
              config.cli_layer(profile, settings))
    return tuple(anchor_paths(layer) for layer in layers)


def resolve(
    path: str | os.PathLike,
    *,
    env: Mapping[str, str] | None = None,
    profile: str | None = None,
    scheduler: str | None = None,
    settings: Iterable[str] = (),
    config_files: Iterable[str] | None = None,
) -> JobSpec:
    """The job file at ``path`` with every settings layer applied, validated. Touches no input."""
    layers = collect_layers(path, env=env, profile=profile, settings=settings, config_files=config_files)
    merged = config.merge(layers)
    cluster = merged.get("cluster") if isinstance(merged.get("cluster"), dict) else {}
    chosen = cluster.get("profile", "local")
    if scheduler:
        # --scheduler ADDRESS: the chosen profile's TLS files and resources, on that scheduler.
        profiles = dict(cluster.get("profiles") or {})
        profiles[SCHEDULER_PROFILE] = scheduler_profile(scheduler, profiles.get(chosen))
        merged["cluster"] = cluster = {**cluster, "profiles": profiles, "profile": SCHEDULER_PROFILE}
        layers = layers + (config.Layer("cli", "--scheduler", {"cluster": {"profile": SCHEDULER_PROFILE, "profiles": {
            SCHEDULER_PROFILE: profiles[SCHEDULER_PROFILE]}}}, Path.cwd()),)
    try:
        spec = JobSpec.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_report(Path(path), [_describe(e, layers) for e in exc.errors()])) from None
    if spec.cluster.profile not in spec.cluster.profiles:
        loc = ("cluster", "profile")
        src = config.origin(layers, loc)
        known = ", ".join(sorted(spec.cluster.profiles)) or "none"
        raise ConfigError(_report(Path(path), [(
            f"cluster.profile: unknown profile {spec.cluster.profile!r}; define it under cluster.profiles "
            f"or choose one of: {known}", _where(src, loc, Path(path)))]))
    spec._source = Path(path)
    spec._layers = layers
    return spec


def validate_spec(path: str | os.PathLike, **layers: Any) -> JobSpec:
    """Schema-level validation of a job file (with the settings layers); needs no input to exist."""
    return resolve(path, **layers)


# -- error messages ----------------------------------------------------------------------------

_HINTS = {
    "scenes": "list the scenes: raster paths or globs, or {name: ..., bands: [...]} for single-band files",
    "model": "give the model directory (from `geoseg model init` or `geoseg train`)",
    "output": "give the output root folder; every scene gets a folder in it",
    "chunking.precision": "use auto, fp32 or bf16",
    "version": "this geoseg reads version: 1 job files",
}
_FIELDS = sorted({f for m in (JobSpec, Chunking, Outputs, Inference, Objects, SceneEntry, ClusterSettings, TLSFiles, *PROFILE_CLASSES)
                  for f in m.model_fields})


def _clean_loc(loc: Sequence[str | int]) -> tuple[str | int, ...]:
    out: list[str | int] = []
    for i, part in enumerate(loc):
        if i == 3 and tuple(loc[:2]) == ("cluster", "profiles") and part in KINDS:
            continue  # the discriminated union's tag
        if isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool", "none")):
            continue  # a union member's name
        out.append(part)
    return tuple(out)


def _dotted(loc: Sequence[str | int]) -> str:
    s = ""
    for part in loc:
        s += f"[{part}]" if isinstance(part, int) else (f".{part}" if s else str(part))
    return s or "(top level)"


def _where(src: config.Layer | None, loc: Sequence[str | int], job: Path) -> str | None:
    if src is None or src.kind == "job":
        return None
    return src.describe(loc)


def _describe(err: Mapping[str, Any], layers: Sequence[config.Layer]) -> tuple[str, str | None]:
    loc = _clean_loc(err["loc"])
    path = _dotted(loc)
    kind, msg = err["type"], str(err["msg"]).removeprefix("Value error, ")
    value = err.get("input")
    if kind == "missing":
        text = f"{path}: missing; " + _HINTS.get(path, "add it")
    elif kind == "extra_forbidden":
        last = str(loc[-1]) if loc else ""
        close = difflib.get_close_matches(last.replace("-", "_"), _FIELDS, n=1)
        text = f"{path}: unknown setting" + (f"; did you mean {close[0]}?" if close else "; remove it")
    elif kind == "union_tag_not_found":
        text = f"{path}: kind missing; add kind: " + " | ".join(KINDS)
    elif kind == "union_tag_invalid":
        text = f"{path}: kind {err.get('ctx', {}).get('tag')!r} is no cluster profile kind; use one of " + ", ".join(KINDS)
    elif kind == "string_pattern_mismatch" and loc[-1:] == ("name",):
        what = ("a scene name is one folder name: no / or \\, not starting with '.'" if loc[0] == "scenes"
                else "use lowercase letters, digits and '-' (a Kubernetes name)")
        text = f"{path}: {value!r} cannot be used; {what}"
    elif len(loc) == 2 and loc[0] == "scenes" and kind in ("model_type", "dict_type"):
        text = (f"{path}: {value!r} is no scene; write a path or glob, a list of band files, "
                "or {name: ..., path: ...} / {name: ..., bands: [...]}")
    else:
        shown = "" if isinstance(value, (dict, list)) or value is None else f" (got {value!r})"
        text = f"{path}: {msg}{shown}"
        if path in _HINTS:
            text += f"; {_HINTS[path]}"
    return text, _where(config.origin(layers, loc), loc, Path())


def _report(job: Path, problems: list[tuple[str, str | None]]) -> str:
    lines = list(dict.fromkeys(f"{text} (set by {src})" if src else text for text, src in problems))
    if len(lines) == 1:
        return f"{job}: {lines[0]}"
    return f"{job}: {len(lines)} problems:\n" + "\n".join(f"  - {line}" for line in lines)
