"""Model directories: ``model.json`` (the card) + ``weights.safetensors``. No pickle anywhere."""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from safetensors import SafetensorError

from geoseg.errors import ConfigError, ModelError, OutputExistsError
from geoseg.model.card import (
    CARD_NAME,
    DEFAULT_COLORS,
    WEIGHTS_NAME,
    BandInfo,
    ClassInfo,
    ModelCard,
    Normalization,
)
from geoseg.model.network import build_network, network_stride
from geoseg.model.receptive_field import measure_receptive_field

if TYPE_CHECKING:  # torch is imported where a network is built or loaded, not by clients that plan
    import torch

DEFAULT_HALO = 32  # trained U-Net-resnet18: 0.007% of pixels differ from --exact; see README


@dataclass(frozen=True)
class ModelBundle:
    """A loaded model: its card, the network in eval mode and the directory's digest."""

    card: ModelCard
    net: torch.nn.Module
    digest: str
    path: Path
    companion: Any = None  # an smp card's per-pixel ensemble member (LightGBM booster; TorchForest on a GPU), if any

    @property
    def device(self) -> str:
        """Where the model computes: the network's device, the CPU for the other methods."""
        params = getattr(self.net, "parameters", None)  # a torch network (other methods have none)
        if callable(params):
            return str(next(params()).device)
        return "cpu"


_SHA256: dict[tuple[str, int, int, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """sha256 of a file, hashed once per file version (path, inode, size, mtime, ctime) in this process (the
    ctime changes with every write, even one that puts the mtime back, as ``cp -p`` does)."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    known = _SHA256.get(key)
    if known is not None:
        return known
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    _SHA256[key] = h.hexdigest()
    return _SHA256[key]


def model_digest(model_dir: Path) -> str:
    """Hash of card and weights together: what makes two model directories the same model."""
    model_dir = Path(model_dir)
    h = hashlib.sha256()
    text = (model_dir / CARD_NAME).read_bytes()
    h.update(text)
    for name in ModelCard.model_validate_json(text).files[1:]:
        h.update(file_sha256(model_dir / name).encode())
    return h.hexdigest()


def read_card(model_dir: str | os.PathLike) -> ModelCard:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelError(
            f"{model_dir}: model directory not found; make one with 'geoseg model init' or 'geoseg train'"
        )
    return ModelCard.read(model_dir / CARD_NAME)


def check_model_dir(model_dir: str | os.PathLike) -> ModelCard:
    """Validate card and weights file without building the network (cheap, for the client)."""
    card = read_card(model_dir)
    for name in card.files[1:]:
        if not (Path(model_dir) / name).is_file():
            raise ModelError(f"{Path(model_dir) / name}: file missing; the model directory is incomplete, re-export it")
        if name.endswith(".lgb.txt"):
            check_lightgbm_text(Path(model_dir) / name)
    if card.weights_name != WEIGHTS_NAME:
        return card
    weights = Path(model_dir) / WEIGHTS_NAME
    if not weights.is_file():
        raise ModelError(f"{weights}: weights file missing; the model directory is incomplete, re-export it")
    try:
        from safetensors import safe_open

        with safe_open(str(weights), framework="numpy") as f:  # the header only: no torch here
            f.keys()
    except (SafetensorError, OSError, Exception) as exc:  # safetensors raises several types
        raise ModelError(f"{weights}: weights file is corrupt or truncated ({exc}); re-export the model") from None
    return card


def check_lightgbm_text(path: Path) -> None:
    """A LightGBM text model that is whole: LightGBM reads a truncated one until it crashes the process (a worker
    lost is then taken for memory), so its two closing sections are checked first."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelError(f"{path}: cannot be read ({exc}); re-export the model") from None
    lines = data.rstrip().splitlines()
    if b"end of trees" not in data or not lines or not lines[-1].startswith(b"pandas_categorical:"):
        raise ModelError(f"{path}: LightGBM model is truncated or corrupt (its closing sections are missing); "
                         "re-export the model")


def lightgbm_booster(path: Path) -> Any:
    """The LightGBM model of a text file, checked whole first; its own errors as a ModelError."""
    import lightgbm as lgb

    check_lightgbm_text(path)
    try:
        return lgb.Booster(model_file=str(path))
    except lgb.basic.LightGBMError as exc:
        raise ModelError(f"{path}: not a LightGBM model LightGBM can read ({str(exc).splitlines()[0][:200]}); "
                         "re-export the model") from None


def fetch_model_dir(url: str, digest: str | None = None) -> Path:
    """The model directory at ``url`` in the local cache, ``<cache>/models/<digest>``.

    A model is fetched once per cache directory (per machine); the files are hashed before
    they are put in place (a directory rename, so a cached model is always complete), and when
    ``digest`` is given a model with any other digest is refused rather than used.
    """
    from geoseg.io import storage

    root = storage.cache_dir("models")
    if digest and (root / digest).is_dir():
        return root / digest
    url = url.rstrip("/")
    tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=root))
    try:
        names = [CARD_NAME]
        while names:
            name = names.pop(0)
            try:
                storage.download(f"{url}/{name}", tmp / name)
            except FileNotFoundError:
                raise ModelError(f"{url}/{name}: not found; check the model URL (a directory holding {CARD_NAME} and {WEIGHTS_NAME})") from None
            except OSError as exc:
                raise ModelError(f"{url}/{name}: cannot fetch it ({exc}); check the URL and the credentials (AWS_* variables)") from None
            if name == CARD_NAME:
                try:
                    names += list(ModelCard.read(tmp / CARD_NAME).files[1:])
                except ModelError as exc:
                    raise ModelError(str(exc).replace(str(tmp), url)) from None
        try:
            check_model_dir(tmp)
        except ModelError as exc:
            raise ModelError(str(exc).replace(str(tmp), url)) from None
        got = model_digest(tmp)
        if digest and got != digest:
            raise ModelError(
                f"{url}: model changed while the job ran (digest {got[:12]} != {digest[:12]}); rerun the job"
            )
        final = root / got
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # another process putting the same model in place wins the race
                raise
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def local_model_dir(model_dir: str | os.PathLike, digest: str | None = None) -> Path:
    """A model directory on this machine: a local path as given, a URL fetched into the cache."""
    from geoseg.io.storage import is_url

    return fetch_model_dir(str(model_dir), digest) if is_url(model_dir) else Path(model_dir)


@dataclass(frozen=True)
class OpenedModel:
    """A model directory checked and located: what predict, evaluate and the Python API start from."""

    location: str  # an absolute local path or the URL, as workers find it
    local_dir: Path  # this machine's copy (the directory itself, or the cache's copy of a URL)
    card: ModelCard
    digest: str


def open_model(model: str | os.PathLike) -> OpenedModel:
    """The one way to open a model directory, local or at a URL (fetched once into the cache).

    Card and weights are checked without building the network; the digest hashes the weights
    once per file version.
    """
    from geoseg.io.storage import is_url

    location = str(model).rstrip("/") if is_url(model) else str(Path(model).resolve())
    local = local_model_dir(location if is_url(model) else model)
    card = check_model_dir(local)
    return OpenedModel(location, Path(local), card, model_digest(local))


def load_model(model_dir: str | os.PathLike, device: str | torch.device = "cpu", optimize: bool = True) -> ModelBundle:
    """The model of a directory, ready for inference. ``optimize``: a network's batch norms folded into
    its convolutions and U-Net skips convolved without concatenating (geoseg.model.fold; the same
    function up to float rounding, faster on large tiles)."""
    model_dir = local_model_dir(model_dir)
    card = check_model_dir(model_dir)
    if card.method == "instance":
        from geoseg.instances.net import build_maskrcnn

        return ModelBundle(card=card, net=_load_weights(build_maskrcnn(card.encoder, card.n_inputs, card.n_classes, card.method_params),
                                                        model_dir).eval().to(device), digest=model_digest(model_dir), path=model_dir)
    if card.method == "sam":
        from geoseg.instances.sam import build_sam

        return ModelBundle(card=card, net=_load_weights(build_sam(card.encoder), model_dir).eval().to(device),
                           digest=model_digest(model_dir), path=model_dir)
    if card.method != "smp":
        from geoseg.methods import load_predictor

        try:
            predictor = load_predictor(model_dir, card, device)
        except (KeyError, ValueError, OSError) as exc:  # a file that does not hold what the card's method reads
            raise ModelError(f"{model_dir}: its {card.method} model cannot be read ({type(exc).__name__}: {exc}); "
                             "the card and its files come from different models: re-export it") from None
        return ModelBundle(card=card, net=predictor, digest=model_digest(model_dir), path=model_dir)
    net = _load_weights(build_card_network(card), model_dir)
    net = net.eval().to(device)
    if optimize:
        from geoseg.model.fold import optimize_for_inference
        from geoseg.model.members import members_of

        for member in members_of(net):
            optimize_for_inference(member)
    companion = None
    ens = card.method_params.get("ensemble")
    if ens:
        from geoseg.methods.forest import for_device

        companion = for_device(lightgbm_booster(model_dir / ens["file"]), device)  # on a GPU: beside the network
    return ModelBundle(card=card, net=net, digest=model_digest(model_dir), path=model_dir, companion=companion)


def build_card_network(card: ModelCard) -> torch.nn.Module:
    """The (untrained) network an smp card describes: one network, or the mean of ``card.members`` of them."""
    def one() -> torch.nn.Module:
        return build_network(card.arch, card.encoder, card.n_inputs, card.n_classes, card.encoder_depth, card.arch_params)

    if card.members == 1:
        return one()
    from geoseg.model.members import MemberMean

    return MemberMean(one() for _ in range(card.members))


def _load_weights(net: torch.nn.Module, model_dir: Path) -> torch.nn.Module:
    """``net`` with the directory's safetensors weights, or a clear error."""
    weights = model_dir / WEIGHTS_NAME
    from safetensors.torch import load_file

    import torch

    try:
        state = load_file(str(weights), device="cpu")
    except Exception as exc:
        raise ModelError(f"{weights}: weights file is corrupt or truncated ({exc}); re-export the model") from None
    for name, t in state.items():
        if not t.is_floating_point() and not name.endswith("num_batches_tracked"):
            raise ModelError(f"{weights}: tensor {name} holds {str(t.dtype).removeprefix('torch.')}, not floats; "
                             "the weights were converted: re-export the model")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ModelError(f"{weights}: tensor {name} holds NaN or infinite values (a training that diverged?); "
                             "it would label every pixel alike: retrain or re-export the model")
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        detail = "; ".join(lines[1:3]) if len(lines) > 1 else lines[0] if lines else str(exc)
        raise ModelError(
            f"{weights}: weights do not fit the network in {model_dir / CARD_NAME} "
            f"({detail[:300]}); the card and weights come from different models"
        ) from None
    return net


def check_model_out(model_dir: str | os.PathLike, inputs: Sequence[Any] = ()) -> None:
    """A model directory is local and of its own: it is replaced as a whole, so it may not be the current directory,
    above it, or hold one of ``inputs``."""
    from geoseg.io import storage

    if storage.is_url(model_dir):  # Path() made s3://b/k a local folder s3:/b/k, said to be written to the bucket
        raise ConfigError(f"{model_dir}: a model directory is written locally; write it to a local folder and upload it "
                          "(geoseg predict --model takes the URL)")
    out = Path(os.path.realpath(model_dir))
    holds = [p for p in inputs if not storage.is_url(p) and Path(os.path.realpath(p)).is_relative_to(out)]
    if Path(os.path.realpath(os.getcwd())).is_relative_to(out) or holds:
        what = f"holds {holds[0]}" if holds else "is the current directory or above it"
        raise ConfigError(f"{model_dir} {what}; a model directory is replaced as a whole: give a new directory")


def check_new_model_dir(model_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """``model_dir`` as an absolute path, if a model directory may be written there (``check_model_out``; not a
    directory with files in it unless ``overwrite``): checked before the work that makes the model, too."""
    check_model_out(model_dir)
    model_dir = Path(os.path.abspath(model_dir))  # "." names no sibling: it was emptied, then could not be replaced
    if model_dir.exists() and any(model_dir.iterdir()) and not overwrite:
        raise OutputExistsError(f"{model_dir}: already exists and is not empty; choose another directory or pass --overwrite")
    return model_dir


def write_model_dir(model_dir: str | os.PathLike, card: ModelCard, files: dict[str, Any], overwrite: bool = False) -> Path:
    """Write a model directory atomically: ``files`` (name -> ``write(path)``) and the card go to a
    temporary sibling that is renamed into place when complete."""
    model_dir = check_new_model_dir(model_dir, overwrite)
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{model_dir.name}.", dir=model_dir.parent))
    try:
        for name, write in files.items():
            write(tmp / name)
        (tmp / CARD_NAME).write_text(card.to_json())
        if model_dir.exists():
            shutil.rmtree(model_dir)
        os.replace(tmp, model_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return model_dir


def save_model(net: torch.nn.Module, card: ModelCard, model_dir: str | os.PathLike, overwrite: bool = False,
               extra: dict[str, Any] | None = None) -> Path:
    """A network's model directory: weights as safetensors, the card, and ``extra`` files it lists (an ensemble member)."""
    def weights(path: Path) -> None:
        from safetensors.torch import save_file

        state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
        save_file(state, str(path), metadata={"format": "pt", "geoseg_card_schema": "1"})

    return write_model_dir(model_dir, card, {WEIGHTS_NAME: weights, **(extra or {})}, overwrite)


def make_card(
    net: torch.nn.Module,
    *,
    arch: str,
    encoder: str,
    encoder_depth: int,
    bands: list[BandInfo],
    classes: list[ClassInfo],
    normalization: Normalization,
    arch_params: dict[str, Any] | None = None,
    tile_size: int = 1024,
    default_halo: int | None = None,
    provenance: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    index_channels: tuple[str, ...] = (),
) -> ModelCard:
    """A card for ``net`` (one network or a MemberMean) with its receptive field measured from the impulse response."""
    from geoseg.model.members import members_of

    members = members_of(net)
    stride = network_stride(members[0], encoder_depth)
    from geoseg.model.receptive_field import MAX_STRIP

    rf = measure_receptive_field(net, len(bands) + len(index_channels), stride)
    global_reach = rf is None
    if global_reach:
        rf = MAX_STRIP // 2
    halo = DEFAULT_HALO if default_halo is None else default_halo
    halo = -(-halo // stride) * stride
    from geoseg import __version__

    prov = {"created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "geoseg": __version__}
    prov.update(provenance or {})
    return ModelCard(
        arch=arch,
        encoder=encoder,
        encoder_depth=encoder_depth,
        arch_params=dict(arch_params or {}),
        bands=tuple(bands),
        normalization=normalization,
        classes=tuple(classes),
        stride=stride,
        tile_size=-(-tile_size // stride) * stride,
        receptive_field=rf,
        global_reach=global_reach,
        default_halo=min(halo, -(-rf // stride) * stride),
        provenance=prov,
        training=training,
        index_channels=tuple(index_channels),
        index_units="physical",
        members=len(members),
    )


def default_classes(n: int) -> list[ClassInfo]:
    return [ClassInfo(id=i, name=f"class_{i}", color=DEFAULT_COLORS[i % len(DEFAULT_COLORS)]) for i in range(n)]


def init_model(
    model_dir: str | os.PathLike,
    *,
    arch: str = "unet",
    encoder: str = "resnet18",
    n_bands: int = 4,
    n_classes: int = 5,
    seed: int = 0,
    encoder_depth: int = 5,
    classes: list[ClassInfo] | None = None,
    bands: list[BandInfo] | None = None,
    normalization: Normalization | None = None,
    tile_size: int = 1024,
    overwrite: bool = False,
    input_skip: bool = False,
) -> ModelCard:
    """Make a model directory with seeded random weights, so the pipeline runs before training.

    ``input_skip``: a U-Net's last decoder block reads the input too, as ``geoseg train``'s do by default. Off here:
    with the card's identity normalisation a random network would carry raw band values (thousands) straight into
    its logits."""
    import torch

    from geoseg.model.network import INPUT_SKIP

    check_new_model_dir(model_dir, overwrite)  # before the network is built and its receptive field measured (~15 s)
    torch.manual_seed(seed)
    classes = classes or default_classes(n_classes)
    params = {INPUT_SKIP: True} if input_skip else {}
    net = build_network(arch, encoder, n_bands, len(classes), encoder_depth, params)
    card = make_card(
        net,
        arch=arch,
        encoder=encoder,
        encoder_depth=encoder_depth,
        arch_params=params,
        bands=bands or [BandInfo(name=f"band_{i + 1}") for i in range(n_bands)],
        classes=classes,
        normalization=normalization or Normalization(mean=(0.0,) * n_bands, std=(1.0,) * n_bands),
        tile_size=tile_size,
        provenance={"source": "geoseg model init", "seed": seed, "weights": "random"},
    )
    save_model(net, card, model_dir, overwrite=overwrite)
    return card
