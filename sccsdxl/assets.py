"""Everything the benchmark downloads, in one manifest under one data directory: fetched once, verified, resumable.

Layout of the data directory (``data_dir()``: argument, else ``$SCCSDXL_DATA_DIR``, else ``~/.cache/sccsdxl``)::

    metrics/clip/ViT-B-32-openai/open_clip_model.safetensors   clip_vit_b32_openai (CLIP score)
    metrics/fid/pt_inception-2015-12-05-6726825d.pth           inception_fid (FID feature extractor)
    metrics/fid/val2014.npz                                    fid_stats_val2014 (FID reference statistics)
    coco/annotations_trainval2014.zip                          coco_annotations (optional: re-derive captions)
    coco/captions_*.tsv                                        captions re-derived from the annotations
    huggingface/hub/models--stabilityai--stable-diffusion-xl-base-1.0/   SDXL weights (Hugging Face cache layout)

A download goes to ``<file>.part`` (resumed with an HTTP Range request after an interruption), is checked
(size, SHA-256 or git blob id where published, and a content check that the file is what its reader expects),
and only then renamed to its final name; a small ``.<file>.verified.json`` beside it records the check, so a
present file is never fetched or hashed again. Later notebooks call ``require(name)``, which stops with a
one-line message naming the missing asset and the command that fetches it.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import time
import zipfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from http.client import HTTPException
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.error import HTTPError, URLError
from urllib.parse import urlparse
from urllib.request import Request, urlopen

from . import __version__
from . import constants as C
from .errors import DataError, ModelError, ParameterError
from .record import write_text_atomic

ENV_DATA_DIR = "SCCSDXL_DATA_DIR"
ENV_MIRROR = "SCCSDXL_MIRROR"  # base URL of a local mirror holding the files under their original names
ENV_OFFLINE = ("SCCSDXL_OFFLINE", "HF_HUB_OFFLINE")
DEFAULT_DATA_DIR = Path("~") / ".cache" / "sccsdxl"
CHUNK = 1 << 20


@dataclass(frozen=True)
class Asset:
    """One downloadable file: where it comes from, how it is checked, where it lands under data_dir."""

    name: str
    relpath: str  # where it lands, relative to data_dir
    url: str
    description: str
    needed_by: str
    approx_bytes: int  # for the disk-space check (exact size where known goes in ``size``)
    size: int | None = None
    sha256: str | None = None
    sha256_prefix: str | None = None  # torch.hub naming: the first hex digits of the SHA-256 are in the filename
    git_blob_sha1: str | None = None  # the git object id, for files published in a git repository
    check: str = ""  # content check in CHECKS
    optional: bool = False
    source: str = ""  # where the URL and hash come from

    @property
    def filename(self) -> str:
        return Path(self.relpath).name

    @property
    def hash_text(self) -> str:
        """What the file is verified against, for the manifest table."""
        if self.sha256:
            return f"sha256 {self.sha256}"
        if self.git_blob_sha1:
            return f"git blob {self.git_blob_sha1}"
        if self.sha256_prefix:
            return f"sha256 {self.sha256_prefix}… (filename)"
        return "not published: content check, hash recorded at first download"


MANIFEST: dict[str, Asset] = {a.name: a for a in (
    Asset("clip_vit_b32_openai", "metrics/clip/ViT-B-32-openai/open_clip_model.safetensors",
          "https://huggingface.co/timm/vit_base_patch32_clip_224.openai/resolve/main/open_clip_model.safetensors",
          "CLIP ViT-B/32 (OpenAI weights) in open_clip format: the CLIP score", "05_accuracy", 605_200_000,
          check="clip_safetensors",
          source="open_clip get_pretrained_cfg('ViT-B-32', 'openai')['hf_hub'] = timm/vit_base_patch32_clip_224.openai/; "
                 "open_clip downloads open_clip_model.safetensors from it"),
    Asset("inception_fid", "metrics/fid/pt_inception-2015-12-05-6726825d.pth",
          "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
          "Inception-v3 FID weights (pytorch-fid port of the TF 2015-12-05 graph)", "05_accuracy", 95_700_000,
          sha256_prefix="6726825d", check="inception_state_dict",
          source="pytorch-fid FID_WEIGHTS_URL (release fid_weights); MLCommons tools/fid uses the same file"),
    Asset("fid_stats_val2014", "metrics/fid/val2014.npz",
          "https://raw.githubusercontent.com/mlcommons/inference/master/text_to_image/tools/val2014.npz",
          "FID reference statistics of COCO val2014 (mu 2048, sigma 2048x2048)", "05_accuracy", 40_000_000,
          git_blob_sha1="806479d0693a33110526b6689aa26baddd995c7b", check="fid_stats",
          source="mlcommons/inference text_to_image/tools/val2014.npz (git object id of the committed file)"),
    Asset("coco_annotations", "coco/annotations_trainval2014.zip",
          "http://images.cocodataset.org/annotations/annotations_trainval2014.zip",
          "COCO 2014 annotations: re-derive the 5000 captions and the CM _size.N subsets", "01_setup (optional)",
          253_000_000, check="coco_zip", optional=True,
          source="MLCommons text_to_image/tools/coco.py (route 2, spec §3.2)"),
)}
METRIC_ASSETS = ("clip_vit_b32_openai", "inception_fid", "fid_stats_val2014")

# SDXL 1.0 base on Hugging Face: only the files one dtype needs (fp16 variant files, or the fp32 ones for fp32/bf16).
SDXL_CONFIG_FILES = (
    "model_index.json", "scheduler/scheduler_config.json",
    "text_encoder/config.json", "text_encoder_2/config.json", "unet/config.json", "vae/config.json",
    *(f"{tok}/{name}" for tok in ("tokenizer", "tokenizer_2")
      for name in ("merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json")),
)
SDXL_WEIGHT_FILES = ("text_encoder/model{v}.safetensors", "text_encoder_2/model{v}.safetensors",
                     "unet/diffusion_pytorch_model{v}.safetensors", "vae/diffusion_pytorch_model{v}.safetensors")
SDXL_PARAMETERS = 3_468_837_867  # spec §11.6: bytes = parameters x 2 (fp16) or x 4 (fp32)

# MLCommons checkpoint (spec §10): md5 of the fp16 weights as published by MLCommons/NVIDIA.
MLCOMMONS_FP16_MD5 = {
    "checkpoint_pipe/text_encoder/model.safetensors": "81b87e641699a4cd5985f47e99e71eeb",
    "checkpoint_pipe/text_encoder_2/model.safetensors": "5e540a9d92f6f88d3736189fd28fa6cd",
    "checkpoint_pipe/unet/diffusion_pytorch_model.safetensors": "edfa956683fb6121f717d095bf647f53",
    "checkpoint_pipe/vae/diffusion_pytorch_model.safetensors": "25fe90074af9a0fe36d4a713ad5a3a29",
}
MLCOMMONS_FILES = (
    "checkpoint_pipe/model_index.json", "checkpoint_scheduler/scheduler_config.json",
    *(f"checkpoint_pipe/{c}/config.json" for c in ("text_encoder", "text_encoder_2", "unet", "vae")),
    *MLCOMMONS_FP16_MD5,
    *(f"checkpoint_pipe/{tok}/{name}" for tok in ("tokenizer", "tokenizer_2")
      for name in ("merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json")),
)
MLCOMMONS_R2_URI = "https://inference.mlcommons-storage.org/metadata/stable-diffusion-xl-1-0-{dtype}-checkpoint.uri"
MLCOMMONS_BYTES = {"fp16": 6_500_000_000, "fp32": 13_000_000_000}  # CM/MLC required_disk_space

COCO_CAPTIONS_MEMBER = "annotations/captions_val2014.json"
CAPTION_COLUMNS = ["id", "image_id", "caption", "height", "width", "file_name", "coco_url"]
CM_SUBSET_SIZES = (50, 500)  # SCC24 scc-base / scc-main: CM's _size.50 / _size.500 dataset variations
COCO_SEED = 2023


# ---------------------------------------------------------------- where things go

def data_dir(path: str | Path | None = None) -> Path:
    """The data directory: the argument, else $SCCSDXL_DATA_DIR, else ~/.cache/sccsdxl (not created here)."""
    chosen = str(path) if path not in (None, "") else (os.environ.get(ENV_DATA_DIR) or str(DEFAULT_DATA_DIR))
    return Path(chosen).expanduser().absolute()


def get_asset(name: str) -> Asset:
    """The manifest entry, or a clear error listing the names that exist."""
    if name not in MANIFEST:
        raise ParameterError(f"unknown asset {name!r}", f"use one of {', '.join(MANIFEST)} (or 'sdxl', 'metrics', 'all')")
    return MANIFEST[name]


def asset_path(name: str, data_dir: str | Path | None = None) -> Path:
    """Where the asset lands (whether or not it is there)."""
    return _resolve(data_dir) / get_asset(name).relpath


def _resolve(directory: str | Path | None) -> Path:
    return data_dir(directory)


def _data_dir_argument(directory: str | Path | None) -> str:
    """', data_dir=...' for a printed command, only when the command alone would resolve another directory."""
    resolved = _resolve(directory)
    return "" if resolved == data_dir(None) else f", data_dir={str(resolved)!r}"


def fetch_command(name: str, data_dir: str | Path | None = None) -> str:
    """The exact one-line command that fetches an asset (into the same data directory)."""
    call = f"fetch_sdxl({name.removeprefix('sdxl_')!r}" if name.startswith("sdxl") else f"fetch({name!r}"
    return f'python -c "import sccsdxl.assets as a; a.{call}{_data_dir_argument(data_dir)})"'


def is_offline() -> bool:
    """True when the user switched the network off for this job ($SCCSDXL_OFFLINE or $HF_HUB_OFFLINE)."""
    return any(os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on") for var in ENV_OFFLINE)


def mirror_url(url: str, base_url: str) -> str:
    """The same file on a mirror: base_url + the file's original name."""
    return f"{base_url.rstrip('/')}/{Path(urlparse(url).path).name}"


# ---------------------------------------------------------------- verification

def _sidecar(path: Path) -> Path:
    return path.with_name(f".{path.name}.verified.json")


def hash_file(path: Path) -> dict[str, str]:
    """SHA-256 and git blob id of a file in one pass."""
    size = path.stat().st_size
    sha256, blob = hashlib.sha256(), hashlib.sha1(f"blob {size}\0".encode())
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            sha256.update(block)
            blob.update(block)
    return {"sha256": sha256.hexdigest(), "git_blob_sha1": blob.hexdigest()}


def _hash_problems(asset: Asset, size: int, hashes: dict[str, str]) -> list[str]:
    problems = []
    if asset.size is not None and size != asset.size:
        problems.append(f"size {size:,} bytes, expected {asset.size:,}")
    sha256, blob = hashes.get("sha256", ""), hashes.get("git_blob_sha1", "")
    if asset.sha256 and sha256 != asset.sha256:
        problems.append(f"sha256 {sha256}, expected {asset.sha256}")
    if asset.sha256_prefix and not sha256.startswith(asset.sha256_prefix):
        problems.append(f"sha256 {sha256}, expected it to start with {asset.sha256_prefix}")
    if asset.git_blob_sha1 and blob != asset.git_blob_sha1:
        problems.append(f"git blob id {blob}, expected {asset.git_blob_sha1}")
    return problems


def verify_file(asset: Asset, path: Path, fix: str | None = None) -> dict[str, Any]:
    """Check a file against the manifest (size, hashes, content); raise DataError naming every mismatch."""
    size = path.stat().st_size
    hashes = hash_file(path)
    problems = _hash_problems(asset, size, hashes)
    if not problems and asset.check:
        try:
            CHECKS[asset.check](path)
        except Exception as exc:  # noqa: BLE001 - any reader failure means the file is not usable
            problems.append(f"content check failed: {exc}")
    if problems:
        raise DataError(f"{asset.name}: {path.name} is not the expected file: {'; '.join(problems)}",
                        fix or "download it again")
    return {"name": asset.name, "size": size, **hashes, "checked": asset.check or "size/hash",
            "verified": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _record_verified(path: Path, info: dict[str, Any], url: str = "") -> None:
    """Write the sidecar; a read-only data directory just means the check runs again next time."""
    try:
        _sidecar(path).write_text(json.dumps({**info, "url": url}, indent=1))
    except OSError:
        pass


def _recorded(path: Path) -> dict[str, Any] | None:
    """The sidecar of an earlier verification, if it still describes this file (same size, not newer)."""
    try:
        info = json.loads(_sidecar(path).read_text())
        stat = path.stat()
    except (OSError, ValueError):
        return None
    if info.get("size") != stat.st_size or stat.st_mtime > _sidecar(path).stat().st_mtime + 1:
        return None
    return info


def check_present(name: str, data_dir: str | Path | None = None) -> dict[str, Any]:
    """State of one asset on disk: present (verified now or earlier), missing, partial, or invalid (with why)."""
    asset, path = get_asset(name), asset_path(name, data_dir)
    part = path.with_name(path.name + ".part")
    if not path.is_file():
        state = f"partial download ({part.stat().st_size:,} bytes), resumes on fetch" if part.is_file() else ""
        return {"state": "missing", "detail": state, "path": path, "size": 0}
    info = _recorded(path)
    if info is None or _hash_problems(asset, info["size"], info):
        try:
            info = verify_file(asset, path, fetch_command(name, data_dir))
        except DataError as exc:
            return {"state": "invalid", "detail": exc.problem, "path": path, "size": path.stat().st_size}
        _record_verified(path, info)
    return {"state": "present", "detail": f"verified {info.get('verified', '')}", "path": path, "size": info["size"],
            "sha256": info.get("sha256", "")}


def require(name: str, data_dir: str | Path | None = None) -> Path:
    """The local path of a verified asset; otherwise stop with one message that names it and the fetch command."""
    found = check_present(name, data_dir)
    if found["state"] == "present":
        return found["path"]
    asset = get_asset(name)
    what = "missing" if found["state"] == "missing" else f"not usable ({found['detail']})"
    raise DataError(f"asset {name!r} is {what}: {found['path']} [{asset.description}]", fetch_command(name, data_dir))


# ---------------------------------------------------------------- downloading

class _Interrupted(Exception):
    """The transfer stopped before the last byte; the .part file keeps what arrived."""


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One download per file at a time (two jobs sharing a data directory wait for each other)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path.with_name(f".{path.name}.lock"), "a")  # noqa: SIM115 - closed below
    except OSError:  # a read-only data directory: nothing will be written there, so nothing to lock
        handle = None
    if handle is None:
        yield
        return
    with handle:
        try:
            import fcntl

            fcntl.flock(handle, fcntl.LOCK_EX)
        except (ImportError, OSError):
            pass
        yield


def _progress_bar(total: int | None, initial: int, label: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024, desc=label,
                disable=not enabled, leave=True)


def _open(url: str, offset: int, timeout: float):
    headers = {"User-Agent": f"sccsdxl/{__version__}", "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    return urlopen(Request(url, headers=headers), timeout=timeout)  # noqa: S310 - http(s) URLs from the manifest


def _total_size(response, offset: int) -> int | None:
    """Full file size from Content-Range (206) or Content-Length (200)."""
    match = re.match(r"bytes (\d+)-\d+/(\d+)", response.headers.get("Content-Range", ""))
    if match:
        return int(match.group(2))
    length = response.headers.get("Content-Length")
    return int(length) + offset if length and length.isdigit() else None


def _transfer(url: str, part: Path, expected_size: int | None, timeout: float, label: str, progress: bool) -> None:
    """One attempt: continue ``part`` from its current size; raises _Interrupted if the stream ends early."""
    offset = part.stat().st_size if part.is_file() else 0
    if expected_size is not None and offset >= expected_size:
        if offset == expected_size:
            return
        part.unlink()
        offset = 0
    try:
        response = _open(url, offset, timeout)
    except HTTPError as exc:
        if exc.code == 416 and offset:  # nothing left to send: the .part is complete (verification decides)
            return
        raise
    with response:
        match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
        if offset and (response.status != 206 or not match or int(match.group(1)) != offset):
            offset = 0  # the server ignored the Range request: start over
        total = _total_size(response, offset)
        if expected_size is not None and total is not None and total != expected_size:
            raise DataError(f"{label}: {url} offers {total:,} bytes, the manifest expects {expected_size:,}",
                            "the file at that URL changed or the URL is wrong; pass url=... with the right file")
        with open(part, "ab" if offset else "wb") as fh, _progress_bar(total, offset, label, progress) as bar:
            try:
                while block := response.read(CHUNK):
                    fh.write(block)
                    bar.update(len(block))
            except (HTTPException, OSError) as exc:  # IncompleteRead, reset, timeout
                raise _Interrupted(str(exc) or type(exc).__name__) from None
    got = part.stat().st_size
    if total is not None and got < total:
        raise _Interrupted(f"{got:,} of {total:,} bytes")


def _network_error(label: str, url: str, exc: Exception, dest: Path) -> DataError:
    if isinstance(exc, HTTPError):
        reason = "not found" if exc.code == 404 else (exc.reason or "error")
        return DataError(f"{label}: {url} answered HTTP {exc.code} ({reason})",
                         "check the URL; a mirror (base_url= or $SCCSDXL_MIRROR) must hold the file under the same "
                         "name; or pass url=... pointing at the file")
    host = urlparse(url).netloc
    reason = getattr(exc, "reason", exc)
    return DataError(f"{label}: cannot reach {host} ({reason}); this machine may have no internet access",
                     f"fetch on a machine with network access into the same data directory, or copy the file to "
                     f"{dest} (it is verified on first use), or set $SCCSDXL_MIRROR to a local mirror")


def download(url: str, dest: str | Path, asset: Asset | None = None, *, progress: bool = True, retries: int = 2,
             timeout: float = 60.0) -> dict[str, Any]:
    """Download ``url`` to ``dest`` via ``dest.part`` (resumed), verify it, then rename; returns the check record."""
    dest = Path(dest)
    asset = asset or Asset(dest.name, dest.name, url, dest.name, "", 0)
    part = dest.with_name(dest.name + ".part")
    label = asset.name
    for attempt in range(retries + 1):
        try:
            _transfer(url, part, asset.size, timeout, label, progress)
            break
        except _Interrupted as exc:
            if attempt == retries:
                have = part.stat().st_size if part.is_file() else 0
                raise DataError(f"{label}: download interrupted ({exc}); {have:,} bytes are kept in {part}",
                                "run the same command again: it resumes where it stopped") from None
            time.sleep(min(0.5 * (attempt + 1), 5.0))
        except (HTTPError, URLError, TimeoutError, ConnectionError) as exc:
            raise _network_error(label, url, exc, dest) from None
    try:
        info = verify_file(asset, part)
    except DataError as exc:
        part.unlink(missing_ok=True)
        raise DataError(f"{exc.problem.replace(part.name, 'the download')}; the download was deleted",
                        "fetch again; if it fails the same way, the file at the URL is not the published one "
                        "(report it, or pass url=... to another copy)") from None
    os.replace(part, dest)
    _record_verified(dest, info, url)
    return info


def _set_aside(path: Path) -> Path:
    """Move a file that failed verification out of the way (never deleted: it may be someone's)."""
    target = path.with_name(f"{path.name}.invalid-{datetime.now().strftime('%Y%m%d-%H%M%S')}")
    os.replace(path, target)
    return target


def fetch(name: str, data_dir: str | Path | None = None, *, url: str | None = None, base_url: str | None = None,
          progress: bool = True, retries: int = 2, timeout: float = 60.0) -> Path:
    """Get one asset into the data directory (skipped when present and valid); returns its path."""
    asset = get_asset(name)
    dest = asset_path(name, data_dir)
    with _locked(dest):
        found = check_present(name, data_dir)
        if found["state"] == "present":
            return dest
        if found["state"] == "invalid":
            moved = _set_aside(dest)
            print(f"{name}: {found['detail']}; kept as {moved.name}, fetching a fresh copy")
        if is_offline():
            raise DataError(f"{name}: offline mode ($HF_HUB_OFFLINE / $SCCSDXL_OFFLINE) is on, not downloading "
                            f"{asset.url}", f"unset it and run: {fetch_command(name, data_dir)}")
        base_url = base_url if base_url is not None else os.environ.get(ENV_MIRROR, "")
        source = url or (mirror_url(asset.url, base_url) if base_url else asset.url)
        download(source, dest, asset, progress=progress, retries=retries, timeout=timeout)
    return dest


# ---------------------------------------------------------------- content checks (what the reader of each file needs)

def _safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a .safetensors file, after checking that the tensors fill the file exactly."""
    with open(path, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        if length > 100_000_000:
            raise ValueError("not a safetensors file (header length)")
        header = json.loads(fh.read(length))
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + length + end != path.stat().st_size:
        raise ValueError(f"truncated safetensors file: tensors end at {8 + length + end:,}, file has "
                         f"{path.stat().st_size:,} bytes")
    return header


def check_clip_safetensors(path: Path) -> None:
    """open_clip ViT-B-32 weights: the patch embedding must be 768x3x32x32."""
    header = _safetensors_header(path)
    shape = header.get("visual.conv1.weight", {}).get("shape")
    if shape != [768, 3, 32, 32]:
        raise ValueError(f"visual.conv1.weight has shape {shape}, expected [768, 3, 32, 32] (ViT-B/32 in open_clip format)")


def check_inception_state_dict(path: Path) -> None:
    """pytorch-fid's FID Inception: a state dict whose classifier has 1008 classes over 2048 features."""
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    fc = state.get("fc.weight") if isinstance(state, dict) else None
    if fc is None or tuple(fc.shape) != (1008, 2048) or "Conv2d_1a_3x3.conv.weight" not in state:
        raise ValueError("not the FID Inception state dict (fc.weight 1008x2048, Conv2d_1a_3x3.conv.weight)")


def check_fid_stats(path: Path) -> None:
    """FID reference statistics: mu (2048,) and sigma (2048, 2048)."""
    import numpy as np

    with np.load(path, allow_pickle=False) as stats:
        shapes = {key: stats[key].shape for key in ("mu", "sigma") if key in stats.files}
    if shapes != {"mu": (2048,), "sigma": (2048, 2048)}:
        raise ValueError(f"expected mu (2048,) and sigma (2048, 2048), found {shapes}")


def check_coco_zip(path: Path) -> None:
    """The annotations zip must hold captions_val2014.json with an intact CRC."""
    with zipfile.ZipFile(path) as archive:
        if COCO_CAPTIONS_MEMBER not in archive.namelist():
            raise ValueError(f"{COCO_CAPTIONS_MEMBER} is not in the archive")
        with archive.open(COCO_CAPTIONS_MEMBER) as member:  # reading to the end checks the CRC
            while member.read(CHUNK):
                pass


CHECKS: dict[str, Callable[[Path], None]] = {
    "clip_safetensors": check_clip_safetensors, "inception_state_dict": check_inception_state_dict,
    "fid_stats": check_fid_stats, "coco_zip": check_coco_zip,
}


def open_clip_arguments(data_dir: str | Path | None = None) -> dict[str, Any]:
    """Arguments for open_clip.create_model_and_transforms that build the reference's ViT-B/32 'openai' offline.

    Loading from a file skips open_clip's per-tag settings; the OpenAI weights need QuickGELU, so it is forced.
    """
    return {"model_name": "ViT-B-32", "pretrained": str(require("clip_vit_b32_openai", data_dir)),
            "force_quick_gelu": True}


# ---------------------------------------------------------------- SDXL weights (Hugging Face)

def hf_cache_dir(data_dir: str | Path | None = None) -> Path:
    """The Hugging Face cache inside the data directory (pass it as cache_dir when loading the pipeline)."""
    return _resolve(data_dir) / "huggingface" / "hub"


def sdxl_files(dtype: str) -> list[str]:
    """Repository files one dtype needs: fp16 variant weights for fp16, the fp32 weights for fp32 and bf16."""
    if dtype not in ("fp16", "fp32", "bf16"):
        raise ParameterError(f"unknown dtype {dtype!r}", "use one of fp32, fp16, bf16 (e.g. -p dtype fp16)")
    variant = ".fp16" if dtype == "fp16" else ""
    return [*SDXL_CONFIG_FILES, *(f.format(v=variant) for f in SDXL_WEIGHT_FILES)]


def sdxl_bytes(dtype: str) -> int:
    """Approximate download size of the weights for one dtype."""
    return SDXL_PARAMETERS * (2 if dtype == "fp16" else 4)


def _cached(filename: str, cache: Path) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(C.HF_MODEL_ID, filename, cache_dir=str(cache))
    return Path(found) if isinstance(found, str) and Path(found).is_file() else None


def sdxl_status(dtype: str, data_dir: str | Path | None = None, cache_dir: str | Path | None = None) -> dict[str, Any]:
    """Which SDXL files for ``dtype`` are in the cache (no network): missing list, snapshot dir, bytes present."""
    cache = Path(cache_dir).expanduser() if cache_dir else hf_cache_dir(data_dir)
    found = {f: _cached(f, cache) for f in sdxl_files(dtype)}
    present = [p for p in found.values() if p is not None]
    snapshot = found["model_index.json"].parent if found["model_index.json"] else None
    return {"dtype": dtype, "cache_dir": cache, "missing": [f for f, p in found.items() if p is None],
            "snapshot": snapshot, "bytes": sum(p.stat().st_size for p in present)}


def require_sdxl(dtype: str, data_dir: str | Path | None = None, cache_dir: str | Path | None = None) -> Path:
    """The local snapshot directory of SDXL for ``dtype``, or stop naming what is missing and the fetch command."""
    state = sdxl_status(dtype, data_dir, cache_dir)
    if not state["missing"]:
        return state["snapshot"]
    missing = state["missing"]
    raise ModelError(f"SDXL weights ({dtype}) are missing from {state['cache_dir']}: {len(missing)} files, e.g. "
                     f"{', '.join(missing[-2:])}", fetch_command(f"sdxl_{dtype}", data_dir))


@contextmanager
def _hf_progress(enabled: bool) -> Iterator[None]:
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    (enable_progress_bars if enabled else disable_progress_bars)()
    try:
        yield
    finally:
        (disable_progress_bars if was_disabled else enable_progress_bars)()


def fetch_sdxl(dtype: str = "fp16", data_dir: str | Path | None = None, cache_dir: str | Path | None = None, *,
               endpoint: str | None = None, progress: bool = True, token: str | bool | None = None) -> Path:
    """Download SDXL 1.0 base (only the files ``dtype`` needs) into the data directory's HF cache; returns the snapshot."""
    cache = Path(cache_dir).expanduser() if cache_dir else hf_cache_dir(data_dir)
    state = sdxl_status(dtype, data_dir, cache)
    if not state["missing"]:
        return state["snapshot"]
    if is_offline():
        raise ModelError(f"SDXL weights ({dtype}): {len(state['missing'])} files missing in {cache} and offline mode "
                         "($HF_HUB_OFFLINE / $SCCSDXL_OFFLINE) is on",
                         "unset it and run: " + fetch_command(f"sdxl_{dtype}", data_dir))
    from huggingface_hub import hf_hub_download

    cache.mkdir(parents=True, exist_ok=True)
    with _hf_progress(progress):
        for filename in state["missing"]:
            try:
                hf_hub_download(C.HF_MODEL_ID, filename, cache_dir=str(cache), endpoint=endpoint, token=token)
            except Exception as exc:  # noqa: BLE001 - network, auth, missing file: one clear message instead
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise ModelError(f"SDXL weights ({dtype}): could not download {filename} from "
                                 f"{endpoint or 'huggingface.co'}: {type(exc).__name__}: {first}",
                                 "check the network (files already fetched are kept; run the same command again to "
                                 "continue), or use the MLCommons checkpoint: -p model_source mlcommons") from None
    return require_sdxl(dtype, data_dir, cache)


# ---------------------------------------------------------------- SDXL weights (MLCommons checkpoint, spec §10)

def mlcommons_download_commands(dtype: str = "fp16", target: str = "<dir>") -> list[str]:
    """The documented ways to get the MLCommons checkpoint (they need tools outside this kit)."""
    kind = "fp16" if dtype == "fp16" else "fp32"
    return [
        f"mlcr get,ml-model,sdxl,_{kind},_r2-downloader --outdirname={target} -j",
        f"bash mlc-r2-downloader.sh -d {target} {MLCOMMONS_R2_URI.format(dtype=kind)}"
        "   (script from github.com/mlcommons/r2-downloader)",
    ]


def find_mlcommons_dir(path: str | Path) -> Path:
    """The checkpoint root: ``path`` itself, or its one subdirectory holding checkpoint_pipe/ (an unpacked archive)."""
    from .pipeline import check_mlcommons_dir

    root = Path(path).expanduser()
    if root.is_dir() and not (root / "checkpoint_pipe").is_dir():
        inner = [d for d in root.iterdir() if (d / "checkpoint_pipe").is_dir()]
        if len(inner) == 1:
            root = inner[0]
    return check_mlcommons_dir(root)


def _md5(path: Path) -> str:
    digest = hashlib.md5()  # noqa: S324 - md5 is what MLCommons publishes for these files
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK * 8), b""):
            digest.update(block)
    return digest.hexdigest()


def check_mlcommons_checkpoint(path: str | Path, verify_md5: bool = False) -> dict[str, Any]:
    """Validate an unpacked MLCommons checkpoint: layout, every component file, and (fp16, optional) the md5s."""
    root = find_mlcommons_dir(path)
    missing = [f for f in MLCOMMONS_FILES if not (root / f).is_file()]
    unet = root / "checkpoint_pipe/unet/diffusion_pytorch_model.safetensors"
    dtype = ("fp16" if unet.stat().st_size < 7e9 else "fp32") if unet.is_file() else "unknown"
    md5 = {}
    if verify_md5 and dtype == "fp16":
        md5 = {f: ("ok" if _md5(root / f) == want else "MISMATCH") for f, want in MLCOMMONS_FP16_MD5.items()
               if (root / f).is_file()}
    if missing or "MISMATCH" in md5.values():
        bad = [f for f, v in md5.items() if v == "MISMATCH"]
        raise ModelError(f"{root} is an incomplete MLCommons checkpoint: missing {', '.join(missing) or '-'}; "
                         f"md5 mismatch {', '.join(bad) or '-'}",
                         "download it again: " + mlcommons_download_commands(dtype if dtype != "unknown" else "fp16",
                                                                            str(root))[0])
    return {"root": root, "dtype": dtype, "md5": md5 or ("not published for fp32" if dtype == "fp32" else "not checked")}


# ---------------------------------------------------------------- status for 01_setup

def resolve_fetch_list(fetch: str, model_source: str = "hf") -> list[str]:
    """Parse the ``fetch`` parameter: comma-separated names, 'metrics', 'sdxl', 'all' ('' = nothing)."""
    names: list[str] = []
    for token in (t.strip() for t in re.split(r"[,\s]+", fetch or "") if t.strip()):
        if token == "all":
            group = [*METRIC_ASSETS, "coco_annotations"] + (["sdxl"] if model_source == "hf" else [])
        elif token == "metrics":
            group = list(METRIC_ASSETS)
        elif token == "sdxl" or token in MANIFEST:
            group = [token]
        else:
            raise ParameterError(f"unknown asset {token!r} in fetch",
                                 f"use a comma-separated list of {', '.join(MANIFEST)}, sdxl, metrics, all "
                                 "(e.g. -p fetch metrics,sdxl)")
        names += [n for n in group if n not in names]
    return names


def status(data_dir: str | Path | None = None, dtype: str | None = "fp16", model_source: str = "hf",
           model_path: str = ""):
    """Table of every asset this setup needs: present / missing / invalid, where it is, and the fetch command."""
    import pandas as pd

    rows = []
    if model_source == "hf" and dtype:
        state = sdxl_status(dtype, data_dir)
        rows.append({"asset": f"sdxl_{dtype}", "needed by": "02_baseline and later",
                     "state": "present" if not state["missing"] else "missing",
                     "detail": f"{len(state['missing'])} of {len(sdxl_files(dtype))} files missing" if state["missing"]
                     else "all files in the cache",
                     "size": state["bytes"], "path": str(state["snapshot"] or state["cache_dir"]),
                     "fetch": "" if not state["missing"] else fetch_command(f"sdxl_{dtype}", data_dir)})
    elif model_source == "mlcommons":
        rows.append(_mlcommons_row(model_path, dtype or "fp16"))
    for name, asset in MANIFEST.items():
        found = check_present(name, data_dir)
        rows.append({"asset": name, "needed by": asset.needed_by, "state": found["state"], "detail": found["detail"],
                     "size": found["size"], "path": str(found["path"]),
                     "fetch": "" if found["state"] == "present" else fetch_command(name, data_dir)})
    return pd.DataFrame(rows)


def _mlcommons_row(model_path: str, dtype: str) -> dict[str, Any]:
    row = {"asset": "mlcommons_checkpoint", "needed by": "02_baseline and later", "size": 0, "path": model_path}
    try:
        found = check_mlcommons_checkpoint(model_path)
    except (ParameterError, ModelError) as exc:
        return {**row, "state": "missing", "detail": exc.problem,
                "fetch": " | ".join(mlcommons_download_commands(dtype, model_path or "<dir>"))}
    return {**row, "state": "present", "detail": f"{found['dtype']} checkpoint, layout ok", "path": str(found["root"]),
            "fetch": ""}


def manifest_table(data_dir: str | Path | None = None, dtypes: tuple[str, ...] = ("fp16", "fp32")):
    """The manifest: name, source URL, size, hash it is verified against, where it lands."""
    import pandas as pd

    rows = [{"asset": a.name, "source": a.url, "size": f"{a.size:,} B" if a.size else f"~{a.approx_bytes / 1e6:,.0f} MB",
             "verified by": a.hash_text + (f" + {a.check}" if a.check else ""),
             "lands at": str(asset_path(a.name, data_dir)), "optional": a.optional} for a in MANIFEST.values()]
    for dtype in dtypes:
        rows.append({"asset": f"sdxl_{dtype}",
                     "source": f"https://huggingface.co/{C.HF_MODEL_ID} ({len(sdxl_files(dtype))} files"
                               f"{', variant fp16' if dtype == 'fp16' else ''})",
                     "size": f"~{sdxl_bytes(dtype) / 1e9:.1f} GB", "verified by": "huggingface_hub (size, etag)",
                     "lands at": str(hf_cache_dir(data_dir)), "optional": False})
    rows.append({"asset": "mlcommons_checkpoint", "source": MLCOMMONS_R2_URI.format(dtype="fp16/fp32"),
                 "size": "~6.5 GB (fp16) / ~13 GB (fp32)", "verified by": "layout + md5 (fp16)",
                 "lands at": "model_path (you choose)", "optional": True})
    return pd.DataFrame(rows)


def missing_bytes(data_dir: str | Path | None = None, dtype: str = "fp16", model_source: str = "hf") -> int:
    """Approximate disk space the missing downloads still need."""
    total = sum(a.approx_bytes for n, a in MANIFEST.items() if not asset_path(n, data_dir).is_file())
    if model_source == "hf":
        state = sdxl_status(dtype, data_dir)
        if state["missing"]:
            total += max(0, sdxl_bytes(dtype) - state["bytes"])
    return total


def fetch_requested(names: list[str], data_dir: str | Path | None = None, dtype: str = "fp16",
                    progress: bool = True, base_url: str | None = None) -> list[dict[str, Any]]:
    """Fetch each named asset, never stopping at the first failure; one result row per asset."""
    results = []
    for name in names:
        started = time.perf_counter()
        try:
            path = fetch_sdxl(dtype, data_dir, progress=progress) if name == "sdxl" else \
                fetch(name, data_dir, base_url=base_url or None, progress=progress)
            results.append({"asset": name, "result": "ok", "path": str(path), "message": ""})
        except (DataError, ModelError) as exc:
            results.append({"asset": name, "result": "failed", "path": "", "message": exc.message})
        results[-1]["seconds"] = round(time.perf_counter() - started, 1)
    return results


def raise_if_failed(results: list[dict[str, Any]]) -> None:
    """After the record is written: a failed fetch must still fail a batch job."""
    failed = [r["asset"] for r in results if r["result"] != "ok"]
    if failed:
        raise DataError(f"could not fetch {', '.join(failed)} (see the fetch table above)",
                        "fix the cause shown there and run 01_setup again; finished downloads are kept")


# ---------------------------------------------------------------- captions from the COCO annotations (spec §3.2 route 2)

def read_coco_captions(path: str | Path) -> dict[str, Any]:
    """captions_val2014.json, from the annotations zip or a plain .json file."""
    path = Path(path)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive, archive.open(COCO_CAPTIONS_MEMBER) as member:
            return json.load(member)
    return json.loads(path.read_text())


def derive_captions(annotations: dict[str, Any] | str | Path, max_images: int = C.DATASET_ROWS,
                    seed: int = COCO_SEED):
    """The caption table the MLCommons tools/coco.py builds from the annotations: one caption per image, shuffled
    with ``seed``, the first ``max_images`` kept, then sorted by annotation id (what CM's _size.N variants use)."""
    import pandas as pd

    data = annotations if isinstance(annotations, dict) else read_coco_captions(annotations)
    captions = pd.DataFrame(data["annotations"]).drop_duplicates(subset=["image_id"], keep="first")
    chosen = captions.sort_values(by=["id"]).sample(frac=1, random_state=seed).reset_index(drop=True)
    chosen = chosen.iloc[:max_images].copy()
    chosen["caption"] = chosen["caption"].map(lambda text: text.replace("\n", "").strip())
    images = pd.DataFrame(data["images"]).rename(columns={"id": "image_key"})
    table = chosen.merge(images, how="inner", left_on="image_id", right_on="image_key")
    return table.sort_values(by=["id"]).reset_index(drop=True)[CAPTION_COLUMNS]


def captions_tsv(table) -> str:
    """The table as the reference writes it (tab-separated, header, no index)."""
    return table.to_csv(sep="\t", index=False)


def compare_with_shipped(table) -> dict[str, Any]:
    """Is a re-derived 5000-row table the shipped captions_source.tsv? Byte-identical, or which rows differ."""
    from .data import CAPTIONS_SHA256, load_captions

    text = captions_tsv(table)
    identical = hashlib.sha256(text.encode()).hexdigest() == CAPTIONS_SHA256
    shipped = load_captions()
    same_ids = list(table["id"]) == list(shipped["id"])
    differing = int((table["caption"].to_numpy() != shipped["caption"].to_numpy()).sum()) if same_ids else None
    return {"byte_identical": identical, "same_ids_in_order": same_ids, "captions_differing": differing,
            "rows": len(table)}


def subset_overlap(table, n: int | None = None) -> dict[str, int]:
    """How many of a CM _size.N subset's rows are also among the first N rows of captions_source.tsv (route 1)."""
    from .data import load_captions

    n = n or len(table)
    first_n = set(load_captions()["id"].iloc[:n])
    return {"rows": len(table), "in_first_n_rows": len(first_n & set(table["id"]))}


def _write_derived(path: Path, text: str) -> Path:
    """Write a derived file atomically; a different earlier file is moved aside, never overwritten."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file():
        if path.read_text() == text:
            return path
        path.replace(path.with_name(f"{path.name}.{datetime.now().strftime('%Y%m%d-%H%M%S')}.bak"))
    return write_text_atomic(path, text)


def derive_caption_files(data_dir: str | Path | None = None, sizes: tuple[int, ...] = CM_SUBSET_SIZES,
                         annotations: str | Path | None = None) -> dict[str, Any]:
    """From the annotations: the 5000-row table (checked against the shipped file) and CM's _size.N subsets."""
    source = Path(annotations) if annotations else require("coco_annotations", data_dir)
    data = read_coco_captions(source)
    out_dir = _resolve(data_dir) / "coco"
    full = derive_captions(data, C.DATASET_ROWS)
    result: dict[str, Any] = {"rederived": str(_write_derived(out_dir / "captions_source_rederived.tsv",
                                                              captions_tsv(full)))}
    result["check"] = compare_with_shipped(full) if len(full) == C.DATASET_ROWS else {"rows": len(full)}
    result["subsets"] = {}
    for n in sizes:
        subset = derive_captions(data, n)
        path = _write_derived(out_dir / f"captions_size{n}.tsv", captions_tsv(subset))
        overlap = subset_overlap(subset, n) if len(full) == C.DATASET_ROWS else {}
        result["subsets"][n] = {"path": str(path), "rows": len(subset), **overlap}
    return result


# ---------------------------------------------------------------- the fixed latent, for display

def latent_stats(latents) -> dict[str, Any]:
    """Shape, dtype and value statistics of the fixed latent (overall and per channel)."""
    values = latents.detach().float().cpu()
    return {"shape": list(values.shape), "dtype": str(latents.dtype).replace("torch.", ""),
            "mean": float(values.mean()), "std": float(values.std()), "min": float(values.min()),
            "max": float(values.max()),
            "channel_mean": [float(values[0, c].mean()) for c in range(values.shape[1])],
            "channel_std": [float(values[0, c].std()) for c in range(values.shape[1])]}


def latent_channels_figure(latents):
    """The 4 channels of the fixed latent side by side (it is Gaussian noise: no structure is expected)."""
    import matplotlib.pyplot as plt

    values = latents.detach().float().cpu()[0]
    fig, axes = plt.subplots(1, values.shape[0], figsize=(3.2 * values.shape[0], 3.4))
    for channel, ax in enumerate(axes):
        shown = ax.imshow(values[channel].numpy(), cmap="coolwarm", vmin=-3, vmax=3)
        ax.set_title(f"channel {channel}", fontsize=9)
        ax.axis("off")
    fig.colorbar(shown, ax=list(axes), shrink=0.8)
    return fig


def asset_records(data_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """The manifest as plain dicts (for the 01_setup record)."""
    return [{**asdict(a), "path": str(asset_path(a.name, data_dir))} for a in MANIFEST.values()]


# ---------------------------------------------------------------- 01_setup helpers

def plan_setup(data_dir: str | Path | None, dtype: str, model_source: str, fetch: str) -> dict[str, Any]:
    """Check 01_setup's parameters and say what it will do: where assets go, what to fetch, offline or not."""
    from .pipeline import SOURCES

    if model_source not in SOURCES:
        raise ParameterError(f"unknown model_source {model_source!r}",
                             f"use one of {', '.join(SOURCES)} (e.g. -p model_source hf)")
    sdxl_files(dtype)  # validates dtype
    return {"data_dir": _resolve(data_dir), "fetch": resolve_fetch_list(fetch, model_source), "offline": is_offline(),
            "mirror": os.environ.get(ENV_MIRROR, "")}


def readiness(table, model_source: str) -> dict[str, Any]:
    """From the status table: can the benchmark run (weights) and can accuracy be scored offline (metric assets)?"""
    state = dict(zip(table["asset"], table["state"]))
    weights = [a for a in state if a.startswith("sdxl_") or a == "mlcommons_checkpoint"]
    return {"benchmark": model_source in ("synthetic", "tiny") or all(state[a] == "present" for a in weights),
            "accuracy": all(state.get(a) == "present" for a in METRIC_ASSETS),
            "missing": [a for a, s in state.items() if s != "present" and not (a in MANIFEST and MANIFEST[a].optional)]}


def fetch_panel(data_dir: str | Path | None = None, dtype: str = "fp16", model_source: str = "hf"):
    """JupyterLab only: tick missing assets and fetch them (a thin wrapper over fetch_requested)."""
    import ipywidgets as widgets
    import pandas as pd
    from IPython.display import display

    table = status(data_dir, dtype, model_source)
    names = [("sdxl" if a.startswith("sdxl_") else a) for a in table.loc[table["state"] != "present", "asset"]
             if a != "mlcommons_checkpoint"]
    boxes = [widgets.Checkbox(value=name != "coco_annotations", description=name) for name in names]
    button, out = widgets.Button(description="Fetch selected", button_style="primary"), widgets.Output()

    def run(_):
        with out:
            out.clear_output()
            display(pd.DataFrame(fetch_requested([b.description for b in boxes if b.value], data_dir, dtype)))
            display(status(data_dir, dtype, model_source))

    button.on_click(run)
    return widgets.VBox([widgets.HTML("<b>Missing assets</b>" if boxes else "<b>Nothing is missing.</b>"),
                         *boxes, button, out])
