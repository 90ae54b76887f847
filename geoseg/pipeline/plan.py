"""Planning a prediction: inputs, model and OUT checked, tiling planned; nothing runs, nothing is written."""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

from geoseg.bands import match_bands
from geoseg.errors import ConfigError, OutputExistsError
from geoseg.infer import InferenceSettings
from geoseg.io import storage
from geoseg.io.sources import RasterStack, open_stack
from geoseg.model.card import ModelCard, PostProcess
from geoseg.model.store import open_model
from geoseg.pipeline.sieve import sieve_joined
from geoseg.runtime import ModelRef
from geoseg.tiling import DEFAULT_CHUNK, TilingPlan, plan_for

ZARR_NAME, COG_NAME, VECTOR_NAME, RUN_NAME = "prediction.zarr", "classes.tif", "landuse.gpkg", "run.json"
COG_STYLE, ITEM_NAME = "classes.qml", "item.json"
INSTANCE_COG, OBJECTS_NAME = "instances.tif", "objects.gpkg"
OUTPUTS = (ZARR_NAME, COG_NAME, COG_STYLE, VECTOR_NAME, ITEM_NAME, RUN_NAME, INSTANCE_COG, OBJECTS_NAME)
PARTIAL = ".partial"
STAGING = ".geoseg-staging-"
DEFAULT_PRECISION = "auto"  # decided on the model's workers: see geoseg.numerics


@dataclass(frozen=True)
class PredictOptions:
    chunk_size: int | None = None
    halo: int | None = None
    exact: bool = False
    tile_size: int | None = None
    precision: str = DEFAULT_PRECISION
    batch_size: int = 2
    device: str = "auto"
    overwrite: bool = False
    resume: bool = False
    cog: bool = True
    vectors: bool = True
    model_resources: dict[str, float] | None = None
    worker_timeout: float = 30.0  # s to wait for a worker that can run the model tasks
    pause_timeout: float = 300.0  # s every such worker may stay paused (memory) before the job stops
    tta: str | None = None  # test-time augmentation: None = as the card says, "none" or "d4"
    postprocess: PostProcess | None = None  # majority filter and sieve: None = as the card says
    prompts: str | None = None  # SAM: points or boxes (a vector file in any CRS) to segment, one object each
    instance_model: str | None = None  # panoptic: an instance model run in the same job over a semantic model's map
    # object models: the largest object expected ("64", "64px", "30m": the chunks' halo), and
    # the detection settings (None: as the card says)
    max_object_size: str | None = None
    score_threshold: float | None = None
    nms_iou: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.postprocess, dict):  # the Python API's options (geoseg.api.objects) as a dict
            object.__setattr__(self, "postprocess", PostProcess.of(self.postprocess))

    def instance_params(self) -> dict[str, float]:
        return {k: v for k, v in (("score_threshold", self.score_threshold), ("nms_iou", self.nms_iou)) if v is not None}


@dataclass(frozen=True)
class Job:
    """Everything checked and planned for one scene; nothing has run yet."""

    inputs: tuple[str, ...]
    model_dir: str
    out_dir: Path | str  # a Path for a local directory, a str for a URL prefix
    stack: RasterStack
    card: ModelCard
    digest: str
    plan: TilingPlan
    options: PredictOptions
    key: str = field(default="")
    objects: "Job | None" = None  # panoptic: the instance model's job, painted over this one's class map

    @property
    def postprocess(self) -> PostProcess:
        """The majority filter and sieve this job runs: its options', else the card's."""
        return self.card.postprocess if self.options.postprocess is None else self.options.postprocess

    def settings(self, precision: str) -> InferenceSettings:
        pp = self.postprocess
        return InferenceSettings(precision, self.options.batch_size, tta=self.options.tta,
                                 postprocess=pp.without_sieve() if sieve_joined(pp) else pp)

    @property
    def model_location(self) -> str:
        """The model directory as workers find it: an absolute path or the URL."""
        return self.model_dir if storage.is_url(self.model_dir) else str(Path(self.model_dir).resolve())

    @property
    def ref(self) -> ModelRef:
        return ModelRef(self.model_location, self.digest, self.options.device)


def input_identity(path: str) -> list:
    """An input's identity and, for a local file, that of every file GDAL reads for it (the rasters
    behind a VRT, a sidecar .ovr or .aux.xml): a band file rewritten behind an unchanged VRT is a
    new input, and a resumed job does not reuse chunks of the old one."""
    ident = storage.identity(path)
    import rasterio

    def location(f: str) -> str:  # GDAL's name of a file as geoseg names it (an object's ETag is then known)
        for vsi, sch in (("/vsis3/", "s3://"), ("/vsigs/", "gs://"), ("/vsicurl/", "")):
            if f.startswith(vsi):
                return sch + f[len(vsi):]
        return _archive(f) or (f if storage.is_url(f) else os.path.abspath(f))

    # a subdataset (GTIFF_DIR:1:f.tif, NETCDF:"f.nc":var) or a /vsizip/ member is known by the files GDAL reads
    # for it: by its name alone, a file rewritten under it would be the same input, and --resume reuse old chunks
    me = location(str(path)) if storage.is_url(path) or os.path.isfile(path) else str(path)
    try:
        with storage.gdal_env(path), rasterio.open(path) as ds:
            # under a URL too: a VRT on an object store whose source object was replaced is a new input
            files = [f for f in map(location, ds.files) if f != me]
    except Exception:  # unreadable here: open_stack has already said so, or the workers will
        return ident
    return [*ident, *(storage.identity(f) for f in sorted(files))]


# files beside a vector file that its readers read too: a Shapefile's index, attributes, CRS and encoding, a
# GeoPackage's write-ahead log (where QGIS keeps edits not yet written back)
_VECTOR_SIDECARS = {".shp": (".shx", ".dbf", ".prj", ".cpg"), ".gpkg": ("-wal",)}


def vector_identity(path: str) -> list:
    """A vector file's identity with that of the files beside it that its readers read (a corrected .prj moves
    every prompt: by the .shp alone, a job with it was the same job)."""
    ident = storage.identity(path)
    if storage.is_url(path):
        return ident
    root, ext = os.path.splitext(path)
    sidecars = []
    for suffix in _VECTOR_SIDECARS.get(ext.lower(), ()):
        f = path + suffix if suffix.startswith("-") else root + suffix
        if os.path.isfile(f):
            sidecars.append(storage.identity(f))
    return [*ident, *sidecars]


_ARCHIVES = ("/vsizip/", "/vsitar/", "/vsigzip/", "/vsi7z/", "/vsirar/")


def _archive(f: str) -> str | None:
    """The local archive file of a GDAL archive path (/vsizip//d/a.zip/b.tif or /vsizip/{/d/a.zip}/b.tif), else None."""
    prefix = next((a for a in _ARCHIVES if f.startswith(a)), None)
    if prefix is None:
        return None
    rest = f[len(prefix):]
    if rest.startswith("{") and "}" in rest:
        rest = rest[1:rest.index("}")]
    while rest and rest != os.path.dirname(rest):
        if os.path.isfile(rest):
            return os.path.abspath(rest)
        rest = os.path.dirname(rest)
    return None


def job_key(inputs: Sequence[str], digest: str, plan: TilingPlan, options: PredictOptions, sieve: bool = False) -> str:
    """What a finished output's reuse depends on: inputs, model, plan and the numerics asked for.

    Chunks are reused under ``chunk_key``, which adds the numerics the workers resolved.
    """
    blob = json.dumps(
        {
            "inputs": [input_identity(p) for p in inputs],
            "model": digest,
            "plan": plan.describe(),
            "precision": options.precision,
            "exact": options.exact,
            "device": options.device,
            "batch_size": options.batch_size,
            "tta": options.tta,
            "instance": options.instance_params(),
            "instance_model": options.instance_model and str(options.instance_model),
            "prompts": options.prompts and vector_identity(str(options.prompts)),
            **_postprocess_key(options, sieve),
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def _postprocess_key(options: PredictOptions, sieve: bool) -> dict:
    """What post-processing adds to a job key: nothing for the card's without a sieve (keys of jobs made before
    2026-12-04 stay the same); a sieve joined after the model never resumes a store sieved in windows, nor one
    sieved by the rule before 2026-12-05 (small neighbours voted too: "joined")."""  # (nor, needlessly, one of 3d69ec1)
    out: dict = {} if options.postprocess is None else {"postprocess": options.postprocess.model_dump()}
    return {**out, "sieve": "joined, large neighbours"} if sieve else out


def _ours(name: str) -> bool:
    """Names geoseg writes in OUT, including temporaries a killed run can leave behind."""
    if name in OUTPUTS or name.endswith(PARTIAL) and name[: -len(PARTIAL)] in OUTPUTS:
        return True
    return name.startswith(".geoseg") or any(name.startswith("." + Path(n).stem + ".") for n in OUTPUTS)


def check_out_dir(out_dir: Path | str, overwrite: bool, resume: bool) -> None:
    """Refuse an OUT that holds a finished result (unless --overwrite or --resume) or anything not ours."""
    if storage.is_url(out_dir):
        if storage.scheme(out_dir) in ("http", "https"):
            raise ConfigError(f"{out_dir}: outputs cannot be written over HTTP; give a local directory or an object-store URL (s3://...)")
        try:
            bucket = storage.missing_bucket(str(out_dir))
            is_object = storage.isfile(out_dir)
            names = [] if is_object else storage.list_names(out_dir)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{out_dir}: cannot list the output prefix ({exc}); check the URL and the credentials (AWS_* variables)") from None
        if bucket:
            raise ConfigError(f"{out_dir}: the bucket {bucket!r} does not exist (or these credentials cannot see it); create it "
                              "first or choose another output URL")
        if is_object:
            raise OutputExistsError(f"{out_dir}: is an object, not a prefix; choose another output URL")
    else:
        out = Path(out_dir)
        storage.check_creatable(out, "output directory")
        if not out.exists():
            return
        if not out.is_dir():
            raise OutputExistsError(f"{out_dir}: exists and is not a directory; choose another output directory")
        names = [p.name for p in out.iterdir()]
    foreign = sorted(n for n in names if not _ours(n))
    if foreign:
        raise OutputExistsError(
            f"{out_dir}: holds files geoseg did not write ({', '.join(foreign[:3])}); choose an empty or new output directory"
        )
    if RUN_NAME in names and not (overwrite or resume):
        raise OutputExistsError(f"{out_dir}: holds a finished prediction; pass --overwrite to replace it")


def plan_job(inputs: Sequence[str | os.PathLike], model_dir: str | os.PathLike, out_dir: str | os.PathLike, options: PredictOptions) -> Job:
    """Check inputs, model and output directory and plan the tiling. Starts nothing."""
    # local inputs and OUT absolute: workers (--scheduler) may run in another directory, and read and wrote relative
    # paths there; a URL, or a GDAL name that is no path here (a subdataset, /vsizip/...), as given
    inputs = tuple(storage.absolute(p) if os.path.exists(p) else p for p in map(str, inputs))
    stack = open_stack(inputs)
    model_dir = str(model_dir).rstrip("/") if storage.is_url(model_dir) else model_dir
    model = open_model(model_dir)  # a URL's model is fetched once into the local cache
    card = model.card
    stack = match_bands(stack, card, str(model_dir))
    out: Path | str = str(out_dir).rstrip("/") if storage.is_url(out_dir) else Path(storage.absolute(out_dir))
    check_out_dir(out, options.overwrite, options.resume)
    if options.precision not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"--precision must be auto, fp32 or bf16, not {options.precision!r}")
    # the post-processing the job runs: its options' (checked against the model's classes), else the card's
    pp = card.postprocess
    if options.postprocess is not None:
        pp = card.with_postprocess(options.postprocess, f"{model_dir}: --mmu (or a job's inference.mmu)").postprocess
        if card.finds_objects and pp.active:
            raise ConfigError(f"{model_dir}: --majority and --mmu post-process a class map, and this model finds objects")
    if options.tta == "d4" and card.method != "smp":
        raise ConfigError(f"{model_dir}: --tta d4 augments a network's passes, and this is a {card.method} model; drop --tta")
    if card.finds_objects:
        # options an object model's run has no use for: refused, not dropped without a word (run.json said fp32)
        ignored = [flag for flag, given in (("--exact", options.exact), ("--tile-size", options.tile_size is not None),
                                            (f"--precision {options.precision}", options.precision not in ("auto", "fp32")),
                                            ("--halo with --max-object-size",
                                             options.halo is not None and options.max_object_size is not None)) if given]
        if ignored:
            raise ConfigError(f"{model_dir}: {', '.join(ignored)} do not apply to a {card.method} model, which finds objects "
                              "in fp32, one pass per chunk whose halo is the largest object (--max-object-size): drop them")
        plan = instance_plan(card, stack, options)
    else:
        # with an instance model, its windows are the chunks': never the 4096 px a stage-wise U-Net may get
        own = (DEFAULT_CHUNK,) if options.instance_model is not None else None
        # the sieve runs over the whole map after the model (geoseg.pipeline.sieve): the halo does not carry it
        windowed = card.model_copy(update={"postprocess": pp.without_sieve() if sieve_joined(pp) else pp})
        plan = plan_for(windowed, stack.shape, chunk_size=options.chunk_size, halo=options.halo, exact=options.exact,
                        tile_size=options.tile_size, own_chunks=own)
    objects = None
    if options.instance_model is not None:
        if card.finds_objects:
            raise ConfigError(f"{model_dir}: --instance-model goes with a semantic --model (a class map the objects are laid over)")
        inst = open_model(options.instance_model)
        if not inst.card.finds_objects:
            raise ConfigError(f"{options.instance_model}: not an instance model (geoseg train --task instance makes one)")
        if plan.chunk_size % inst.card.stride:
            raise ConfigError(f"--chunk-size {plan.chunk_size}: with an instance model it must be a multiple of {inst.card.stride}")
        istack = match_bands(open_stack(inputs), inst.card, str(options.instance_model))
        iplan = instance_plan(inst.card, istack, replace(options, chunk_size=plan.chunk_size, halo=None))
        objects = Job(inputs, str(options.instance_model), out, istack, inst.card, inst.digest, iplan, options,
                      job_key(inputs, inst.digest, iplan, options))
    given = [n for n, v in (("--max-object-size", options.max_object_size), ("--score-threshold", options.score_threshold),
                            ("--nms-iou", options.nms_iou)) if v is not None]
    if given and not card.finds_objects and objects is None:
        raise ConfigError(f"{', '.join(given)} (objects: in a job file) {'is' if len(given) == 1 else 'are'} for models that find "
                          f"objects (geoseg train --task instance, SAM) or --instance-model; {model_dir} is a {card.method} model")
    if options.prompts is not None and "sam" not in (card.method, objects and objects.card.method):
        raise ConfigError(f"--prompts needs a SAM model (geoseg model init --method sam); {model_dir} is a {card.method} model")
    if options.prompts is not None:
        from geoseg.instances.sam import read_prompts

        read_prompts(str(options.prompts), stack.grid)  # a bad file stops here, before any cluster starts
    if card.finds_objects and storage.is_url(out):
        raise ConfigError(f"{out_dir}: objects are written to a local directory for now; give a path "
                          "(or lay them over a semantic model's map with --instance-model)")
    # panoptic: the object model and its plan (halo = largest object) are part of what the output depends on
    key = job_key(inputs, model.digest + (objects.digest + json.dumps(objects.plan.describe()) if objects else ""), plan, options,
                  sieve=not card.finds_objects and sieve_joined(pp))
    return Job(inputs, str(model_dir), out, stack, card, model.digest, plan, options, key, objects)


def chunk_key(key: str, precision: str, device: str) -> str:
    """The key a chunk's marker holds: the job's key and the numerics its workers computed in."""
    return hashlib.sha256(f"{key}:{precision}:{device}".encode()).hexdigest()


INSTANCE_CHUNK = 1024


def object_size_px(text: str, resolution: float | None) -> int:
    """``64``, ``64px`` or ``30m`` as pixels (metres need a metric grid)."""
    t = str(text).strip().lower()
    if t.endswith("m") and not t.endswith("px") and not resolution:  # said as it is, not as a malformed size
        raise ConfigError(f"--max-object-size {text}: metres need a grid in metres (this image's is not); give pixels (e.g. 64px)")
    try:
        if t.endswith("px"):
            return math.ceil(float(t[:-2]))
        if t.endswith("m"):
            return math.ceil(float(t[:-1]) / resolution)
        return math.ceil(float(t))
    except (ValueError, OverflowError):
        raise ConfigError(f"--max-object-size {text!r}: give pixels (64 or 64px) or metres (30m)") from None


def instance_plan(card: ModelCard, stack: RasterStack, options: PredictOptions) -> TilingPlan:
    """Chunks of 1024 px whose halo is the largest object expected (the card's, or --max-object-size):
    every object whose centre lies in a core is then seen whole by that chunk's window."""
    from geoseg.training.loop import band_infos

    if options.max_object_size is not None:
        res = band_infos(stack)[0].resolution_m
        halo = object_size_px(options.max_object_size, res)
    else:
        halo = int(options.halo if options.halo is not None else card.default_halo)
    if halo < 1:
        raise ConfigError(f"the largest object must be at least one pixel (--max-object-size), got {halo} px")
    return TilingPlan.make(stack.shape, stride=card.stride, chunk_size=options.chunk_size or INSTANCE_CHUNK, halo=halo)
