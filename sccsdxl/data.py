"""Benchmark data: the 5000 COCO captions, the fixed latent, and the per-variant sample subsets.

Both files ship inside the package and are checked against their SHA-256 on every load. A variant's
subset is the first N rows of ``captions_source.tsv`` (the reference's ``tools/coco.py`` route 1), so
row positions of the subset and the 5000-row file coincide. The exact list of rows a run used is written
into its run directory as ``samples.tsv``; the accuracy step reads it back, so CLIP always compares an
image with the caption it was generated from.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import pandas as pd

from .constants import DATASET_ROWS, LATENT_SHAPE
from .errors import DataError, ParameterError

ASSETS = resources.files("sccsdxl") / "assets"

# sha256 of the shipped files (MLCommons inference, text_to_image/coco2014 and tools/).
CAPTIONS_FILE = "captions_source.tsv"
CAPTIONS_SHA256 = "2eeb95637b30fe5af26dd644bafa7affe4e5472ad0bda32d0feb1bd261280d5e"
LATENTS_FILE = "latents.pt"
LATENTS_SHA256 = "de038bcfd04ca1d4f59041000b509013a9617d79c772d58f338c56cbf083c76f"
COMPLIANCE_IDS_FILE = "sdxl_compliance_image_ids_by_version.tsv"

# Samples per variant: SCC24 'scc-base' and 'scc-main', and the full closed-division dataset.
VARIANTS: dict[str, int] = {"base": 50, "main": 500, "full": DATASET_ROWS}

SAMPLES_FILE = "samples.tsv"
SAMPLE_COLUMNS = ["qsl_idx", "source_row", "id", "image_id", "caption"]


def asset_path(name: str) -> Path:
    """Path of a file shipped in ``sccsdxl/assets``."""
    return Path(str(ASSETS / name))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_file(path: Path, expected_sha256: str) -> Path:
    """Return ``path`` if it exists with the expected hash; otherwise stop with the fix."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} is missing",
                        "reinstall the kit: pip install -e . (the file ships inside the package)")
    actual = sha256_of(path)
    if actual != expected_sha256:
        raise DataError(f"data file {path} is corrupt: sha256 {actual}, expected {expected_sha256}",
                        "restore it from git (git checkout -- sccsdxl/assets) and reinstall: pip install -e .")
    return path


def load_captions(path: Path | None = None, expected_sha256: str = CAPTIONS_SHA256) -> pd.DataFrame:
    """The 5000-row caption table (id, image_id, caption, height, width, file_name, coco_url)."""
    path = verify_file(path or asset_path(CAPTIONS_FILE), expected_sha256)
    return pd.read_csv(path, sep="\t")


def load_latents(path: Path | None = None, expected_sha256: str = LATENTS_SHA256):
    """The one fixed fp32 latent (1,4,128,128) every sample starts from."""
    import torch

    path = verify_file(path or asset_path(LATENTS_FILE), expected_sha256)
    latents = torch.load(path, map_location="cpu", weights_only=True)
    if tuple(latents.shape) != LATENT_SHAPE or latents.dtype != torch.float32:
        raise DataError(f"{path} holds {tuple(latents.shape)} {latents.dtype}, expected {LATENT_SHAPE} float32",
                        "restore it from git (git checkout -- sccsdxl/assets)")
    return latents


def variant_size(variant: str) -> int:
    if variant not in VARIANTS:
        raise ParameterError(f"unknown variant {variant!r}",
                             f"use one of {', '.join(VARIANTS)} (e.g. -p variant main)")
    return VARIANTS[variant]


@dataclass(frozen=True)
class SampleSet:
    """The samples one run serves: QSL index i is ``source_row[i]`` of captions_source.tsv."""

    variant: str
    table: pd.DataFrame  # columns SAMPLE_COLUMNS, indexed by position == qsl_idx

    def __len__(self) -> int:
        return len(self.table)

    @property
    def captions(self) -> list[str]:
        return self.table["caption"].tolist()

    def caption(self, qsl_idx: int) -> str:
        return str(self.table["caption"].iat[qsl_idx])

    def save(self, run_dir: Path) -> Path:
        path = Path(run_dir) / SAMPLES_FILE
        self.table.to_csv(path, sep="\t", index=False)
        return path


def sample_set(variant: str, captions: pd.DataFrame | None = None) -> SampleSet:
    """The first N rows of the caption file for the variant (base 50, main 500, full 5000)."""
    n = variant_size(variant)
    captions = load_captions() if captions is None else captions
    rows = captions.iloc[:n]
    table = pd.DataFrame({
        "qsl_idx": range(n),
        "source_row": range(n),
        "id": rows["id"].to_numpy(),
        "image_id": rows["image_id"].to_numpy(),
        "caption": rows["caption"].to_numpy(),
    })
    return SampleSet(variant, table)


def read_sample_set(run_dir: Path) -> SampleSet:
    """The sample list a finished run used (``<run_dir>/samples.tsv``)."""
    path = Path(run_dir) / SAMPLES_FILE
    if not path.is_file():
        raise DataError(f"{path} is missing: {run_dir} is not a run directory made by sccsdxl",
                        "point to a directory under <output_dir>/runs/ written by 02_baseline or sccsdxl.harness")
    table = pd.read_csv(path, sep="\t", keep_default_na=False)
    missing = [c for c in SAMPLE_COLUMNS if c not in table.columns]
    if missing or list(table["qsl_idx"]) != list(range(len(table))):
        raise DataError(f"{path} is malformed (missing columns {missing} or qsl_idx not 0..N-1)",
                        "re-run the benchmark into a new run directory")
    variant = next((v for v, n in VARIANTS.items() if n == len(table)), "custom")
    return SampleSet(variant, table)


def compliance_id_table() -> pd.DataFrame:
    """Every published list of the 10 compliance-image ids (source, version, ids)."""
    return pd.read_csv(asset_path(COMPLIANCE_IDS_FILE), sep="\t")
