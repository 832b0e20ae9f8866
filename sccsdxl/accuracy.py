"""Accuracy: CLIP score and FID of an accuracy-mode run, computed the way the MLPerf accuracy script does.

The log holds every response as hex (6.3 MB per 1024x1024 image, 31.5 GB for 5000), so it is streamed
with ijson one entry at a time; the first entry of each ``qsl_idx`` wins, as in the MLPerf accuracy script.
Nothing but one image, its CLIP score and its 2048 Inception features is kept per sample.

What matches ``inference:text_to_image/tools/accuracy_coco.py`` (``mlperf-sdxl.md`` §4), step by step:
  CLIP  open_clip ViT-B-32 with the OpenAI weights (QuickGELU, fp32, as open_clip 2.26.1 builds 'openai'),
        open_clip's eval preprocess on the PIL image, both feature vectors L2-normalised,
        score = 100 x cosine similarity, CLIP_SCORE = mean over unique samples;
  FID   pytorch-fid's InceptionV3 (use_fid_inception=True, pool3, 2048 features; it resizes to 299x299
        bilinearly with align_corners=False and scales to (-1, 1) inside), input via ToTensor, one image per
        call by default; mu = mean, sigma = np.cov(rowvar=False) in float64; pytorch-fid's Fréchet distance
        against val2014.npz, reference statistics first (scipy sqrtm, eps retry, complex part dropped).
One deliberate difference: captions come from the run's own ``samples.tsv`` by ``qsl_idx``, never by row
position in the 5000-row file, so subset runs (50/500 samples) compare each image with its own caption.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import math
import threading
import time
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .constants import CLIP_BOUNDS, DATASET_ROWS, FID_BOUNDS, RESPONSE_SHAPE
from .errors import DataError, DeviceError, KitError, ModelError, OutputError, ParameterError
from .record import write_json

ACCURACY_LOG = "mlperf_log_accuracy.json"
ACCURACY_DIR = "accuracy"  # loadgen's accuracy-mode log directory inside a run directory

CLIP_ARCH = "ViT-B-32"  # the script's 'ViT-B/32'; open_clip maps '/' to '-'
FID_DIMS = 2048  # pool3 features of the FID Inception
ASSET_NAMES = {"clip": "clip_vit_b32_openai", "inception": "inception_fid", "fid_stats": "fid_stats_val2014"}
METRIC_MODELS = ("official", "standin")
METRICS_DEVICES = ("auto", "cuda", "cpu")

STANDIN_TAG = "STANDIN-NOT-REAL"
STANDIN_WARNING = ("STAND-IN METRIC MODELS (random weights): these CLIP and FID numbers are NOT real scores and say "
                   "nothing about the images; they only prove that the pipeline runs. Use metric_models='official'.")
# A small CLIP of the same class (open_clip CLIP, QuickGELU, 224 px input, the real tokenizer) for CI.
STANDIN_CLIP_ARCH: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "patch_size": 32, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
# The stand-in reads pytorch-fid's first block (64 features, its dims=64 option): same class and weights file, and a
# 64x64 sqrtm instead of 2048x2048 (10-60 s on a small CPU), so CI stays fast.
STANDIN_FID_DIMS = 64
STANDIN_FILES = {"clip": "clip-standin.pt", "inception": "inception-standin.pth", "fid_stats": "fid-stats-standin.npz"}

FETCH_HINT = ("fetch the metric files once on a machine with internet: sccsdxl.assets.require('{name}', data_dir) "
              "prints the command; or rehearse with -p metric_models standin (fake scores)")


# --------------------------------------------------------------------------------------------------
# The hex log, streamed
# --------------------------------------------------------------------------------------------------

def decode_image(hex_data: str, shape: tuple[int, int, int] | None = None) -> np.ndarray:
    """uint8 HWC image from loadgen's hex string; square RGB assumed when no shape is given."""
    raw = np.frombuffer(bytes.fromhex(hex_data), dtype=np.uint8)
    if shape is None:
        side = int(round((raw.size / 3) ** 0.5))
        shape = (side, side, 3)
    if raw.size != shape[0] * shape[1] * shape[2] or raw.size == 0:
        raise DataError(f"an accuracy-log entry holds {raw.size} bytes, not an image of shape {shape}",
                        "the log is from another model or image size; re-run the accuracy run")
    return raw.reshape(shape)


class _HashingReader:
    """A read-only file wrapper that feeds every byte read into a hash, so the log is read once, not twice."""

    def __init__(self, fh, digest):
        self.fh, self.digest = fh, digest

    def read(self, size: int = -1) -> bytes:
        data = self.fh.read(size)
        self.digest.update(data)
        return data

    def drain(self) -> None:
        """Hash whatever the parser did not need to read (trailing whitespace)."""
        while self.read(1 << 20):
            pass


def iter_accuracy_log(path: str | Path, shape: tuple[int, int, int] | None = None,
                      digest=None) -> Iterator[tuple[int, np.ndarray]]:
    """(qsl_idx, image) per unique sample, in log order, streamed; repeated qsl_idx entries are skipped.

    With ``digest`` (a hashlib object) the whole file's bytes are hashed on the way, for accuracy.txt.
    Every image must have the shape of the first one.
    """
    import ijson

    path = Path(path)
    if not path.is_file():
        raise DataError(f"accuracy log {path} not found", "run the accuracy-mode run first (02_baseline or 05_accuracy)")
    seen: set[int] = set()
    try:
        with open(path, "rb") as raw:
            fh = _HashingReader(raw, digest) if digest is not None else raw
            for entry in ijson.items(fh, "item"):
                idx = int(entry["qsl_idx"])
                if idx < 0:
                    raise ValueError(f"negative qsl_idx {idx}")
                if idx in seen:
                    continue
                seen.add(idx)
                image = decode_image(entry["data"], shape)
                shape = image.shape
                yield idx, image
            if digest is not None:
                fh.drain()
    except (ijson.JSONError, KeyError, ValueError, TypeError) as exc:
        raise DataError(f"accuracy log {path} is truncated or malformed ({type(exc).__name__}: {exc})",
                        "re-run the accuracy run into a new run directory; a killed run leaves a partial log") from None


# --------------------------------------------------------------------------------------------------
# Metric files and models
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MetricFiles:
    """Local files of the three metric inputs; ``clip_arch`` is only set for the small stand-in CLIP."""

    clip: Path
    inception: Path
    fid_stats: Path
    standin: bool = False
    clip_arch: dict | None = None
    fid_dims: int = FID_DIMS

    def as_dict(self) -> dict[str, Any]:
        return {"clip": str(self.clip), "inception": str(self.inception), "fid_stats": str(self.fid_stats),
                "standin": self.standin, "fid_dims": self.fid_dims}


def official_metric_files(data_dir: str | Path | None) -> MetricFiles:
    """The real weights and val2014 statistics, from the kit's asset store (DataError with the fetch command if missing)."""
    try:
        from .assets import require
    except ImportError:
        raise ModelError("the kit's asset module (sccsdxl.assets.require) is not installed",
                         "update the kit (git pull; pip install -e .), or pass explicit paths to load_metric_models") from None
    where = data_dir or None  # empty: the kit's default data directory
    return MetricFiles(clip=Path(require(ASSET_NAMES["clip"], where)),
                       inception=Path(require(ASSET_NAMES["inception"], where)),
                       fid_stats=Path(require(ASSET_NAMES["fid_stats"], where)))


def make_standin_metric_files(directory: str | Path, seed: int = 0) -> MetricFiles:
    """Random-weight models of the same classes and fake statistics, saved as files, so CI runs the real loading code."""
    import open_clip
    import torch
    from pytorch_fid import inception as fid_inception

    directory = Path(directory).expanduser()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {directory}: {exc.strerror}", "pass a writable output_dir") from None
    files = MetricFiles(*(directory / STANDIN_FILES[k] for k in ("clip", "inception", "fid_stats")),
                        standin=True, clip_arch=STANDIN_CLIP_ARCH, fid_dims=STANDIN_FID_DIMS)
    if all(p.is_file() for p in (files.clip, files.inception, files.fid_stats)):
        return files
    torch.manual_seed(seed)
    with _quiet_logging():  # open_clip logs a warning for a model without pretrained weights: that is the point here
        clip = open_clip.create_model(CLIP_ARCH, pretrained=None, force_quick_gelu=True, **STANDIN_CLIP_ARCH)
    torch.save(clip.state_dict(), files.clip)
    # pytorch-fid's FID blocks only change forward(); their parameters are torchvision's, so this state dict loads
    # into InceptionV3(use_fid_inception=True) exactly as the real pt_inception weights do. He init keeps activations
    # at a sane scale through 90 random layers.
    net = fid_inception._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    for module in net.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    torch.save(net.state_dict(), files.inception)
    rng = np.random.default_rng(seed)
    dims = STANDIN_FID_DIMS
    basis = rng.normal(size=(dims, dims))
    sigma = basis @ basis.T * 1e-3 + np.diag(rng.uniform(1e-3, 2e-3, dims))
    np.savez(files.fid_stats, mu=rng.uniform(0.2, 0.5, dims), sigma=sigma)
    return files


@contextlib.contextmanager
def _quiet_logging():
    import logging

    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def metric_files_for(metric_models: str, data_dir: str | Path, output_dir: str | Path) -> MetricFiles:
    """The notebook's choice: the real files from data_dir, or stand-ins made under output_dir."""
    check_metric_parameters(metric_models, "cpu", 1)
    if metric_models == "standin":
        return make_standin_metric_files(Path(output_dir).expanduser() / "standin-metric-models")
    return official_metric_files(data_dir)


def resolve_metrics_device(name: str) -> str:
    """'auto' is the GPU when torch sees one, else the CPU (the metrics run on either)."""
    import torch

    if name not in METRICS_DEVICES:
        raise ParameterError(f"unknown metrics_device {name!r}", f"use one of {', '.join(METRICS_DEVICES)}")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"metrics_device 'cuda' was asked for but torch {torch.__version__} sees no GPU",
                          "use -p metrics_device cpu (slower, same scores up to float rounding) or run on a GPU node")
    return name


def check_metric_parameters(metric_models: str, metrics_device: str, metrics_batch_size: int) -> str:
    """Stop on a bad metric parameter before any model loads or image is generated; returns the metric device."""
    if metric_models not in METRIC_MODELS:
        raise ParameterError(f"unknown metric_models {metric_models!r}",
                             "use official (real CLIP/Inception weights and val2014 statistics) or standin (CI only)")
    _check_batch_size(metrics_batch_size)
    return resolve_metrics_device(metrics_device)


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ParameterError(f"metrics_batch_size must be an integer >= 1, got {batch_size!r}",
                             "use 1 (exactly as the MLPerf script) or a larger number for speed")


def _require_file(path: str | Path, what: str, asset: str, error: type[KitError]) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise error(f"{what} not found at {path}", FETCH_HINT.format(name=asset))
    return path


def _is_torchscript(path: Path) -> bool:
    """OpenAI's original ViT-B-32.pt is a TorchScript archive (torch.load refuses it with weights_only)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") for name in archive.namelist())


@dataclass
class ClipScorer:
    """open_clip model, its eval preprocess and tokenizer: per-sample 100 x cosine(image, caption)."""

    model: Any
    preprocess: Any
    tokenizer: Any
    device: str

    def features(self, images: Sequence, captions: Sequence[str]):
        """L2-normalised float32 image and text features, as the script computes them."""
        import torch

        with torch.no_grad():
            pixels = torch.stack([self.preprocess(image) for image in images]).to(self.device)
            image_features = self.model.encode_image(pixels).float()
            image_features /= image_features.norm(dim=-1, keepdim=True)
            tokens = self.tokenizer(list(captions)).to(self.device)
            text_features = self.model.encode_text(tokens).float()
            text_features /= text_features.norm(dim=-1, keepdim=True)
        return image_features, text_features

    def scores(self, images: Sequence, captions: Sequence[str]) -> list[float]:
        """Per-pair CLIP score; one pair per call is exactly the script's computation."""
        image_features, text_features = self.features(images, captions)
        similarity = (image_features @ text_features.T).diagonal()
        return [100 * value for value in similarity.cpu().tolist()]


def load_clip(path: str | Path, device: str = "cpu", arch: dict | None = None) -> ClipScorer:
    """open_clip ViT-B-32 from a local weights file (open_clip state dict, safetensors or OpenAI's TorchScript .pt).

    The MLPerf script asks open_clip 2.26.1 for pretrained='openai', which builds the model with QuickGELU;
    open_clip 3 only does so when told, hence force_quick_gelu. ``arch`` overrides widths (stand-in only).
    """
    import open_clip

    path = _require_file(path, "CLIP ViT-B-32 (openai) weights", ASSET_NAMES["clip"], ModelError)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            CLIP_ARCH, pretrained=str(path), precision="fp32", device=device, force_quick_gelu=True,
            weights_only=not _is_torchscript(path), **(arch or {}))
    except Exception as exc:  # noqa: BLE001 - any load failure means the file is not the expected weights
        raise ModelError(f"{path} is not a usable open_clip ViT-B-32 checkpoint ({type(exc).__name__}: {exc})",
                         "fetch it again: " + FETCH_HINT.format(name=ASSET_NAMES["clip"])) from None
    _round_like_openai_loader(model)
    model.eval()
    return ClipScorer(model, preprocess, open_clip.tokenize, device)


_FP16_ATTRIBUTES = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias", "bias_k",
                    "bias_v", "text_projection", "proj")


def _round_like_openai_loader(model) -> None:
    """Round the weights open_clip 2.26.1 passes through fp16 when it loads 'openai' (conv/linear/attention/projections).

    The MLPerf script gets its model that way; OpenAI's checkpoint already stores these layers in fp16, so for
    the real weights this changes nothing, and for any other file it keeps the scores the script's (checked against
    open_clip 2.26.1 on random weights: equal to about 1e-6 per sample, float32 rounding of the two versions).
    """
    import torch

    with torch.no_grad():
        for module in model.modules():
            tensors = []
            if isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Linear)):
                tensors += [module.weight, module.bias]
            tensors += [getattr(module, name, None) for name in _FP16_ATTRIBUTES]
            for tensor in tensors:
                if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
                    tensor.copy_(tensor.half().float())


_FID_BUILD_LOCK = threading.Lock()


def load_inception(path: str | Path, device: str = "cpu", dims: int = FID_DIMS):
    """pytorch-fid's InceptionV3 (pool3 for dims 2048, use_fid_inception=True), built by pytorch-fid itself, local weights.

    pytorch-fid's fid_inception_v3() fetches pt_inception-2015-12-05 by URL; here its URL loader is pointed at
    the local file for the duration of the build, so the module is exactly the one pytorch-fid makes.
    """
    import torch
    from pytorch_fid import inception as fid_inception

    path = _require_file(path, "FID Inception weights (pt_inception-2015-12-05)", ASSET_NAMES["inception"], ModelError)

    def local_weights(*args, **kwargs):
        return torch.load(path, map_location="cpu", weights_only=True)

    try:
        with _FID_BUILD_LOCK, _patched(fid_inception, "load_state_dict_from_url", local_weights):
            model = fid_inception.InceptionV3([fid_inception.InceptionV3.BLOCK_INDEX_BY_DIM[dims]],
                                              use_fid_inception=True)
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"{path} is not a usable FID Inception checkpoint ({type(exc).__name__}: {exc})",
                         "fetch it again: " + FETCH_HINT.format(name=ASSET_NAMES["inception"])) from None
    return model.to(device).eval()


@contextlib.contextmanager
def _patched(module, name: str, value):
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)


def load_fid_stats(path: str | Path, dims: int = FID_DIMS) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of the reference images (val2014.npz: mu 2048, sigma 2048x2048)."""
    path = _require_file(path, "FID reference statistics (val2014.npz)", ASSET_NAMES["fid_stats"], DataError)
    try:
        with np.load(path) as stats:
            mu, sigma = stats["mu"][:], stats["sigma"][:]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path} is not an FID statistics file with 'mu' and 'sigma' ({type(exc).__name__}: {exc})",
                        "fetch it again: " + FETCH_HINT.format(name=ASSET_NAMES["fid_stats"])) from None
    if mu.shape != (dims,) or sigma.shape != (dims, dims):
        raise DataError(f"{path} holds mu {mu.shape} and sigma {sigma.shape}, expected ({dims},) and "
                        f"({dims}, {dims})", "fetch val2014.npz again: "
                        + FETCH_HINT.format(name=ASSET_NAMES["fid_stats"]))
    return mu, sigma


@dataclass
class MetricModels:
    """Everything needed to score a log: CLIP, the FID Inception, the reference statistics."""

    clip: ClipScorer
    inception: Any
    mu_ref: np.ndarray
    sigma_ref: np.ndarray
    device: str
    files: MetricFiles

    @property
    def standin(self) -> bool:
        return self.files.standin


def load_metric_models(files: MetricFiles, device: str = "cpu") -> MetricModels:
    """Load all three (fails before any image is read if a file is missing or wrong)."""
    mu, sigma = load_fid_stats(files.fid_stats, files.fid_dims)
    clip = load_clip(files.clip, device, files.clip_arch)
    inception = load_inception(files.inception, device, files.fid_dims)
    return MetricModels(clip, inception, mu, sigma, device, files)


@contextlib.contextmanager
def reference_precision():
    """torch's default float32 settings (no TF32 matmul; cuDNN convolutions may use TF32), as in the script's process."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        saved = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
        torch.set_float32_matmul_precision("highest")
        torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.set_float32_matmul_precision(saved[0])
            torch.backends.cudnn.allow_tf32 = saved[1]


def inception_features(model, images: Sequence, device: str) -> np.ndarray:
    """pool3 features (n, 2048) of PIL images: ToTensor to [0, 1]; the model resizes and rescales itself."""
    import torch
    from torchvision import transforms

    to_tensor = transforms.ToTensor()
    with torch.no_grad():
        batch = torch.stack([to_tensor(image) for image in images]).to(device)
        pred = model(batch)[0]
    if pred.size(2) != 1 or pred.size(3) != 1:  # only for dims other than 2048, as in pytorch-fid
        pred = torch.nn.functional.adaptive_avg_pool2d(pred, output_size=(1, 1))
    return pred.squeeze(3).squeeze(2).cpu().numpy()


# --------------------------------------------------------------------------------------------------
# The arithmetic
# --------------------------------------------------------------------------------------------------

def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """mu and sigma of the generated features, exactly as pytorch-fid (float64, np.cov rowvar=False)."""
    features = np.asarray(features, dtype=np.float64)
    return np.mean(features, axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu_ref: np.ndarray, sigma_ref: np.ndarray, mu: np.ndarray, sigma: np.ndarray) -> float:
    """pytorch-fid's Fréchet distance, reference statistics first as in the script (sqrtm is not symmetric in rounding)."""
    from pytorch_fid.fid_score import calculate_frechet_distance

    from scipy.linalg import LinAlgWarning

    try:
        with contextlib.redirect_stdout(io.StringIO()) as said, warnings.catch_warnings():
            warnings.simplefilter("ignore", LinAlgWarning)  # a subset's covariance is singular by construction
            value = calculate_frechet_distance(mu_ref, sigma_ref, mu, sigma)
    except ValueError as exc:  # pytorch-fid: large imaginary component in sqrtm
        raise DataError(f"the FID computation failed: {exc}",
                        "too few or too similar images for a 2048x2048 covariance; score more samples") from None
    if said.getvalue().strip():
        warnings.warn(said.getvalue().strip(), RuntimeWarning, stacklevel=2)
    return float(value)


def format_accuracy_line(fid: float, clip: float, quoted: bool) -> str:
    """The script's stdout line: bare floats before b6f5a343 (the v4.x checker needs them), quoted strings after."""
    def shown(value: float) -> str:
        return repr(repr(float(value))) if quoted else repr(float(value))

    return f"Accuracy Results: {{'FID_SCORE': {shown(fid)}, 'CLIP_SCORE': {shown(clip)}}}"


def accuracy_txt(fid: float, clip: float, log_sha256: str, quoted: bool, standin: bool = False) -> str:
    """accuracy.txt as the checker reads it: the results line, then hash=<sha256 of the full log>."""
    head = f"# {STANDIN_WARNING}\n" if standin else ""
    return f"{head}{format_accuracy_line(fid, clip, quoted)}\nhash={log_sha256}\n"


# --------------------------------------------------------------------------------------------------
# Scoring a log
# --------------------------------------------------------------------------------------------------

@dataclass
class AccuracyResult:
    """CLIP and FID of one accuracy log, with the per-sample scores and a few thumbnails to show."""

    clip_score: float
    fid_score: float
    per_sample: pd.DataFrame  # qsl_idx, source_row, id, caption, clip (log order)
    n_images: int
    image_shape: tuple[int, int, int]
    log_path: str
    log_sha256: str
    standin: bool
    device: str
    batch_size: int
    seconds: float
    thumbnails: list[tuple[int, str, float, np.ndarray]] = field(default_factory=list)  # qsl_idx, caption, clip, image
    compliance_saved: list[int] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)

    @property
    def full_dataset(self) -> bool:
        return self.n_images == DATASET_ROWS

    @property
    def clip_pass(self) -> bool:
        return CLIP_BOUNDS[0] <= self.clip_score <= CLIP_BOUNDS[1]

    @property
    def fid_pass(self) -> bool:
        return FID_BOUNDS[0] <= self.fid_score <= FID_BOUNDS[1]

    @property
    def clip_standard_error(self) -> float:
        """Standard error of the CLIP mean: how far a subset's mean may sit from the 5000-sample one."""
        return float(self.per_sample["clip"].std(ddof=1) / math.sqrt(self.n_images))

    @property
    def passes(self) -> bool:
        return self.clip_pass and self.fid_pass and not self.standin

    def notes(self) -> list[str]:
        """What the reader must know before trusting the numbers."""
        notes = [STANDIN_WARNING] if self.standin else []
        if not self.full_dataset:
            notes.append(f"Subset of {self.n_images} images: FID against the {DATASET_ROWS}-image val2014 statistics is "
                         f"NOT comparable to the bound (it is large for any model at 50 or 500 images: about 235 "
                         f"and 84 for the reference). CLIP is comparable, within its sampling error of about "
                         f"±{self.clip_standard_error:.3f} (per-sample std / sqrt(n); the window is "
                         f"{CLIP_BOUNDS[1] - CLIP_BOUNDS[0]:.3f} wide).")
        if tuple(self.image_shape) != RESPONSE_SHAPE:
            notes.append(f"Images are {self.image_shape[1]}x{self.image_shape[0]}, not {RESPONSE_SHAPE[1]}x"
                         f"{RESPONSE_SHAPE[0]}: a test model, not SDXL; the scores say nothing about a submission.")
        return notes

    def table(self) -> pd.DataFrame:
        """CLIP and FID with their bounds and the verdict."""
        rows = []
        for name, value, bounds, ok, comparable in (
                ("CLIP_SCORE", self.clip_score, CLIP_BOUNDS, self.clip_pass, True),
                ("FID_SCORE", self.fid_score, FID_BOUNDS, self.fid_pass, self.full_dataset)):
            verdict = "pass" if ok else "FAIL"
            if not comparable:
                verdict += " (not comparable: subset)"
            if self.standin:
                verdict = "NOT REAL (stand-in models)"
            rows.append({"metric": name, "value": value, "lower bound": bounds[0], "upper bound": bounds[1],
                         "verdict": verdict})
        return pd.DataFrame(rows).set_index("metric")

    def summary(self) -> dict[str, Any]:
        """JSON-ready numbers for the record and scores.json."""
        clip = self.per_sample["clip"]
        return {
            "clip_score": self.clip_score, "fid_score": self.fid_score,
            "clip_bounds": list(CLIP_BOUNDS), "fid_bounds": list(FID_BOUNDS),
            "clip_pass": self.clip_pass, "fid_pass": self.fid_pass, "passes": self.passes,
            "fid_comparable": self.full_dataset, "clip_comparable": True,
            "standin": self.standin, "warning": STANDIN_WARNING if self.standin else None, "notes": self.notes(),
            "images": self.n_images, "image_shape": list(self.image_shape),
            "per_sample_clip": {"min": float(clip.min()), "median": float(clip.median()), "max": float(clip.max()),
                                "std": float(clip.std(ddof=1)), "standard_error": self.clip_standard_error},
            "log": self.log_path, "log_sha256": self.log_sha256, "device": self.device, "batch_size": self.batch_size,
            "seconds": round(self.seconds, 2), "compliance_images": self.compliance_saved, "files": self.files,
        }


def _batches(items: Iterator, size: int) -> Iterator[list]:
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _within(stream: Iterator[tuple[int, np.ndarray]], n: int, log_path) -> Iterator[tuple[int, np.ndarray]]:
    """Stop at the first qsl_idx the run's samples.tsv does not have (a log from another variant or run)."""
    for idx, image in stream:
        if idx >= n:
            raise DataError(f"{log_path} holds qsl_idx {idx}, but the run's samples.tsv lists only {n} samples "
                            f"(0..{n - 1})", "score the log with the samples.tsv of the run that wrote it "
                            "(pass that run's directory); a log from another variant cannot be scored here")
        yield idx, image


def _thumbnail(image: np.ndarray, side: int = 256) -> np.ndarray:
    from PIL import Image

    small = Image.fromarray(image)
    small.thumbnail((side, side))
    return np.asarray(small)


def evaluate_log(log_path: str | Path, samples, models: MetricModels, *, batch_size: int = 1,
                 compliance_ids: Sequence[int] = (), images_dir: str | Path | None = None, grid: int = 0,
                 show_progress: bool = True) -> AccuracyResult:
    """Stream the log once: per-sample CLIP against the run's own captions, Inception features, the log's sha256.

    ``samples`` is the run's SampleSet (samples.tsv): image ``qsl_idx`` is scored against ``samples.caption(qsl_idx)``.
    Compliance images (qsl_idx in ``compliance_ids``) are written as PNG into ``images_dir`` on the way.
    """
    from PIL import Image
    from tqdm.auto import tqdm

    _check_batch_size(batch_size)
    n = len(samples)
    wanted = {int(i) for i in compliance_ids if 0 <= int(i) < n}
    started = time.perf_counter()
    digest = hashlib.sha256()
    features = np.empty((n, models.files.fid_dims))  # float64, like pytorch-fid's pred_arr
    rows: list[dict[str, Any]] = []
    thumbnails: list[tuple[int, str, float, np.ndarray]] = []
    saved: list[int] = []
    shape: tuple[int, int, int] | None = None
    bar = tqdm(total=n, desc="CLIP + Inception", unit="image", disable=not show_progress, mininterval=1.0)

    table = samples.table
    try:
        with reference_precision():
            for batch in _batches(_within(iter_accuracy_log(log_path, digest=digest), n, log_path), batch_size):
                shape = shape or tuple(batch[0][1].shape)
                pils = [Image.fromarray(image).convert("RGB") for _, image in batch]
                captions = [samples.caption(idx) for idx, _ in batch]
                clip = models.clip.scores(pils, captions)
                features[len(rows):len(rows) + len(batch)] = inception_features(models.inception, pils, models.device)
                for (idx, image), pil, caption, score in zip(batch, pils, captions, clip):
                    rows.append({"qsl_idx": idx, "source_row": int(table["source_row"].iat[idx]),
                                 "id": int(table["id"].iat[idx]), "caption": caption, "clip": score})
                    if idx in wanted and images_dir is not None:
                        pil.save(Path(images_dir) / f"{idx}.png")
                        saved.append(idx)
                    if len(thumbnails) < grid:
                        thumbnails.append((idx, caption, score, _thumbnail(image)))
                bar.update(len(batch))
    finally:
        bar.close()
    if len(rows) != n:
        raise DataError(f"{log_path} holds {len(rows)} unique images, but the run's samples.tsv lists {n} samples",
                        "the accuracy run did not finish or the log belongs to another run; re-run the accuracy run")
    if n < 2:
        raise DataError(f"{log_path} holds {n} image(s); FID needs at least 2", "run a variant with more samples")
    per_sample = pd.DataFrame(rows)
    mu, sigma = feature_statistics(features)
    fid = frechet_distance(models.mu_ref, models.sigma_ref, mu, sigma)
    clip_score = float(np.mean(per_sample["clip"].to_list()))
    return AccuracyResult(
        clip_score=clip_score, fid_score=fid, per_sample=per_sample, n_images=n, image_shape=shape,
        log_path=str(log_path), log_sha256=digest.hexdigest(), standin=models.standin, device=models.device,
        batch_size=batch_size, seconds=time.perf_counter() - started,
        thumbnails=sorted(thumbnails, key=lambda t: t[0]), compliance_saved=sorted(saved))


# --------------------------------------------------------------------------------------------------
# Writing results into the run directory, never over an earlier result
# --------------------------------------------------------------------------------------------------

def reserve_output_names(accuracy_dir: str | Path, standin: bool) -> dict[str, Path]:
    """Fresh names for accuracy.txt, scores.json and images/ (a second scoring gets -2, ...; stand-ins are tagged)."""
    accuracy_dir = Path(accuracy_dir)
    base = f"-{STANDIN_TAG}" if standin else ""
    for n in range(1, 1000):
        suffix = base + (f"-{n}" if n > 1 else "")
        names = {"accuracy_txt": accuracy_dir / f"accuracy{suffix}.txt",
                 "scores_json": accuracy_dir / f"scores{suffix}.json",
                 "images_dir": accuracy_dir / f"images{suffix}"}
        if any(p.exists() for p in names.values()):
            continue
        try:
            names["images_dir"].mkdir()
        except FileExistsError:
            continue
        except OSError as exc:
            raise OutputError(f"cannot write into {accuracy_dir}: {exc.strerror}",
                              "make the run directory writable, or copy it somewhere writable and pass that") from None
        return names
    raise OutputError(f"{accuracy_dir} already holds 999 scorings", "remove old ones or score a copy of the run")


def write_captions(images_dir: Path, samples, qsl_indices: Sequence[int]) -> Path:
    """captions.txt beside the compliance PNGs: '<qsl_idx>  <caption>' per line (two spaces), as the script writes."""
    path = Path(images_dir) / "captions.txt"
    path.write_text("".join(f"{idx}  {samples.caption(idx)}\n" for idx in qsl_indices))
    return path


def score_run(run_dir: str | Path, models: MetricModels, mlperf_round: str = "v4.1", *, batch_size: int = 1,
              grid: int = 0, show_progress: bool = True) -> AccuracyResult:
    """Score a run directory's accuracy log and write accuracy.txt, scores.json and the compliance images into it."""
    import shutil

    from .data import read_sample_set
    from .rounds import compliance_ids, get_round

    rnd = get_round(mlperf_round)
    run_dir = Path(run_dir).expanduser()
    samples = read_sample_set(run_dir)
    accuracy_dir = run_dir / ACCURACY_DIR
    log_path = accuracy_dir / ACCURACY_LOG
    if not log_path.is_file():
        raise DataError(f"{log_path} not found: {run_dir} has no accuracy-mode run",
                        "run the accuracy mode first (05_accuracy with run_dir '' makes one), or pass another run_dir")
    ids = [i for i in compliance_ids(rnd.name) if i < len(samples)]
    names = reserve_output_names(accuracy_dir, models.standin)
    try:
        result = evaluate_log(log_path, samples, models, batch_size=batch_size, compliance_ids=ids,
                              images_dir=names["images_dir"], grid=grid, show_progress=show_progress)
        write_captions(names["images_dir"], samples, result.compliance_saved)
        names["accuracy_txt"].write_text(accuracy_txt(result.fid_score, result.clip_score, result.log_sha256,
                                                      rnd.accuracy_quoted, result.standin))
        result.files = {k: str(v) for k, v in names.items()}
        write_json(names["scores_json"], {
            "kind": "sccsdxl-accuracy", "run_dir": str(run_dir), "round": rnd.name,
            "compliance_ids_in_run": ids, "metric_files": models.files.as_dict(), **result.summary(),
            "per_sample": result.per_sample.to_dict(orient="records")})
    except BaseException:
        shutil.rmtree(names["images_dir"], ignore_errors=True)  # a failed scoring leaves nothing half-written
        for key in ("accuracy_txt", "scores_json"):
            names[key].unlink(missing_ok=True)
        raise
    return result


# --------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------

def plot_clip_distribution(result: AccuracyResult):
    """Histogram of per-sample CLIP scores with the mean and the closed-division window."""
    import matplotlib.pyplot as plt

    scores = result.per_sample["clip"].to_numpy()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.hist(scores, bins=max(10, min(60, int(math.sqrt(len(scores))) * 2)), color="tab:blue", alpha=0.8)
    ax.axvline(result.clip_score, color="black", label=f"mean {result.clip_score:.4f}")
    ax.axvspan(*CLIP_BOUNDS, color="tab:green", alpha=0.3, label=f"window {CLIP_BOUNDS[0]}..{CLIP_BOUNDS[1]}")
    ax.set_xlabel("CLIP score of one image (100 x cosine)")
    ax.set_ylabel("images")
    title = f"Per-sample CLIP, {result.n_images} images"
    ax.set_title(title + (" - STAND-IN MODELS, NOT REAL" if result.standin else ""))
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------------
# Notebook steps
# --------------------------------------------------------------------------------------------------

def open_run(config, run_dir: str = "", show_progress: bool = True):
    """The run to score: an existing run directory, or a new accuracy-mode run made with ``config`` now."""
    from .harness import load_run, run_benchmark

    if run_dir:
        run = load_run(Path(run_dir).expanduser())
        if not (run.run_dir / ACCURACY_DIR / ACCURACY_LOG).is_file():
            raise DataError(f"{run.run_dir} has no {ACCURACY_DIR}/{ACCURACY_LOG}: its accuracy mode never ran",
                            "pass a run made with the accuracy mode, or run_dir '' to make one now")
        return run
    return run_benchmark(config.validate(), modes=("accuracy",), show_progress=show_progress)


def accuracy_record(result: AccuracyResult, run, params: dict[str, Any], mlperf_round: str) -> dict[str, Any]:
    """The 05_accuracy record: scores, verdicts, caveats, where the files went (per-sample scores stay in scores.json)."""
    from .rounds import get_round

    valid_model = bool(run.record.get("valid_for_accuracy", False))
    notes = result.notes()
    if not valid_model:
        notes.append(f"model_source {run.record.get('config', {}).get('model_source')!r} is not SDXL with real weights: "
                     "the images, and so the scores, mean nothing for a submission.")
    return {
        "run_dir": str(run.run_dir), "round": get_round(mlperf_round).name, "parameters": params,
        "valid_for_accuracy": valid_model, **result.summary(), "notes": notes,
        "accuracy_txt": result.files.get("accuracy_txt"), "scores_json": result.files.get("scores_json"),
    }
