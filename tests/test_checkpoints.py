"""tracker.checkpoints: registry, cache, verified downloads from a local HTTP server.

Nothing here reaches the internet: a ThreadingHTTPServer on 127.0.0.1 serves a
small checkpoint in Meta's format under Meta's layout (``092824/<file>``), and the
registry entry for ``sam2.1-tiny`` is pointed at that file's real size and hash.
"""

from __future__ import annotations

import dataclasses
import hashlib
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from tracker import checkpoints as ck
from tracker.checkpoints import (
    CHECKPOINTS,
    CheckpointInfo,
    cache_dir,
    checkpoint_info,
    load_state_dict_file,
    resolve_checkpoint,
    save_checkpoint,
)
from tracker.errors import CheckpointError, TrackerError

pytestmark = pytest.mark.network

TINY = "sam2.1-tiny"
TINY_FILE = "sam2.1_hiera_tiny.pt"
HINT = (
    "download {url} and save it as {path}, or pass --checkpoint PATH, or add --random-weights 0 to try the "
    "pipeline without a checkpoint (random weights: meaningless masks)"
)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root = root
        self.requests: list[str] = []
        self.truncate_to: int | None = None  # send fewer bytes than Content-Length says
        self.lock = threading.Lock()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        with self.server.lock:
            self.server.requests.append(self.path)
        file = self.server.root / self.path.lstrip("/")
        if not file.is_file():
            self.send_error(404)
            return
        data = file.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.server.truncate_to is not None:
            data = data[: self.server.truncate_to]
        self.wfile.write(data)
        self.close_connection = True

    def log_message(self, format: str, *args: object) -> None:  # keep pytest output clean
        pass


def _weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "image_encoder.trunk.patch_embed.proj.weight": torch.randn(8, 3, 7, 7, generator=g),
        "image_encoder.trunk.patch_embed.proj.bias": torch.randn(8, generator=g),
        "sam_mask_decoder.iou_token.weight": torch.randn(1, 16, generator=g),
        "maskmem_tpos_enc": torch.randn(7, 1, 1, 4, generator=g),
    }


@pytest.fixture
def server(tmp_path: Path) -> Iterator[_Server]:
    root = tmp_path / "www"
    (root / "092824").mkdir(parents=True)
    torch.save({"model": _weights()}, root / "092824" / TINY_FILE)
    srv = _Server(root)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=5)


@pytest.fixture
def served_file(server: _Server) -> Path:
    return server.root / "092824" / TINY_FILE


@pytest.fixture
def tiny(served_file: Path, monkeypatch: pytest.MonkeyPatch) -> CheckpointInfo:
    """Point the registry's sam2.1-tiny at the served file's real size and hash."""
    data = served_file.read_bytes()
    info = dataclasses.replace(CHECKPOINTS[TINY], size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    monkeypatch.setitem(CHECKPOINTS, TINY, info)
    return info


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "cache"
    monkeypatch.setenv("SAM2_STREAM_CACHE", str(d))
    monkeypatch.delenv("SAM2_STREAM_CHECKPOINT_URL", raising=False)
    return d


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


# --- registry and cache location ---------------------------------------------------


def test_registry_matches_meta_urls_and_sam2_configs() -> None:
    import sam2

    pkg = Path(sam2.__file__).parent
    assert set(CHECKPOINTS) == {
        f"{v}-{s}" for v in ("sam2.1", "sam2") for s in ("tiny", "small", "base-plus", "large")
    }
    for name, info in CHECKPOINTS.items():
        assert info.name == name
        assert (pkg / info.config).is_file(), info.config
        assert info.url == f"https://dl.fbaipublicfiles.com/segment_anything_2/{info.relative_url}"
        assert info.url.endswith("/" + info.filename)
        assert info.sha256 is None  # Meta publishes none; never invented
    assert CHECKPOINTS["sam2.1-large"].url == (
        "https://dl.fbaipublicfiles.com/segment_anything_2/092824/sam2.1_hiera_large.pt"
    )
    assert CHECKPOINTS["sam2-small"].url == "https://dl.fbaipublicfiles.com/segment_anything_2/072824/sam2_hiera_small.pt"
    assert CHECKPOINTS["sam2.1-base-plus"].config == "configs/sam2.1/sam2.1_hiera_b+.yaml"
    assert [CHECKPOINTS[f"sam2.1-{s}"].size_bytes for s in ("tiny", "small", "base-plus", "large")] == [
        156_008_466,
        184_416_285,
        323_606_802,
        898_083_611,
    ]
    assert all(CHECKPOINTS[f"sam2-{s}"].size_bytes is None for s in ("tiny", "small", "base-plus", "large"))
    assert checkpoint_info("sam2.1-b+") is CHECKPOINTS["sam2.1-base-plus"]
    assert checkpoint_info("sam2-b+") is CHECKPOINTS["sam2-base-plus"]


def test_unknown_name_says_what_exists() -> None:
    with pytest.raises(CheckpointError) as e:
        checkpoint_info("sam3-huge")
    assert str(e.value) == (
        "unknown checkpoint name 'sam3-huge'; use one of sam2.1-tiny, sam2.1-small, sam2.1-base-plus, "
        "sam2.1-large, sam2-tiny, sam2-small, sam2-base-plus, sam2-large, or pass --checkpoint PATH to a .pt file"
    )
    assert isinstance(e.value, TrackerError)


def test_cache_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SAM2_STREAM_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_dir() == tmp_path / "home" / ".cache" / "sam2-stream"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "sam2-stream"
    monkeypatch.setenv("SAM2_STREAM_CACHE", str(tmp_path / "own"))
    assert cache_dir() == tmp_path / "own"


# --- downloads ------------------------------------------------------------------------


def test_download_once_then_served_from_cache(
    server: _Server, served_file: Path, tiny: CheckpointInfo, cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = resolve_checkpoint(TINY, base_url=server.base_url + "/", progress=True)
    assert path == cache / TINY_FILE
    assert path.read_bytes() == served_file.read_bytes()
    assert server.requests == ["/092824/" + TINY_FILE]
    assert TINY_FILE in capsys.readouterr().err  # tqdm's bar names the file
    assert _leftovers(cache) == [TINY_FILE]

    again = resolve_checkpoint("sam2.1-tiny", base_url=server.base_url, progress=False)
    assert again == path
    assert len(server.requests) == 1  # valid cache: no network at all
    assert resolve_checkpoint(TINY, download=False) == path  # and no base_url needed

    state_dict = load_state_dict_file(path)
    expected = _weights()
    assert state_dict.keys() == expected.keys()
    assert all(torch.equal(state_dict[k], expected[k]) for k in expected)


def test_base_url_from_environment(
    server: _Server, tiny: CheckpointInfo, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SAM2_STREAM_CHECKPOINT_URL", server.base_url)
    assert ck.checkpoint_url(tiny) == f"{server.base_url}/092824/{TINY_FILE}"
    assert resolve_checkpoint(TINY, progress=False) == cache / TINY_FILE
    assert server.requests == ["/092824/" + TINY_FILE]


def test_explicit_cache_argument(server: _Server, tiny: CheckpointInfo, tmp_path: Path) -> None:
    own = tmp_path / "elsewhere"
    assert resolve_checkpoint(TINY, cache=own, base_url=server.base_url, progress=False) == own / TINY_FILE


def test_truncated_download_leaves_nothing(server: _Server, tiny: CheckpointInfo, cache: Path) -> None:
    assert tiny.size_bytes is not None
    server.truncate_to = tiny.size_bytes // 2  # Content-Length says the full size
    url = f"{server.base_url}/092824/{TINY_FILE}"
    path = cache / TINY_FILE
    with pytest.raises(CheckpointError) as e:
        resolve_checkpoint(TINY, base_url=server.base_url, progress=False, timeout=5)
    assert str(e.value) == (
        f"download of {url} is truncated: got {tiny.size_bytes // 2} bytes, expected {tiny.size_bytes} bytes; "
        f"nothing was saved. Run again to retry, or " + HINT.format(url=url, path=path)
    )
    assert _leftovers(cache) == []


def test_server_file_of_other_size_is_refused_before_download(
    server: _Server, served_file: Path, tiny: CheckpointInfo, cache: Path
) -> None:
    served_file.write_bytes(served_file.read_bytes()[:100])  # honest Content-Length, wrong file
    url = f"{server.base_url}/092824/{TINY_FILE}"
    with pytest.raises(CheckpointError) as e:
        resolve_checkpoint(TINY, base_url=server.base_url, progress=False, timeout=5)
    assert str(e.value) == (
        f"cannot download {url}: the server announces 100 bytes but {TINY_FILE} is {tiny.size_bytes} bytes; "
        f"nothing was saved. Check the URL (or SAM2_STREAM_CHECKPOINT_URL), or "
        + HINT.format(url=url, path=cache / TINY_FILE)
    )
    assert _leftovers(cache) == []


def test_truncated_download_detected_without_registry_size(
    server: _Server, tiny: CheckpointInfo, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Like the sam2 (2.0) entries, whose sizes are unknown: Content-Length still guards."""
    monkeypatch.setitem(CHECKPOINTS, TINY, dataclasses.replace(tiny, size_bytes=None, sha256=None))
    assert tiny.size_bytes is not None
    server.truncate_to = 1000
    url = f"{server.base_url}/092824/{TINY_FILE}"
    with pytest.raises(CheckpointError) as e:
        resolve_checkpoint(TINY, base_url=server.base_url, progress=False, timeout=5)
    assert str(e.value).startswith(
        f"download of {url} is truncated: got 1000 bytes, expected {tiny.size_bytes} bytes; nothing was saved."
    )
    assert _leftovers(cache) == []


def test_wrong_checksum_leaves_nothing(
    server: _Server, tiny: CheckpointInfo, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(CHECKPOINTS, TINY, dataclasses.replace(tiny, sha256="0" * 64))
    url = f"{server.base_url}/092824/{TINY_FILE}"
    with pytest.raises(CheckpointError) as e:
        resolve_checkpoint(TINY, base_url=server.base_url, progress=False, timeout=5)
    assert str(e.value) == (
        f"download of {url} has sha256 {tiny.sha256}, expected {'0' * 64}; nothing was saved. "
        f"Run again to retry; if it fails again, " + HINT.format(url=url, path=cache / TINY_FILE)
    )
    assert _leftovers(cache) == []


def test_truncated_cached_file_is_downloaded_again(
    server: _Server, served_file: Path, tiny: CheckpointInfo, cache: Path
) -> None:
    cache.mkdir()
    (cache / TINY_FILE).write_bytes(served_file.read_bytes()[:-10])
    path = resolve_checkpoint(TINY, base_url=server.base_url, progress=False)
    assert path.read_bytes() == served_file.read_bytes()
    assert len(server.requests) == 1
    assert _leftovers(cache) == [TINY_FILE]


def test_corrupt_cached_file_of_right_size_is_downloaded_again(
    server: _Server, served_file: Path, tiny: CheckpointInfo, cache: Path
) -> None:
    data = bytearray(served_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    cache.mkdir()
    (cache / TINY_FILE).write_bytes(bytes(data))
    path = resolve_checkpoint(TINY, base_url=server.base_url, progress=False)
    assert path.read_bytes() == served_file.read_bytes()
    assert len(server.requests) == 1


def test_truncated_cached_file_without_download_is_an_error(served_file: Path, tiny: CheckpointInfo, cache: Path) -> None:
    cache.mkdir()
    path = cache / TINY_FILE
    path.write_bytes(served_file.read_bytes()[:50])
    with pytest.raises(CheckpointError) as e:
        resolve_checkpoint(TINY, download=False)
    assert str(e.value) == (
        f"cached checkpoint {path} is 50 bytes, expected {tiny.size_bytes} bytes (truncated or corrupt) and "
        "downloading is off; delete it and run again with downloads allowed, or "
        + HINT.format(url=tiny.url, path=path)
    )
    assert path.exists()  # not ours to delete when downloads are off


def test_server_down_names_url_and_manual_path(tiny: CheckpointInfo, cache: Path) -> None:
    base = f"http://127.0.0.1:{_free_port()}"
    url = f"{base}/092824/{TINY_FILE}"
    with pytest.raises(CheckpointError) as e:
        resolve_checkpoint(TINY, base_url=base, progress=False, timeout=5)
    assert str(e.value) == (
        f"cannot download {url}: connection refused; " + HINT.format(url=url, path=cache / TINY_FILE)
    )
    assert _leftovers(cache) == []


def test_silent_server_times_out(tiny: CheckpointInfo, cache: Path) -> None:
    with socket.socket() as listener:  # accepts connections (kernel backlog), never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        base = f"http://127.0.0.1:{listener.getsockname()[1]}"
        url = f"{base}/092824/{TINY_FILE}"
        with pytest.raises(CheckpointError) as e:
            resolve_checkpoint(TINY, base_url=base, progress=False, timeout=0.3)
    assert str(e.value) == (
        f"cannot download {url}: no answer within 0.3 s; " + HINT.format(url=url, path=cache / TINY_FILE)
    )
    assert _leftovers(cache) == []


def test_missing_file_on_server(server: _Server, tiny: CheckpointInfo, cache: Path) -> None:
    base = server.base_url + "/mirror"
    url = f"{base}/092824/{TINY_FILE}"
    with pytest.raises(CheckpointError) as e:
        resolve_checkpoint(TINY, base_url=base, progress=False, timeout=5)
    assert str(e.value) == f"cannot download {url}: HTTP 404 Not Found; " + HINT.format(
        url=url, path=cache / TINY_FILE
    )


def test_download_off_and_not_cached(cache: Path) -> None:
    info = CHECKPOINTS["sam2.1-large"]
    with pytest.raises(CheckpointError) as e:
        resolve_checkpoint("sam2.1-large", download=False)
    assert str(e.value) == (
        "checkpoint sam2.1-large is not in the cache and downloading is off; "
        + HINT.format(url=info.url, path=cache / "sam2.1_hiera_large.pt")
    )


def test_concurrent_downloads_end_with_one_valid_file(
    server: _Server, served_file: Path, tiny: CheckpointInfo, cache: Path
) -> None:
    results: list[Path | BaseException] = []

    def fetch() -> None:
        try:
            results.append(resolve_checkpoint(TINY, base_url=server.base_url, progress=False, timeout=5))
        except BaseException as e:  # reported below
            results.append(e)

    threads = [threading.Thread(target=fetch) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert results == [cache / TINY_FILE] * 4
    assert (cache / TINY_FILE).read_bytes() == served_file.read_bytes()
    assert _leftovers(cache) == [TINY_FILE]


# --- local paths ----------------------------------------------------------------------


def test_local_path_is_returned_without_network(tmp_path: Path) -> None:
    path = save_checkpoint(_weights(), tmp_path / "mine.pt")
    assert resolve_checkpoint(path) == path
    assert resolve_checkpoint(str(path), download=False) == path


def test_local_path_not_found(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "weights.pt"
    with pytest.raises(CheckpointError) as e:
        resolve_checkpoint(str(path))
    assert str(e.value) == (
        f"checkpoint file {path} does not exist; pass --checkpoint PATH to an existing .pt file, or a model "
        "name (sam2.1-tiny, sam2.1-small, sam2.1-base-plus, sam2.1-large, sam2-tiny, sam2-small, "
        "sam2-base-plus, sam2-large) to download the official checkpoint"
    )


def test_misspelt_model_name() -> None:
    with pytest.raises(CheckpointError) as e:
        resolve_checkpoint("sam2.1-tinny")
    assert str(e.value) == (
        "unknown checkpoint 'sam2.1-tinny': no such file and not a model name; use one of sam2.1-tiny, "
        "sam2.1-small, sam2.1-base-plus, sam2.1-large, sam2-tiny, sam2-small, sam2-base-plus, sam2-large, "
        "or pass --checkpoint PATH to a .pt file"
    )


def test_local_path_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as e:
        resolve_checkpoint(tmp_path)
    assert str(e.value) == f"checkpoint path {tmp_path} is not a file; pass --checkpoint PATH to the .pt file itself"


def test_local_official_file_of_wrong_size(tmp_path: Path) -> None:
    path = tmp_path / "sam2.1_hiera_small.pt"
    path.write_bytes(b"\0" * 1234)
    info = CHECKPOINTS["sam2.1-small"]
    with pytest.raises(CheckpointError) as e:
        resolve_checkpoint(path)
    assert str(e.value) == (
        f"checkpoint file {path} is 1234 bytes but the official sam2.1_hiera_small.pt is 184416285 bytes "
        f"(truncated or a different file); download {info.url} again and save it as {path}, "
        "or pass the model name sam2.1-small to use the cached download"
    )


# --- reading and writing Meta's format ------------------------------------------------

NOT_READABLE = (
    "{path} is not a SAM 2 checkpoint: torch.load cannot read it (corrupt, truncated or not a PyTorch file); "
    "delete it and download it again, or pass --checkpoint PATH to a file in Meta's format {{'model': state_dict}}"
)


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    weights = _weights(3)
    path = save_checkpoint(weights, tmp_path / "sub" / "random.pt")
    assert _leftovers(path.parent) == ["random.pt"]
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert list(raw) == ["model"]
    loaded = load_state_dict_file(path)
    assert loaded.keys() == weights.keys()
    assert all(torch.equal(loaded[k], weights[k]) for k in weights)


def test_text_file_is_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "notes.pt"
    path.write_text("this is not a checkpoint\n")
    with pytest.raises(CheckpointError) as e:
        load_state_dict_file(path)
    assert str(e.value) == NOT_READABLE.format(path=path)


def test_truncated_zip_is_not_a_checkpoint(tmp_path: Path) -> None:
    path = save_checkpoint(_weights(), tmp_path / "cut.pt")
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(CheckpointError) as e:
        load_state_dict_file(path)
    assert str(e.value) == NOT_READABLE.format(path=path)


class _Arbitrary:
    """A pickled class: weights_only=True must refuse to import it."""


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"model": _Arbitrary()}, path)
    with pytest.raises(CheckpointError) as e:
        load_state_dict_file(path)
    assert str(e.value) == NOT_READABLE.format(path=path)


def test_bare_state_dict_gets_a_hint(tmp_path: Path) -> None:
    path = tmp_path / "bare.pt"
    torch.save(_weights(), path)
    with pytest.raises(CheckpointError) as e:
        load_state_dict_file(path)
    assert str(e.value) == (
        f"{path} is not a SAM 2 checkpoint: expected Meta's format {{'model': state_dict}}, found a bare "
        "state_dict (keys 'image_encoder.trunk.patch_embed.proj.bias', 'image_encoder.trunk.patch_embed.proj.weight', "
        "'maskmem_tpos_enc', ...); wrap it as {'model': state_dict}"
    )


def test_other_containers_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointError) as e:
        load_state_dict_file(path)
    assert str(e.value) == f"{path} is not a SAM 2 checkpoint: expected Meta's format {{'model': state_dict}}, found a list"

    path = tmp_path / "mixed.pt"
    torch.save({"model": {"w": torch.zeros(1), "step": 3}}, path)
    with pytest.raises(CheckpointError) as e:
        load_state_dict_file(path)
    assert str(e.value) == (
        f"{path} is not a SAM 2 checkpoint: its 'model' entry holds 1 non-tensor values (e.g. 'step'); "
        "pass --checkpoint PATH to a file in Meta's format {'model': state_dict}"
    )


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist; pass --checkpoint PATH"):
        load_state_dict_file(tmp_path / "gone.pt")
