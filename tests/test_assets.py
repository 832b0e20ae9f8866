"""Asset manifest, resumable verified downloads (against a local HTTP server), offline reports, caption re-derivation."""
from __future__ import annotations

import hashlib
import json
import os
import random
import socket
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

import sccsdxl.assets as A
from sccsdxl import constants as C
from sccsdxl.errors import DataError, ModelError, ParameterError

PAYLOAD = random.Random(7).randbytes(300_000)
OTHER = random.Random(8).randbytes(300_000)
SDXL_PREFIX = f"/{C.HF_MODEL_ID}/resolve/main/"


class FileServer:
    """A tiny HTTP server on 127.0.0.1 with Range support and paths that misbehave on purpose."""

    def __init__(self):
        self.files: dict[str, bytes] = {"/good.bin": PAYLOAD, "/cut.bin": PAYLOAD, "/norange.bin": PAYLOAD}
        self.cut_left: dict[str, int] = {}  # path -> how many more GETs to cut halfway
        self.log: list[tuple[str, str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_HEAD(self):
                server.serve(self, body=False)

            def do_GET(self):
                server.serve(self, body=True)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_port}"

    def url(self, path: str) -> str:
        return self.base + path

    def gets(self, path: str) -> list[str | None]:
        return [rng for method, p, rng in self.log if method == "GET" and p == path]

    def serve(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        path = handler.path.split("?")[0]
        self.log.append((handler.command, path, handler.headers.get("Range")))
        data = self.files.get(path)
        if data is None:
            handler.send_response(404)
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        start, status = 0, 200
        rng = handler.headers.get("Range")
        if rng and path != "/norange.bin":
            start = int(rng.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                handler.send_response(416)
                handler.send_header("Content-Range", f"bytes */{len(data)}")
                handler.send_header("Content-Length", "0")
                handler.end_headers()
                return
            status = 206
        handler.send_response(status)
        if status == 206:
            handler.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        if path.startswith(SDXL_PREFIX):  # what huggingface_hub reads from the Hub
            handler.send_header("X-Repo-Commit", "c" * 40)
            handler.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        handler.send_header("Content-Length", str(len(data) - start))
        handler.end_headers()
        if not body:
            return
        if self.cut_left.get(path, 0) > 0 and handler.command == "GET":
            self.cut_left[path] -= 1
            handler.wfile.write(data[start:start + (len(data) - start) // 2])
            handler.wfile.flush()
            handler.connection.shutdown(socket.SHUT_RDWR)
            handler.close_connection = True
            return
        handler.wfile.write(data[start:])

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def server():
    srv = FileServer()
    yield srv
    srv.close()


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for var in (A.ENV_DATA_DIR, A.ENV_MIRROR, *A.ENV_OFFLINE):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def add_asset(monkeypatch, url: str, data: bytes = PAYLOAD, **kw) -> A.Asset:
    """Register a test asset whose expected hash is that of ``data``."""
    asset = A.Asset("testfile", "test/file.bin", url, "a test file", "tests", len(data),
                    sha256=hashlib.sha256(data).hexdigest(), **kw)
    monkeypatch.setitem(A.MANIFEST, "testfile", asset)
    return asset


# ---------------------------------------------------------------- data_dir and the manifest

def test_data_dir_argument_then_environment_then_default(monkeypatch, tmp_path):
    assert A.data_dir() == Path(os.environ["HOME"]) / ".cache" / "sccsdxl"
    monkeypatch.setenv(A.ENV_DATA_DIR, str(tmp_path / "env"))
    assert A.data_dir() == tmp_path / "env" and A.data_dir("") == tmp_path / "env"
    assert A.data_dir(tmp_path / "arg") == tmp_path / "arg"


def test_manifest_names_the_contract_assets_with_urls_and_landing_places(tmp_path):
    assert {"clip_vit_b32_openai", "inception_fid", "fid_stats_val2014", "coco_annotations"} <= set(A.MANIFEST)
    table = A.manifest_table(tmp_path)
    assert {"asset", "source", "size", "verified by", "lands at"} <= set(table.columns)
    for asset in A.MANIFEST.values():
        assert asset.url.startswith(("https://", "http://"))
        assert A.asset_path(asset.name, tmp_path).is_relative_to(tmp_path)
    assert A.MANIFEST["fid_stats_val2014"].url.endswith("mlcommons/inference/master/text_to_image/tools/val2014.npz")
    assert A.MANIFEST["inception_fid"].url == ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                                               "pt_inception-2015-12-05-6726825d.pth")


def test_clip_url_is_where_the_installed_open_clip_downloads_from():
    pretrained = pytest.importorskip("open_clip.pretrained")
    cfg = pretrained.get_pretrained_cfg("ViT-B-32", "openai")
    repo = cfg["hf_hub"].rstrip("/")
    assert A.MANIFEST["clip_vit_b32_openai"].url == \
        f"https://huggingface.co/{repo}/resolve/main/open_clip_model.safetensors"


def test_unknown_asset_names_are_refused():
    with pytest.raises(ParameterError, match="unknown asset 'clip'"):
        A.get_asset("clip")
    with pytest.raises(ParameterError, match="unknown asset 'weights'"):
        A.resolve_fetch_list("metrics,weights")


def test_fetch_list_groups():
    assert A.resolve_fetch_list("") == []
    assert A.resolve_fetch_list("metrics") == list(A.METRIC_ASSETS)
    assert A.resolve_fetch_list("all", "hf")[-1] == "sdxl"
    assert "sdxl" not in A.resolve_fetch_list("all", "mlcommons")
    assert A.resolve_fetch_list("inception_fid, sdxl,inception_fid") == ["inception_fid", "sdxl"]


# ---------------------------------------------------------------- downloads

def test_good_file_is_fetched_verified_and_not_fetched_again(monkeypatch, tmp_path, server):
    add_asset(monkeypatch, server.url("/good.bin"))
    path = A.fetch("testfile", tmp_path, progress=False)
    assert path == tmp_path / "test" / "file.bin" and path.read_bytes() == PAYLOAD
    assert not path.with_name("file.bin.part").exists()
    assert json.loads(A._sidecar(path).read_text())["sha256"] == hashlib.sha256(PAYLOAD).hexdigest()
    before = len(server.gets("/good.bin"))
    assert A.fetch("testfile", tmp_path, progress=False) == path
    assert len(server.gets("/good.bin")) == before
    assert A.require("testfile", tmp_path) == path


def test_corrupt_download_is_reported_and_not_kept(monkeypatch, tmp_path, server):
    add_asset(monkeypatch, server.url("/good.bin"), data=OTHER)
    with pytest.raises(DataError, match="sha256 .* expected .*deleted"):
        A.fetch("testfile", tmp_path, progress=False)
    assert [p.name for p in (tmp_path / "test").iterdir() if not p.name.startswith(".")] == []


def test_cut_connection_keeps_the_part_and_the_next_call_resumes(monkeypatch, tmp_path, server):
    add_asset(monkeypatch, server.url("/cut.bin"))
    server.cut_left["/cut.bin"] = 1
    with pytest.raises(DataError, match="interrupted") as info:
        A.fetch("testfile", tmp_path, progress=False, retries=0)
    assert "again" in info.value.fix
    dest = tmp_path / "test" / "file.bin"
    part = dest.with_name("file.bin.part")
    assert not dest.exists() and 0 < part.stat().st_size < len(PAYLOAD)
    state = A.check_present("testfile", tmp_path)
    assert state["state"] == "missing" and "partial download" in state["detail"]
    half = part.stat().st_size
    assert A.fetch("testfile", tmp_path, progress=False, retries=0).read_bytes() == PAYLOAD
    assert server.gets("/cut.bin")[-1] == f"bytes={half}-"
    assert not part.exists()


def test_cut_connection_is_resumed_within_one_call_when_retries_allow(monkeypatch, tmp_path, server):
    add_asset(monkeypatch, server.url("/cut.bin"))
    server.cut_left["/cut.bin"] = 1
    assert A.fetch("testfile", tmp_path, progress=False, retries=1).read_bytes() == PAYLOAD
    assert server.gets("/cut.bin")[-1].startswith("bytes=")


def test_server_that_ignores_range_starts_over(monkeypatch, tmp_path, server):
    add_asset(monkeypatch, server.url("/norange.bin"))
    dest = tmp_path / "test" / "file.bin"
    dest.parent.mkdir(parents=True)
    dest.with_name("file.bin.part").write_bytes(PAYLOAD[:1000])
    assert A.fetch("testfile", tmp_path, progress=False).read_bytes() == PAYLOAD


def test_complete_part_file_is_verified_without_refetching(monkeypatch, tmp_path, server):
    add_asset(monkeypatch, server.url("/good.bin"), size=len(PAYLOAD))
    dest = tmp_path / "test" / "file.bin"
    dest.parent.mkdir(parents=True)
    dest.with_name("file.bin.part").write_bytes(PAYLOAD)
    before = len(server.gets("/good.bin"))
    assert A.fetch("testfile", tmp_path, progress=False).read_bytes() == PAYLOAD
    assert len(server.gets("/good.bin")) == before


def test_404_is_a_clear_error(monkeypatch, tmp_path, server):
    add_asset(monkeypatch, server.url("/nothing-here.bin"))
    with pytest.raises(DataError, match="HTTP 404 \\(not found\\)"):
        A.fetch("testfile", tmp_path, progress=False)
    assert not (tmp_path / "test" / "file.bin").exists()


def test_unreachable_host_says_so(monkeypatch, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again when the block ends: nothing listens there
    add_asset(monkeypatch, f"http://127.0.0.1:{port}/file.bin")
    with pytest.raises(DataError, match="cannot reach 127.0.0.1") as info:
        A.fetch("testfile", tmp_path, progress=False, timeout=5)
    assert "copy the file to" in info.value.fix


def test_size_mismatch_is_caught_before_downloading(monkeypatch, tmp_path, server):
    add_asset(monkeypatch, server.url("/good.bin"), size=len(PAYLOAD) + 1)
    with pytest.raises(DataError, match="offers 300,000 bytes, the manifest expects 300,001"):
        A.fetch("testfile", tmp_path, progress=False)


def test_url_and_mirror_overrides(monkeypatch, tmp_path, server):
    add_asset(monkeypatch, "https://example.invalid/some/dir/good.bin")
    assert A.fetch("testfile", tmp_path / "a", base_url=server.base + "/", progress=False).read_bytes() == PAYLOAD
    monkeypatch.setenv(A.ENV_MIRROR, server.base)
    assert A.fetch("testfile", tmp_path / "b", progress=False).read_bytes() == PAYLOAD
    monkeypatch.delenv(A.ENV_MIRROR)
    assert A.fetch("testfile", tmp_path / "c", url=server.url("/good.bin"), progress=False).read_bytes() == PAYLOAD


def test_real_manifest_entry_rejects_a_wrong_file(monkeypatch, tmp_path, server):
    with pytest.raises(DataError, match="git blob id .* expected 806479d0"):
        A.fetch("fid_stats_val2014", tmp_path, url=server.url("/good.bin"), progress=False)
    assert not A.asset_path("fid_stats_val2014", tmp_path).exists()


# ---------------------------------------------------------------- require, status, offline

def test_require_names_the_missing_asset_and_the_exact_fetch_command(tmp_path):
    with pytest.raises(DataError) as info:
        A.require("inception_fid", tmp_path)
    assert "'inception_fid' is missing" in info.value.problem and "\n" not in info.value.problem
    assert info.value.fix == ('python -c "import sccsdxl.assets as a; '
                              f"a.fetch('inception_fid', data_dir={str(tmp_path)!r})\"")


def test_fetch_command_omits_data_dir_when_it_resolves_the_same(monkeypatch, tmp_path):
    monkeypatch.setenv(A.ENV_DATA_DIR, str(tmp_path))
    assert A.fetch_command("clip_vit_b32_openai", tmp_path) == \
        'python -c "import sccsdxl.assets as a; a.fetch(\'clip_vit_b32_openai\')"'
    assert A.fetch_command("sdxl_fp16") == 'python -c "import sccsdxl.assets as a; a.fetch_sdxl(\'fp16\')"'


def test_hand_copied_file_is_verified_once_and_a_wrong_one_set_aside(monkeypatch, tmp_path, server):
    add_asset(monkeypatch, server.url("/good.bin"))
    dest = tmp_path / "test" / "file.bin"
    dest.parent.mkdir(parents=True)
    dest.write_bytes(PAYLOAD)
    assert A.require("testfile", tmp_path) == dest and A._sidecar(dest).is_file()
    A._sidecar(dest).unlink()
    dest.write_bytes(OTHER)
    with pytest.raises(DataError, match="not usable"):
        A.require("testfile", tmp_path)
    assert A.fetch("testfile", tmp_path, progress=False).read_bytes() == PAYLOAD
    kept = [p for p in dest.parent.iterdir() if ".invalid-" in p.name]
    assert len(kept) == 1 and kept[0].read_bytes() == OTHER  # never deleted


def test_offline_mode_reports_and_refuses_to_download(monkeypatch, tmp_path, server):
    add_asset(monkeypatch, server.url("/good.bin"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="offline mode") as info:
        A.fetch("testfile", tmp_path, progress=False)
    assert A.fetch_command("testfile", tmp_path) in info.value.fix
    with pytest.raises(ModelError, match="offline mode") as info:
        A.fetch_sdxl("fp16", tmp_path, progress=False)
    assert "fetch_sdxl('fp16'" in info.value.fix
    table = A.status(tmp_path, "fp16", "hf")
    assert set(table["state"]) == {"missing"}
    for _, row in table.iterrows():
        assert row["fetch"].startswith('python -c "import sccsdxl.assets as a; a.fetch')
    results = A.fetch_requested(["testfile", "sdxl"], tmp_path, progress=False)
    assert [r["result"] for r in results] == ["failed", "failed"]
    with pytest.raises(DataError, match="could not fetch testfile, sdxl"):
        A.raise_if_failed(results)


def test_status_shows_present_assets_without_a_command(monkeypatch, tmp_path, server):
    add_asset(monkeypatch, server.url("/good.bin"))
    A.fetch("testfile", tmp_path, progress=False)
    row = A.status(tmp_path, None).set_index("asset").loc["testfile"]
    assert row["state"] == "present" and row["fetch"] == "" and row["size"] == len(PAYLOAD)


def test_missing_bytes_counts_what_is_still_to_download(tmp_path):
    assert A.missing_bytes(tmp_path, "fp16") == sum(a.approx_bytes for a in A.MANIFEST.values()) + A.sdxl_bytes("fp16")
    assert A.sdxl_bytes("fp32") == 2 * A.sdxl_bytes("fp16") == A.sdxl_bytes("bf16")


# ---------------------------------------------------------------- SDXL from Hugging Face

def test_sdxl_files_per_dtype():
    fp16, fp32 = A.sdxl_files("fp16"), A.sdxl_files("fp32")
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in fp16 and "unet/diffusion_pytorch_model.safetensors" in fp32
    assert not [f for f in fp32 if ".fp16." in f] and A.sdxl_files("bf16") == fp32
    assert "tokenizer_2/vocab.json" in fp16 and "scheduler/scheduler_config.json" in fp16
    with pytest.raises(ParameterError):
        A.sdxl_files("int8")


def test_fetch_sdxl_through_a_local_hub_endpoint(tmp_path, server):
    for name in A.sdxl_files("fp16"):
        server.files[SDXL_PREFIX + name] = name.encode() * 10
    with pytest.raises(ModelError, match="SDXL weights \\(fp16\\) are missing") as info:
        A.require_sdxl("fp16", tmp_path)
    assert "fetch_sdxl('fp16'" in info.value.fix
    snapshot = A.fetch_sdxl("fp16", tmp_path, endpoint=server.base, progress=False)
    assert (snapshot / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert snapshot.is_relative_to(A.hf_cache_dir(tmp_path))
    assert A.require_sdxl("fp16", tmp_path) == snapshot
    assert A.sdxl_status("fp32", tmp_path)["missing"] == [f for f in A.sdxl_files("fp32") if f not in A.sdxl_files("fp16")]


def test_fetch_sdxl_failure_is_one_clear_message(tmp_path, server):
    with pytest.raises(ModelError, match="could not download model_index.json"):
        A.fetch_sdxl("fp32", tmp_path / "x", endpoint=server.base + "/nohub", progress=False)


# ---------------------------------------------------------------- content checks

def test_hashes_and_published_prefixes(tmp_path):
    path = tmp_path / "hello"
    path.write_bytes(b"hello\n")
    assert A.hash_file(path)["git_blob_sha1"] == "ce013625030ba8dba906f756967f9e9ca394464a"  # git hash-object
    asset = A.Asset("x", "x", "", "", "", 0, sha256_prefix="5891b5b5")
    assert A.verify_file(asset, path)["sha256"].startswith("5891b5b5")
    with pytest.raises(DataError, match="start with 00000000"):
        A.verify_file(A.Asset("x", "x", "", "", "", 0, sha256_prefix="00000000"), path)


def test_clip_check_reads_the_safetensors_header(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    good, wrong = tmp_path / "good.safetensors", tmp_path / "wrong.safetensors"
    save_file({"visual.conv1.weight": torch.zeros(768, 3, 32, 32, dtype=torch.float16)}, str(good))
    save_file({"visual.conv1.weight": torch.zeros(8, 3, 32, 32, dtype=torch.float16)}, str(wrong))
    A.check_clip_safetensors(good)
    with pytest.raises(ValueError, match="expected \\[768, 3, 32, 32\\]"):
        A.check_clip_safetensors(wrong)
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated"):
        A.check_clip_safetensors(truncated)


def test_inception_and_fid_stats_checks(tmp_path):
    torch = pytest.importorskip("torch")
    pth = tmp_path / "inception.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(32, 3, 3, 3),
                "fc.weight": torch.zeros(1008, 2048, dtype=torch.float16)}, pth)
    A.check_inception_state_dict(pth)
    torch.save({"fc.weight": torch.zeros(1000, 2048)}, pth)
    with pytest.raises(ValueError, match="FID Inception"):
        A.check_inception_state_dict(pth)
    npz = tmp_path / "stats.npz"
    np.savez_compressed(npz, mu=np.zeros(2048), sigma=np.zeros((2048, 2048)))
    A.check_fid_stats(npz)
    np.savez(npz, mu=np.zeros(3))
    with pytest.raises(ValueError, match="expected mu"):
        A.check_fid_stats(npz)


# ---------------------------------------------------------------- captions from the COCO annotations

def synthetic_annotations(n_images: int = 12) -> dict:
    """Several captions per image, ids out of order, one caption with a newline."""
    images = [{"id": 1000 + i, "file_name": f"COCO_val2014_{1000 + i:012d}.jpg", "height": 480, "width": 640 + i,
               "coco_url": f"http://images.cocodataset.org/val2014/COCO_val2014_{1000 + i:012d}.jpg",
               "license": 1, "date_captured": "", "flickr_url": ""} for i in range(n_images)]
    annotations, ann_id = [], 500
    for rep in range(3):
        for i in reversed(range(n_images)):
            ann_id += 7
            text = f" image {i} caption {rep}\n" if (i, rep) == (3, 0) else f"image {i} caption {rep}"
            annotations.append({"image_id": 1000 + i, "id": ann_id, "caption": text})
    return {"images": images, "annotations": annotations}


def write_annotations_zip(path: Path, data: dict) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(A.COCO_CAPTIONS_MEMBER, json.dumps(data))
    return path


def test_derived_captions_follow_the_reference_recipe():
    data = synthetic_annotations()
    table = A.derive_captions(data, max_images=5000)
    assert list(table.columns) == A.CAPTION_COLUMNS and len(table) == 12
    assert table["image_id"].is_unique and table["id"].is_monotonic_increasing
    assert set(table["caption"]) == {f"image {i} caption 0" for i in range(12)}  # first caption in file order
    assert table.loc[table["image_id"] == 1003, "caption"].item() == "image 3 caption 0"  # newline and spaces gone
    assert (table["width"] == table["image_id"] - 1000 + 640).all()
    subset = A.derive_captions(data, max_images=5)
    assert len(subset) == 5 and set(subset["id"]) <= set(table["id"])
    # pinned: what the reference tools/coco.py picks from this input (checked once by running its steps verbatim)
    assert subset["id"].tolist() == [507, 521, 542, 563, 577]
    assert A.derive_captions(data, max_images=5, seed=1)["id"].tolist() != subset["id"].tolist()


def test_caption_files_from_a_zip_with_subsets_and_no_overwrite(tmp_path):
    data = synthetic_annotations()
    archive = write_annotations_zip(tmp_path / "annotations.zip", data)
    A.check_coco_zip(archive)
    assert A.read_coco_captions(archive) == data
    result = A.derive_caption_files(tmp_path / "data", sizes=(5, 8), annotations=archive)
    assert result["check"] == {"rows": 12} and result["subsets"][5]["rows"] == 5
    small = Path(result["subsets"][5]["path"])
    assert small.name == "captions_size5.tsv" and len(small.read_text().splitlines()) == 6
    A.derive_caption_files(tmp_path / "data", sizes=(5,), annotations=archive)
    assert not list(small.parent.glob("*.bak"))  # same content: left alone
    small.write_text("edited by hand\n")
    A.derive_caption_files(tmp_path / "data", sizes=(5,), annotations=archive)
    backups = list(small.parent.glob("captions_size5.tsv.*.bak"))
    assert len(backups) == 1 and backups[0].read_text() == "edited by hand\n"


def test_coco_zip_check_needs_the_captions_member(tmp_path):
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("annotations/instances_val2014.json", "{}")
    with pytest.raises(ValueError, match="captions_val2014.json"):
        A.check_coco_zip(archive)


def test_comparison_with_the_shipped_caption_file():
    from sccsdxl.data import load_captions

    shipped = load_captions()
    assert A.compare_with_shipped(shipped) == {"byte_identical": True, "same_ids_in_order": True,
                                               "captions_differing": 0, "rows": 5000}
    edited = shipped.copy()
    edited.loc[3, "caption"] = "something else"
    result = A.compare_with_shipped(edited)
    assert not result["byte_identical"] and result["captions_differing"] == 1
    assert A.subset_overlap(shipped.iloc[:50]) == {"rows": 50, "in_first_n_rows": 50}


# ---------------------------------------------------------------- MLCommons checkpoint

def make_mlcommons_tree(root: Path, skip: str = "") -> Path:
    for name in A.MLCOMMONS_FILES:
        if name != skip:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text("{}")
    return root


def test_mlcommons_checkpoint_layout_is_validated(tmp_path):
    root = make_mlcommons_tree(tmp_path / "download" / "stable_diffusion_fp16")
    found = A.check_mlcommons_checkpoint(tmp_path / "download")  # the parent of the unpacked archive works too
    assert found["root"] == root and found["dtype"] == "fp16"
    with pytest.raises(ModelError, match="md5 mismatch .*unet"):
        A.check_mlcommons_checkpoint(root, verify_md5=True)
    broken = make_mlcommons_tree(tmp_path / "broken", skip="checkpoint_pipe/vae/diffusion_pytorch_model.safetensors")
    with pytest.raises(ModelError, match="missing checkpoint_pipe/vae") as info:
        A.check_mlcommons_checkpoint(broken)
    assert info.value.fix.startswith("download it again: mlcr get,ml-model,sdxl,_fp16,_r2-downloader")
    row = A.status(tmp_path, "fp16", "mlcommons", str(tmp_path / "nowhere")).iloc[0]
    assert row["asset"] == "mlcommons_checkpoint" and row["state"] == "missing" and "mlcr" in row["fetch"]
    assert A.status(tmp_path, "fp16", "mlcommons", str(root)).iloc[0]["state"] == "present"


# ---------------------------------------------------------------- the fixed latent

def test_latent_preview():
    from sccsdxl.data import load_latents

    latents = load_latents()
    stats = A.latent_stats(latents)
    assert stats["shape"] == [1, 4, 128, 128] and stats["dtype"] == "float32"
    assert abs(stats["mean"]) < 0.05 and 0.9 < stats["std"] < 1.1 and len(stats["channel_std"]) == 4
    import matplotlib

    matplotlib.use("Agg")
    fig = A.latent_channels_figure(latents)
    assert len(fig.axes) == 5  # 4 channels + colorbar
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_open_clip_arguments_point_at_the_local_file(monkeypatch, tmp_path):
    with pytest.raises(DataError, match="clip_vit_b32_openai"):
        A.open_clip_arguments(tmp_path)
    monkeypatch.setattr(A, "require", lambda name, d=None: tmp_path / "w.safetensors")
    assert A.open_clip_arguments(tmp_path) == {"model_name": "ViT-B-32", "pretrained": str(tmp_path / "w.safetensors"),
                                               "force_quick_gelu": True}


def test_present_asset_in_a_read_only_data_dir_needs_no_writes(monkeypatch, tmp_path, server):
    add_asset(monkeypatch, server.url("/good.bin"))
    path = A.fetch("testfile", tmp_path, progress=False)

    def refuse(*args, **kwargs):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(Path, "mkdir", refuse)
    monkeypatch.setattr(Path, "write_text", refuse)
    assert A.fetch("testfile", tmp_path, progress=False) == path
    assert A.require("testfile", tmp_path) == path
