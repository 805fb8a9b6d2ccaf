"""Meta's official SAM 2 / SAM 2.1 checkpoints: where they live, fetching, checking.

What lives here: the registry of official checkpoints (short name → file name,
URL, known size and hash, sam2 config), the local cache (``cache_dir()``),
:func:`resolve_checkpoint` which turns a model name or a path into a verified
local file (downloading it once when allowed), and reading/writing files in
Meta's format ``{"model": state_dict}``.
What does not: building models and fitting weights to them (``tracker.model``).

Downloads use only the standard library (``urllib``, through ``tracker.download``,
which ``tracker.hf_checkpoints`` shares): streamed to a temporary file in the
cache directory, checked (size against ``Content-Length`` and the registry, sha256
when the registry knows it), then moved into place with ``os.replace``. A reader therefore sees either no file or a complete one, and two
processes downloading at once both end with the same valid file, so no lock is
needed. Anything that fails leaves nothing behind and raises
:class:`~tracker.errors.CheckpointError` saying what to do next.

Tests point downloads at a local server with ``base_url=`` (or the environment
variable ``SAM2_STREAM_CHECKPOINT_URL``), which must serve the same relative
layout as Meta's host: ``{base_url}/092824/sam2.1_hiera_tiny.pt``.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from tracker.download import DEFAULT_TIMEOUT_S, announced_length, open_url, sha256_file, stream_to_file
from tracker.errors import CheckpointError

logger = logging.getLogger(__name__)

#: Meta's host; the registry's URLs are ``{OFFICIAL_BASE_URL}/{release}/{filename}``.
OFFICIAL_BASE_URL = "https://dl.fbaipublicfiles.com/segment_anything_2"
#: environment variable naming another host with the same layout (a mirror, a test server)
BASE_URL_ENV = "SAM2_STREAM_CHECKPOINT_URL"
#: environment variable naming the cache directory
CACHE_ENV = "SAM2_STREAM_CACHE"
#: the way on for someone with no checkpoint at all (no network, first run): every
#: command takes ``--random-weights SEED``
RANDOM_WEIGHTS_HINT = "or add --random-weights 0 to try the pipeline without a checkpoint (random weights: meaningless masks)"

#: a missing path with one of these endings (or a folder part) is reported as a missing file, not as a bad name
_WEIGHT_SUFFIXES = {".pt", ".pth", ".ckpt", ".bin", ".pkl", ".safetensors"}


@dataclass(frozen=True)
class CheckpointInfo:
    """One official checkpoint. ``size_bytes``/``sha256`` are None where not known.

    Unknown values are left None on purpose: verification checks only what is
    known, and an invented hash would reject every genuine download.
    """

    name: str
    filename: str
    url: str
    size_bytes: int | None
    sha256: str | None
    config: str

    @property
    def relative_url(self) -> str:
        """``{release}/{filename}``: the part of ``url`` a mirror must reproduce."""
        return "/".join(self.url.rsplit("/", 2)[-2:])


def _entry(name: str, release: str, filename: str, size_bytes: int | None, config: str) -> CheckpointInfo:
    return CheckpointInfo(
        name=name,
        filename=filename,
        url=f"{OFFICIAL_BASE_URL}/{release}/{filename}",
        size_bytes=size_bytes,
        sha256=None,  # Meta publishes no hashes; fill in only from a verified download
        config=config,
    )


#: short name → official checkpoint. A plain dict so tests (and users with their
#: own mirror of different files) can replace an entry, e.g. with
#: ``dataclasses.replace(CHECKPOINTS["sam2.1-tiny"], size_bytes=..., sha256=...)``.
CHECKPOINTS: dict[str, CheckpointInfo] = {
    info.name: info
    for info in (
        _entry("sam2.1-tiny", "092824", "sam2.1_hiera_tiny.pt", 156_008_466, "configs/sam2.1/sam2.1_hiera_t.yaml"),
        _entry("sam2.1-small", "092824", "sam2.1_hiera_small.pt", 184_416_285, "configs/sam2.1/sam2.1_hiera_s.yaml"),
        _entry(
            "sam2.1-base-plus", "092824", "sam2.1_hiera_base_plus.pt", 323_606_802, "configs/sam2.1/sam2.1_hiera_b+.yaml"
        ),
        _entry("sam2.1-large", "092824", "sam2.1_hiera_large.pt", 898_083_611, "configs/sam2.1/sam2.1_hiera_l.yaml"),
        _entry("sam2-tiny", "072824", "sam2_hiera_tiny.pt", None, "configs/sam2/sam2_hiera_t.yaml"),
        _entry("sam2-small", "072824", "sam2_hiera_small.pt", None, "configs/sam2/sam2_hiera_s.yaml"),
        _entry("sam2-base-plus", "072824", "sam2_hiera_base_plus.pt", None, "configs/sam2/sam2_hiera_b+.yaml"),
        _entry("sam2-large", "072824", "sam2_hiera_large.pt", None, "configs/sam2/sam2_hiera_l.yaml"),
    )
}
#: other spellings of the short names
CHECKPOINT_ALIASES: dict[str, str] = {"sam2.1-b+": "sam2.1-base-plus", "sam2-b+": "sam2-base-plus"}


def checkpoint_info(name: str) -> CheckpointInfo:
    """The registry entry for a short name or alias (``sam2.1-b+``)."""
    key = CHECKPOINT_ALIASES.get(name, name)
    if key not in CHECKPOINTS:
        raise CheckpointError(
            f"unknown checkpoint name {name!r}; use one of {', '.join(CHECKPOINTS)}, "
            "or pass --checkpoint PATH to a .pt file"
        )
    return CHECKPOINTS[key]


def cache_dir() -> Path:
    """Where official checkpoints are kept: ``$SAM2_STREAM_CACHE``, else
    ``$XDG_CACHE_HOME/sam2-stream``, else ``~/.cache/sam2-stream``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "sam2-stream"
    return Path.home() / ".cache" / "sam2-stream"


def checkpoint_url(info: CheckpointInfo, base_url: str | None = None) -> str:
    """The URL to fetch ``info`` from: Meta's, or the same layout under ``base_url``
    (default ``$SAM2_STREAM_CHECKPOINT_URL``)."""
    base = base_url or os.environ.get(BASE_URL_ENV)
    if not base:
        return info.url
    return f"{base.rstrip('/')}/{info.relative_url}"


def _manual_hint(url: str, path: Path) -> str:
    """What to do when the official file cannot be had: fetch it by hand, name another
    file, or (a newcomer without network) try everything else on random weights."""
    return f"download {url} and save it as {path}, or pass --checkpoint PATH, {RANDOM_WEIGHTS_HINT}"


def _cached_problem(path: Path, info: CheckpointInfo) -> str | None:
    """Why the cached file at ``path`` is not ``info``'s checkpoint, or None if it passes."""
    size = path.stat().st_size
    if info.size_bytes is not None and size != info.size_bytes:
        return f"is {size} bytes, expected {info.size_bytes} bytes (truncated or corrupt)"
    if info.sha256 is not None:
        digest = sha256_file(path)
        if digest != info.sha256:
            return f"has sha256 {digest}, expected {info.sha256} (corrupt)"
    return None


def _local_checkpoint(path: Path) -> Path:
    """A user-given file: it must exist; an official file name must have the official size."""
    if not path.exists():
        if path.suffix.lower() in _WEIGHT_SUFFIXES or len(path.parts) > 1:
            raise CheckpointError(
                f"checkpoint file {path} does not exist; pass --checkpoint PATH to an existing .pt file, "
                f"or a model name ({', '.join(CHECKPOINTS)}) to download the official checkpoint"
            )
        raise CheckpointError(
            f"unknown checkpoint {str(path)!r}: no such file and not a model name; use one of "
            f"{', '.join(CHECKPOINTS)}, or pass --checkpoint PATH to a .pt file"
        )
    if not path.is_file():
        raise CheckpointError(f"checkpoint path {path} is not a file; pass --checkpoint PATH to the .pt file itself")
    for info in CHECKPOINTS.values():
        if info.filename == path.name and info.size_bytes is not None:
            size = path.stat().st_size
            if size != info.size_bytes:
                raise CheckpointError(
                    f"checkpoint file {path} is {size} bytes but the official {info.filename} is "
                    f"{info.size_bytes} bytes (truncated or a different file); download {info.url} again "
                    f"and save it as {path}, or pass the model name {info.name} to use the cached download"
                )
    return path


def resolve_checkpoint(
    name_or_path: str | os.PathLike[str],
    *,
    cache: Path | None = None,
    download: bool = True,
    base_url: str | None = None,
    progress: bool = True,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> Path:
    """Turn a model name (``sam2.1-tiny``) or a file path into a checked local file.

    A path is returned as given after a light check (it exists; a file bearing an
    official file name has the official size). A model name is looked up in the
    cache: a valid cached file is returned without touching the network; an
    absent or invalid one is (re)downloaded when ``download`` is true.

    Args:
        name_or_path: short name or alias from :data:`CHECKPOINTS`, or a path.
        cache: directory of cached checkpoints (default :func:`cache_dir`).
        download: allow fetching; when false a missing/invalid cache entry is an error.
        base_url: another host with Meta's layout (default ``$SAM2_STREAM_CHECKPOINT_URL``).
        progress: show a tqdm progress bar while downloading.
        timeout: seconds to wait for the connection and for each read.

    Raises:
        CheckpointError: the file is missing, invalid, or cannot be fetched; the
            message says what to do next.
    """
    text = os.fspath(name_or_path)
    key = CHECKPOINT_ALIASES.get(text, text)
    if key not in CHECKPOINTS:
        return _local_checkpoint(Path(text).expanduser())

    info = CHECKPOINTS[key]
    path = (cache if cache is not None else cache_dir()) / info.filename
    url = checkpoint_url(info, base_url)
    if path.is_file():
        problem = _cached_problem(path, info)
        if problem is None:
            logger.debug("checkpoint %s: using cached %s", info.name, path)
            return path
        if not download:
            raise CheckpointError(
                f"cached checkpoint {path} {problem} and downloading is off; delete it and run again "
                f"with downloads allowed, or {_manual_hint(url, path)}"
            )
        logger.warning("cached checkpoint %s %s; deleting it and downloading again", path, problem)
        path.unlink(missing_ok=True)
    elif not download:
        raise CheckpointError(
            f"checkpoint {info.name} is not in the cache and downloading is off; {_manual_hint(url, path)}"
        )
    _download(info, url, path, progress=progress, timeout=timeout)
    return path


def _download(info: CheckpointInfo, url: str, path: Path, *, progress: bool, timeout: float) -> None:
    """Stream ``url`` into ``path`` atomically, checking size and hash on the way."""
    hint = _manual_hint(url, path)
    logger.info("downloading checkpoint %s from %s to %s", info.name, url, path)
    response = open_url(url, hint=hint, timeout=timeout)
    with response:
        announced = announced_length(response.headers)
        if announced is not None and info.size_bytes is not None and announced != info.size_bytes:
            raise CheckpointError(
                f"cannot download {url}: the server announces {announced} bytes but {info.filename} "
                f"is {info.size_bytes} bytes; nothing was saved. Check the URL (or {BASE_URL_ENV}), or {hint}"
            )
        received, actual_sha = stream_to_file(
            response,
            url,
            path,
            hint=hint,
            expected_size=info.size_bytes if info.size_bytes is not None else announced,
            expected_sha256=info.sha256,
            timeout=timeout,
            progress=progress,
        )
    logger.info("checkpoint %s saved to %s (%d bytes, sha256 %s)", info.name, path, received, actual_sha)


def _describe(obj: object) -> str:
    if isinstance(obj, Mapping):
        keys = sorted(str(k) for k in obj)
        shown = ", ".join(repr(k) for k in keys[:3]) + (", ..." if len(keys) > 3 else "")
        if keys and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return f"a bare state_dict (keys {shown}); wrap it as {{'model': state_dict}}"
        return f"a dict with keys [{shown}]"
    return f"a {type(obj).__name__}"


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a checkpoint in Meta's format and return its ``model`` state_dict (on CPU).

    Uses ``weights_only=True``: a checkpoint is data, and loading one must not
    run code from it.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint file {path} does not exist; pass --checkpoint PATH to an existing .pt file, "
            f"or a model name ({', '.join(CHECKPOINTS)}) to download the official checkpoint"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # zip/pickle/EOF errors differ by torch version and damage
        logger.debug("torch.load(%s) failed: %r", path, e)
        raise CheckpointError(
            f"{path} is not a SAM 2 checkpoint: torch.load cannot read it (corrupt, truncated or not a "
            "PyTorch file); delete it and download it again, or pass --checkpoint PATH to a file in "
            "Meta's format {'model': state_dict}"
        ) from e
    state_dict = obj.get("model") if isinstance(obj, Mapping) else None
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(
            f"{path} is not a SAM 2 checkpoint: expected Meta's format {{'model': state_dict}}, "
            f"found {_describe(obj)}"
        )
    bad = [k for k, v in state_dict.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(
            f"{path} is not a SAM 2 checkpoint: its 'model' entry holds {len(bad)} non-tensor values "
            f"(e.g. {bad[0]!r}); pass --checkpoint PATH to a file in Meta's format {{'model': state_dict}}"
        )
    return dict(state_dict)


def save_checkpoint(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike[str]) -> Path:
    """Write ``state_dict`` in Meta's format ``{"model": state_dict}``, atomically.

    For tests and benchmarks that make random-weight checkpoints: the result loads
    wherever an official checkpoint does. Tensors are moved to CPU first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    weights = {str(k): v.detach().cpu() for k, v in state_dict.items()}
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            torch.save({"model": weights}, out)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


__all__ = [
    "CHECKPOINTS",
    "CHECKPOINT_ALIASES",
    "CheckpointInfo",
    "cache_dir",
    "checkpoint_info",
    "checkpoint_url",
    "load_state_dict_file",
    "resolve_checkpoint",
    "save_checkpoint",
    "sha256_file",
]
