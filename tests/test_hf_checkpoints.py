"""tracker.hf_checkpoints: registry, cache, checked downloads from a local stand-in for the hub.

Nothing here reaches the internet: a ThreadingHTTPServer on 127.0.0.1 answers
``/<owner>/<name>/resolve/<revision>/<file>`` like the Hugging Face Hub (an
``ETag`` holding the sha256 of LFS files and a git sha1 for small files, or a
302 to a "CDN" path carrying ``X-Linked-Etag`` / ``X-Linked-Size``), and the
registry entry under test is pointed at a tiny repository it serves. The
server of tests/test_checkpoints.py serves Meta's flat layout without these
headers, hence this one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tracker.errors import CheckpointError, TrackerError
from tracker.hf_checkpoints import (
    HF_CHECKPOINTS,
    HFCheckpointInfo,
    hf_checkpoint_dir,
    hf_checkpoint_info,
    offline_reason,
    resolve_hf_checkpoint,
)

pytestmark = pytest.mark.network

NAME = "edgetam"
REPO = "tiny-org/tiny-model"
FILES = ("config.json", "processor_config.json", "model.safetensors")
HINT = (
    "download config.json, processor_config.json, model.safetensors of tiny-org/tiny-model (revision main) "
    "from https://huggingface.co/tiny-org/tiny-model into {dir}, or pass --checkpoint DIR to a folder holding them"
)


class _Hub(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, files: dict[str, bytes]) -> None:
        super().__init__(("127.0.0.1", 0), _HubHandler)
        self.files = dict(files)  # "owner/name/resolve/rev/file" -> bytes
        self.requests: list[tuple[str, str | None]] = []  # (host:path, Authorization)
        self.truncate: dict[str, int] = {}  # file name -> bytes actually sent
        self.etag_override: dict[str, str] = {}  # file name -> ETag header sent
        self.status: int | None = None  # answer every hub request with this error status
        self.gated_code = False  # add X-Error-Code: GatedRepo to errors
        self.via_cdn = False  # LFS files: 302 to http://localhost:<port>/cdn/<sha>
        self.lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _HubHandler(BaseHTTPRequestHandler):
    server: _Hub

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        with self.server.lock:
            self.server.requests.append((f"{self.headers.get('Host')}{self.path}", self.headers.get("Authorization")))
        if self.path.startswith("/cdn/"):
            sha = self.path.rsplit("/", 1)[1]
            data = next((d for d in self.server.files.values() if hashlib.sha256(d).hexdigest() == sha), None)
            if data is None:
                self.send_error(404)
                return
            name = next(k for k, d in self.server.files.items() if d is data).rsplit("/", 1)[1]
            self._send(data, name, etag='"cdn-object-1"')  # the CDN's own tag: not a sha256
            return
        if self.server.status is not None:
            self.send_response(self.server.status)
            if self.server.gated_code:
                self.send_header("X-Error-Code", "GatedRepo")
            self.send_header("Content-Length", "0")
            self.send_header("Connection", "close")
            self.end_headers()
            return
        key = self.path.lstrip("/")
        if key not in self.server.files:
            self.send_error(404)
            return
        data = self.server.files[key]
        name = key.rsplit("/", 1)[1]
        lfs = name.endswith(".safetensors")
        etag = f'"{hashlib.sha256(data).hexdigest()}"' if lfs else f'"{hashlib.sha1(data).hexdigest()}"'
        etag = self.server.etag_override.get(name, etag)
        if lfs and self.server.via_cdn:
            self.send_response(302)
            cdn = f"http://localhost:{self.server.server_address[1]}/cdn/{hashlib.sha256(data).hexdigest()}"
            self.send_header("Location", cdn)  # another host name for the same server
            self.send_header("X-Linked-Etag", etag)
            self.send_header("X-Linked-Size", str(len(data)))
            self.send_header("X-Repo-Commit", "0" * 40)
            self.send_header("Content-Length", "0")
            self.send_header("Connection", "close")
            self.end_headers()
            return
        self._send(data, name, etag=etag)

    def _send(self, data: bytes, name: str, *, etag: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("ETag", etag)
        self.send_header("Connection", "close")
        self.end_headers()
        cut = self.server.truncate.get(name)
        self.wfile.write(data if cut is None else data[:cut])
        self.close_connection = True

    def log_message(self, format: str, *args: object) -> None:  # keep pytest output clean
        pass


def _weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"encoder.weight": torch.randn(16, 8, generator=g), "encoder.bias": torch.randn(16, generator=g)}


def _repo_files(tmp: Path) -> dict[str, bytes]:
    save_file(_weights(), tmp / "model.safetensors")
    return {
        "config.json": json.dumps({"model_type": "tiny", "hidden_size": 16}).encode(),
        "processor_config.json": json.dumps({"size": {"height": 64, "width": 64}}).encode(),
        "model.safetensors": (tmp / "model.safetensors").read_bytes(),
    }


def _serve(files: dict[str, bytes], repo: str = REPO) -> Iterator[_Hub]:
    hub = _Hub({f"{repo}/resolve/main/{name}": data for name, data in files.items()})
    thread = threading.Thread(target=hub.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        hub.shutdown()
        hub.server_close()
        thread.join(timeout=5)


@pytest.fixture
def repo_files(tmp_path: Path) -> dict[str, bytes]:
    d = tmp_path / "src"
    d.mkdir()
    return _repo_files(d)


@pytest.fixture
def hub(repo_files: dict[str, bytes]) -> Iterator[_Hub]:
    yield from _serve(repo_files)


@pytest.fixture
def tiny(monkeypatch: pytest.MonkeyPatch) -> HFCheckpointInfo:
    """Point the registry's edgetam entry at the tiny repository the hub serves."""
    info = dataclasses.replace(
        HF_CHECKPOINTS[NAME], repo_id=REPO, files=FILES, gated=False, page_url=f"https://huggingface.co/{REPO}"
    )
    monkeypatch.setitem(HF_CHECKPOINTS, NAME, info)
    return info


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "cache"
    monkeypatch.setenv("SAM2_STREAM_CACHE", str(d))
    for key in ("HF_ENDPOINT", "HF_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(key, raising=False)
    return d


@pytest.fixture
def repo_dir(cache: Path) -> Path:
    return cache / "hf" / "tiny-org--tiny-model" / "main"


def _url(hub: _Hub, file: str) -> str:
    return f"{hub.endpoint}/{REPO}/resolve/main/{file}"


def _leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the registry ---------------------------------------------------------------------


def test_registry_names_official_repositories() -> None:
    assert list(HF_CHECKPOINTS) == ["edgetam", "sam3-tracker"]
    edgetam, sam3 = HF_CHECKPOINTS["edgetam"], HF_CHECKPOINTS["sam3-tracker"]
    assert (edgetam.repo_id, edgetam.revision, edgetam.gated) == ("yonigozlan/EdgeTAM-hf", "main", False)
    assert (sam3.repo_id, sam3.revision, sam3.gated) == ("facebook/sam3", "main", True)
    assert sam3.licence.startswith("SAM License") and "military" in sam3.licence
    assert edgetam.licence.startswith("Apache-2.0")
    for info in (edgetam, sam3):
        assert info.page_url == f"https://huggingface.co/{info.repo_id}"
        assert {"config.json", "model.safetensors"} <= set(info.files)
        assert info.file_url("config.json", "https://hub.example/") == (
            f"https://hub.example/{info.repo_id}/resolve/main/config.json"
        )
    assert hf_checkpoint_info("facebook/sam3") is sam3  # the repository id works as a name


def test_cache_layout(tmp_path: Path) -> None:
    info = dataclasses.replace(HF_CHECKPOINTS["sam3-tracker"], revision="refs/pr/1")
    assert hf_checkpoint_dir(info, tmp_path) == tmp_path / "hf" / "facebook--sam3" / "refs--pr--1"
    assert info.file_url("model.safetensors", "http://h") == (
        "http://h/facebook/sam3/resolve/refs%2Fpr%2F1/model.safetensors"
    )


def test_unknown_name() -> None:
    with pytest.raises(CheckpointError) as e:
        hf_checkpoint_info("edgetamm")
    assert isinstance(e.value, TrackerError)
    assert str(e.value) == (
        "unknown checkpoint name 'edgetamm'; use one of edgetam, sam3-tracker, "
        "or pass --checkpoint DIR to a Hugging Face model folder"
    )


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("repo_id", "no-owner", "HFCheckpointInfo 'edgetam': repo_id 'no-owner' is not 'owner/name'"),
        (
            "files",
            ("config.json", "../model.safetensors"),
            "HFCheckpointInfo 'edgetam': files ['../model.safetensors'] are not plain file names at the "
            "repository's top level",
        ),
        (
            "files",
            ("model.safetensors",),
            "HFCheckpointInfo 'edgetam': files must include config.json and a .safetensors file, got "
            "['model.safetensors']",
        ),
        ("revision", "../main", "HFCheckpointInfo 'edgetam': revision '../main' is not a branch, tag or commit"),
    ],
)
def test_bad_registry_entry_names_the_field(field: str, value: object, message: str) -> None:
    with pytest.raises(CheckpointError) as e:
        dataclasses.replace(HF_CHECKPOINTS["edgetam"], **{field: value})
    assert str(e.value) == message


# --- downloads ------------------------------------------------------------------------


def test_download_once_then_served_from_cache(
    hub: _Hub, tiny: HFCheckpointInfo, repo_dir: Path, repo_files: dict[str, bytes]
) -> None:
    path = resolve_hf_checkpoint(NAME, endpoint=hub.endpoint, progress=False, timeout=5)
    assert path == repo_dir
    assert {name: (path / name).read_bytes() for name in FILES} == repo_files
    assert _leftovers(path) == sorted(FILES)
    assert [p for p, _ in hub.requests] == [f"127.0.0.1:{hub.server_address[1]}/{REPO}/resolve/main/{f}" for f in FILES]

    hub.shutdown()
    hub.server_close()  # nothing listens any more: a cache hit needs no network
    assert resolve_hf_checkpoint(NAME, endpoint=hub.endpoint, progress=False, timeout=1) == path
    assert resolve_hf_checkpoint(NAME, download=False) == path


def test_endpoint_from_environment(
    hub: _Hub, tiny: HFCheckpointInfo, repo_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint + "/")
    assert resolve_hf_checkpoint(NAME, progress=False, timeout=5) == repo_dir
    assert len(hub.requests) == len(FILES)


def test_only_missing_files_are_fetched(
    hub: _Hub, tiny: HFCheckpointInfo, repo_dir: Path, repo_files: dict[str, bytes]
) -> None:
    repo_dir.mkdir(parents=True)
    (repo_dir / "config.json").write_bytes(repo_files["config.json"])
    resolve_hf_checkpoint(NAME, endpoint=hub.endpoint, progress=False, timeout=5)
    assert [p.rsplit("/", 1)[1] for p, _ in hub.requests] == ["processor_config.json", "model.safetensors"]


def test_body_cut_midway_leaves_no_file(
    hub: _Hub, tiny: HFCheckpointInfo, repo_dir: Path, repo_files: dict[str, bytes]
) -> None:
    hub.truncate["model.safetensors"] = 300
    url = _url(hub, "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        resolve_hf_checkpoint(NAME, endpoint=hub.endpoint, progress=False, timeout=5)
    size = len(repo_files["model.safetensors"])
    assert str(e.value) == (
        f"download of {url} is truncated: got 300 bytes, expected {size} bytes; nothing was saved. "
        "Run again to retry, or " + HINT.format(dir=repo_dir)
    )
    assert _leftovers(repo_dir) == ["config.json", "processor_config.json"]  # no model.safetensors, no .part


def test_wrong_sha256_is_refused(
    hub: _Hub, tiny: HFCheckpointInfo, repo_dir: Path, repo_files: dict[str, bytes]
) -> None:
    hub.etag_override["model.safetensors"] = '"' + "ab" * 32 + '"'
    url = _url(hub, "model.safetensors")
    actual = hashlib.sha256(repo_files["model.safetensors"]).hexdigest()
    with pytest.raises(CheckpointError) as e:
        resolve_hf_checkpoint(NAME, endpoint=hub.endpoint, progress=False, timeout=5)
    assert str(e.value) == (
        f"download of {url} has sha256 {actual}, expected {'ab' * 32}; nothing was saved. Run again to retry; "
        "if it fails again, " + HINT.format(dir=repo_dir)
    )
    assert "model.safetensors" not in _leftovers(repo_dir)


def test_weak_uppercase_etag_is_read_as_sha256(
    hub: _Hub, tiny: HFCheckpointInfo, repo_dir: Path, repo_files: dict[str, bytes]
) -> None:
    sha = hashlib.sha256(repo_files["model.safetensors"]).hexdigest()
    hub.etag_override["model.safetensors"] = f'W/"{sha.upper()}"'
    resolve_hf_checkpoint(NAME, endpoint=hub.endpoint, progress=False, timeout=5)
    hub.etag_override["model.safetensors"] = 'W/"' + "CD" * 32 + '"'
    (repo_dir / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=f"has sha256 {sha}, expected {'cd' * 32}"):
        resolve_hf_checkpoint(NAME, endpoint=hub.endpoint, progress=False, timeout=5)


def test_served_file_that_is_not_safetensors_is_refused(
    tiny: HFCheckpointInfo, repo_dir: Path, repo_files: dict[str, bytes]
) -> None:
    """An HTML error page with a 200 and no sha256 (a captive portal, a proxy) never reaches the cache."""
    files = {**repo_files, "model.safetensors": b"<html>" + b"x" * 100 + b"</html>"}
    for hub in _serve(files):
        hub.etag_override["model.safetensors"] = '"not-a-sha"'
        with pytest.raises(CheckpointError) as e:
            resolve_hf_checkpoint(NAME, endpoint=hub.endpoint, progress=False, timeout=5)
        assert str(e.value) == (
            f"download of {_url(hub, 'model.safetensors')} is not a readable safetensors file (Error while "
            "deserializing header: header too large); nothing was saved. Run again to retry; if it fails again, "
            + HINT.format(dir=repo_dir)
        )
    assert "model.safetensors" not in _leftovers(repo_dir)


def test_corrupt_cached_safetensors_is_fetched_again(
    hub: _Hub, tiny: HFCheckpointInfo, repo_dir: Path, repo_files: dict[str, bytes]
) -> None:
    repo_dir.mkdir(parents=True)
    for name, data in repo_files.items():
        (repo_dir / name).write_bytes(data)
    (repo_dir / "model.safetensors").write_bytes(repo_files["model.safetensors"][:-50])  # truncated
    assert resolve_hf_checkpoint(NAME, endpoint=hub.endpoint, progress=False, timeout=5) == repo_dir
    assert (repo_dir / "model.safetensors").read_bytes() == repo_files["model.safetensors"]
    assert [p.rsplit("/", 1)[1] for p, _ in hub.requests] == ["model.safetensors"]


def test_corrupt_cached_files_with_downloads_off(
    tiny: HFCheckpointInfo, repo_dir: Path, repo_files: dict[str, bytes]
) -> None:
    repo_dir.mkdir(parents=True)
    (repo_dir / "config.json").write_text('{"model_type": ')
    (repo_dir / "model.safetensors").write_bytes(repo_files["model.safetensors"][:-50])
    with pytest.raises(CheckpointError) as e:
        resolve_hf_checkpoint(NAME, download=False)
    assert str(e.value) == (
        f"checkpoint edgetam (tiny-org/tiny-model) is not complete in {repo_dir} and downloading is off: "
        "config.json is not valid JSON (Expecting value at line 1 column 16); processor_config.json is missing; "
        "model.safetensors is not a readable safetensors file (Error while deserializing header: incomplete "
        "metadata, file not fully covered); " + HINT.format(dir=repo_dir)
    )
    assert (repo_dir / "model.safetensors").exists()  # not ours to delete when downloads are off


@pytest.mark.parametrize(
    ("key", "value"), [("HF_HUB_OFFLINE", "1"), ("HF_HUB_OFFLINE", "true"), ("TRANSFORMERS_OFFLINE", "YES")]
)
def test_offline_environment_refuses_to_download(
    hub: _Hub, tiny: HFCheckpointInfo, repo_dir: Path, monkeypatch: pytest.MonkeyPatch, key: str, value: str
) -> None:
    monkeypatch.setenv(key, value)
    assert offline_reason() == f"{key}={value}"
    with pytest.raises(CheckpointError) as e:
        resolve_hf_checkpoint(NAME, endpoint=hub.endpoint, progress=False, timeout=5)
    assert str(e.value) == (
        f"checkpoint edgetam (tiny-org/tiny-model) is not complete in {repo_dir} and downloading is off "
        f"({key}={value}): config.json is missing; processor_config.json is missing; model.safetensors is missing; "
        + HINT.format(dir=repo_dir)
    )
    assert hub.requests == []


def test_offline_environment_uses_a_complete_cache(
    tiny: HFCheckpointInfo, repo_dir: Path, repo_files: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    repo_dir.mkdir(parents=True)
    for name, data in repo_files.items():
        (repo_dir / name).write_bytes(data)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_hf_checkpoint(NAME, endpoint=f"http://127.0.0.1:{_free_port()}") == repo_dir


def test_offline_false_values_allow_downloads(
    hub: _Hub, tiny: HFCheckpointInfo, repo_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "")
    assert offline_reason() is None
    assert resolve_hf_checkpoint(NAME, endpoint=hub.endpoint, progress=False, timeout=5) == repo_dir


def test_gated_repository_without_token_explains_the_licence(
    hub: _Hub, tiny: HFCheckpointInfo, repo_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(HF_CHECKPOINTS, NAME, dataclasses.replace(tiny, gated=True))
    hub.status = 401
    with pytest.raises(CheckpointError) as e:
        resolve_hf_checkpoint(NAME, endpoint=hub.endpoint, progress=False, timeout=5)
    assert str(e.value) == (
        f"cannot download {_url(hub, 'config.json')}: HTTP 401 Unauthorized: tiny-org/tiny-model is gated and "
        "HF_TOKEN is not set. Accept its licence on https://huggingface.co/tiny-org/tiny-model while logged in, "
        "create an access token at https://huggingface.co/settings/tokens and set HF_TOKEN to it; or "
        + HINT.format(dir=repo_dir)
    )
    assert hub.requests[0][1] is None
    assert _leftovers(repo_dir) == []


def test_gated_repository_with_refused_token(
    hub: _Hub, tiny: HFCheckpointInfo, repo_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The registry says not gated, but the hub's X-Error-Code does: its word wins."""
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    hub.status, hub.gated_code = 403, True
    with pytest.raises(CheckpointError) as e:
        resolve_hf_checkpoint(NAME, endpoint=hub.endpoint, progress=False, timeout=5)
    assert str(e.value) == (
        f"cannot download {_url(hub, 'config.json')}: HTTP 403 Forbidden: tiny-org/tiny-model is gated and the "
        "token in HF_TOKEN has no access to it (licence not accepted yet, request pending, or another account's "
        "token). Accept its licence on https://huggingface.co/tiny-org/tiny-model with the account of that token; "
        "or " + HINT.format(dir=repo_dir)
    )
    assert hub.requests[0][1] == "Bearer hf_test_token"


def test_private_or_missing_repository(hub: _Hub, tiny: HFCheckpointInfo, repo_dir: Path) -> None:
    hub.status = 401
    with pytest.raises(CheckpointError) as e:
        resolve_hf_checkpoint(NAME, endpoint=hub.endpoint, progress=False, timeout=5)
    assert str(e.value) == (
        f"cannot download {_url(hub, 'config.json')}: HTTP 401 Unauthorized: the hub refuses tiny-org/tiny-model "
        "(private or not found; HF_TOKEN is not set); check the repository id (or HF_ENDPOINT), set HF_TOKEN if "
        "it is private, or " + HINT.format(dir=repo_dir)
    )


def test_missing_file_on_the_hub(hub: _Hub, tiny: HFCheckpointInfo, repo_dir: Path) -> None:
    del hub.files[f"{REPO}/resolve/main/processor_config.json"]
    with pytest.raises(CheckpointError) as e:
        resolve_hf_checkpoint(NAME, endpoint=hub.endpoint, progress=False, timeout=5)
    assert str(e.value) == (
        f"cannot download {_url(hub, 'processor_config.json')}: HTTP 404 Not Found; " + HINT.format(dir=repo_dir)
    )


def test_hub_down_names_url_and_folder(tiny: HFCheckpointInfo, repo_dir: Path) -> None:
    endpoint = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(CheckpointError) as e:
        resolve_hf_checkpoint(NAME, endpoint=endpoint, progress=False, timeout=5)
    assert str(e.value) == (
        f"cannot download {endpoint}/{REPO}/resolve/main/config.json: connection refused; " + HINT.format(dir=repo_dir)
    )


def test_redirect_to_cdn_checks_linked_etag_and_keeps_the_token_home(
    hub: _Hub, tiny: HFCheckpointInfo, repo_dir: Path, repo_files: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    hub.via_cdn = True
    resolve_hf_checkpoint(NAME, endpoint=hub.endpoint, progress=False, timeout=5)
    assert (repo_dir / "model.safetensors").read_bytes() == repo_files["model.safetensors"]
    port = hub.server_address[1]
    sha = hashlib.sha256(repo_files["model.safetensors"]).hexdigest()
    assert hub.requests[-2:] == [
        (f"127.0.0.1:{port}/{REPO}/resolve/main/model.safetensors", "Bearer hf_test_token"),
        (f"localhost:{port}/cdn/{sha}", None),  # another host: no credentials
    ]

    (repo_dir / "model.safetensors").unlink()
    hub.etag_override["model.safetensors"] = '"' + "ef" * 32 + '"'  # the hub's X-Linked-Etag, not the CDN's ETag
    with pytest.raises(CheckpointError, match=f"has sha256 {sha}, expected {'ef' * 32}; nothing was saved"):
        resolve_hf_checkpoint(NAME, endpoint=hub.endpoint, progress=False, timeout=5)


def test_concurrent_resolves_end_with_one_valid_set(
    hub: _Hub, tiny: HFCheckpointInfo, repo_dir: Path, repo_files: dict[str, bytes]
) -> None:
    results: list[Path | BaseException] = []

    def fetch() -> None:
        try:
            results.append(resolve_hf_checkpoint(NAME, endpoint=hub.endpoint, progress=False, timeout=5))
        except BaseException as e:  # reported below
            results.append(e)

    threads = [threading.Thread(target=fetch) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert results == [repo_dir] * 3
    assert {name: (repo_dir / name).read_bytes() for name in FILES} == repo_files
    assert _leftovers(repo_dir) == sorted(FILES)


# --- local folders --------------------------------------------------------------------


def test_local_folder_is_returned_without_network(tmp_path: Path, repo_files: dict[str, bytes]) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "config.json").write_bytes(repo_files["config.json"])
    (folder / "model.safetensors").write_bytes(repo_files["model.safetensors"])
    assert resolve_hf_checkpoint(folder) == folder
    assert resolve_hf_checkpoint(str(folder), download=False) == folder


def test_local_folder_without_config(tmp_path: Path, repo_files: dict[str, bytes]) -> None:
    (tmp_path / "model.safetensors").write_bytes(repo_files["model.safetensors"])
    with pytest.raises(CheckpointError) as e:
        resolve_hf_checkpoint(tmp_path)
    assert str(e.value) == (
        f"checkpoint directory {tmp_path} has no config.json; pass --checkpoint DIR to a Hugging Face model "
        "folder (config.json and model.safetensors, as save_pretrained writes them)"
    )


def test_local_folder_without_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError) as e:
        resolve_hf_checkpoint(tmp_path)
    assert str(e.value) == (
        f"checkpoint directory {tmp_path} has config.json but no weights (*.safetensors or pytorch_model.bin); "
        "copy the model's weight files into it"
    )


def test_local_folder_with_corrupt_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(CheckpointError) as e:
        resolve_hf_checkpoint(tmp_path)
    assert str(e.value).startswith(
        f"checkpoint file {tmp_path / 'model.safetensors'} is not a readable safetensors file ("
    )
    assert str(e.value).endswith(
        "; replace it with the repository's file (download it again), or pass --checkpoint DIR to another folder"
    )


def test_local_path_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "edgetam-hf"
    with pytest.raises(CheckpointError) as e:
        resolve_hf_checkpoint(str(missing))
    assert str(e.value) == (
        f"checkpoint directory {missing} does not exist; pass --checkpoint DIR to an existing Hugging Face model "
        "folder (config.json and model.safetensors), or a model name (edgetam, sam3-tracker) to download it"
    )
    with pytest.raises(CheckpointError) as e:
        resolve_hf_checkpoint("sam3-trackr")
    assert str(e.value) == (
        "unknown checkpoint 'sam3-trackr': no such directory and not a model name; use one of edgetam, "
        "sam3-tracker, or pass --checkpoint DIR to a Hugging Face model folder"
    )
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"")
    with pytest.raises(CheckpointError) as e:
        resolve_hf_checkpoint(file)
    assert str(e.value) == (
        f"checkpoint path {file} is a file; pass --checkpoint DIR to the folder holding config.json and "
        "model.safetensors (as save_pretrained writes them)"
    )


# --- the library's own format round-trips ---------------------------------------------


def test_save_pretrained_download_and_from_pretrained(
    tmp_path: Path, tiny: HFCheckpointInfo, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What transformers writes, served by the hub, comes back through the cache and loads."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=32, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
        max_position_embeddings=16,
    )  # fmt: skip
    model = BertModel(config).eval()
    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    assert {"config.json", "model.safetensors"} <= set(_leftovers(saved))
    files = {name: (saved / name).read_bytes() for name in ("config.json", "model.safetensors")}
    monkeypatch.setitem(HF_CHECKPOINTS, NAME, dataclasses.replace(tiny, files=("config.json", "model.safetensors")))

    for hub in _serve(files):
        hub.via_cdn = True
        path = resolve_hf_checkpoint(NAME, endpoint=hub.endpoint, progress=False, timeout=5)
    loaded = BertModel.from_pretrained(path, local_files_only=True).eval()
    expected, actual = model.state_dict(), loaded.state_dict()
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)
    ids = torch.tensor([[1, 2, 3]])
    with torch.inference_mode():
        assert torch.equal(model(ids).last_hidden_state, loaded(ids).last_hidden_state)
