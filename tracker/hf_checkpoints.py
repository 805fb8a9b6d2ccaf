"""Checkpoints of the transformers model families (EdgeTAM, SAM 3's tracker) from the Hugging Face Hub.

What lives here: the registry of official Hugging Face repositories
(:data:`HF_CHECKPOINTS`: short name → repository, revision, the files
``from_pretrained`` needs, licence, gated or not), and
:func:`resolve_hf_checkpoint`, which turns a short name or a local folder into a
checked local *directory* that ``EdgeTamVideoModel.from_pretrained(directory)``
(or ``Sam3TrackerVideoModel``…) loads without the network.
What does not: building models (the model families) and Meta's SAM 2 ``.pt``
files (``tracker.checkpoints``, whose cache root and download rules this shares).

Layout: ``cache_dir()/"hf"/<owner>--<name>/<revision>/<file>``, one plain folder
per repository and revision, so a user without network can fill it by hand
(every error names the folder and the files). Each missing file is fetched from
``{endpoint}/{repo_id}/resolve/{revision}/{file}`` (``endpoint``: argument, else
``$HF_ENDPOINT``, else ``https://huggingface.co``) through ``tracker.download``:
streamed to a temporary file, checked, moved into place with ``os.replace``.

Checks, the same for a fresh download and for a cached file, so neither can
hand a broken file to ``from_pretrained``: size against the hub's
``X-Linked-Size`` / ``Content-Length``; sha256 against the hub's ``X-Linked-Etag``
/ ``ETag`` where that is a sha256 (files in LFS; small git files carry a sha1,
not checked); ``*.safetensors`` must open with ``safetensors`` (its header
covers the whole file: truncation shows) and hold a tensor; ``*.json`` must
parse to an object. A cached file that fails is deleted and fetched again, or
reported when downloads are off.

The hub's conventions are followed where they touch the user: ``HF_HUB_OFFLINE``
(or ``TRANSFORMERS_OFFLINE``) set to 1/ON/YES/TRUE turns downloads off, as in
``huggingface_hub``; ``HF_TOKEN`` is sent as ``Authorization: Bearer …`` to the
endpoint's host only (never to the CDN the hub redirects to). A gated repository
(SAM 3) answers 401/403 until its licence is accepted on its page: the error says so.
"""

from __future__ import annotations

import json
import logging
import os
import re
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

from tracker.checkpoints import cache_dir
from tracker.download import DEFAULT_TIMEOUT_S, announced_length, open_url, stream_to_file
from tracker.errors import CheckpointError

logger = logging.getLogger(__name__)

#: the hub; ``$HF_ENDPOINT`` (huggingface_hub's variable) names a mirror or a test server
DEFAULT_ENDPOINT = "https://huggingface.co"
ENDPOINT_ENV = "HF_ENDPOINT"
TOKEN_ENV = "HF_TOKEN"
#: huggingface_hub turns downloads off when either is true (its ``_is_true``)
OFFLINE_ENVS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
_TRUE_VALUES = {"1", "ON", "YES", "TRUE"}
#: sub-folder of ``cache_dir()`` holding Hugging Face repositories
HF_CACHE_SUBDIR = "hf"
TOKEN_PAGE = "https://huggingface.co/settings/tokens"

#: weight files ``from_pretrained`` reads from a folder
_WEIGHT_GLOBS = ("*.safetensors", "pytorch_model.bin")
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class HFCheckpointInfo:
    """One official Hugging Face repository and the files a model family loads from it.

    ``files`` are the files ``from_pretrained`` / the processor read (plain names
    at the repository's top level), nothing else: SAM 3's repository also holds
    Meta's ``sam3.pt`` and a text tokenizer, which the tracker does not need.
    """

    name: str
    repo_id: str
    files: tuple[str, ...]
    licence: str
    gated: bool
    page_url: str
    revision: str = "main"

    def __post_init__(self) -> None:
        if not _REPO_ID.fullmatch(self.repo_id):
            raise CheckpointError(f"HFCheckpointInfo {self.name!r}: repo_id {self.repo_id!r} is not 'owner/name'")
        if not self.revision or ".." in self.revision.split("/") or self.revision.startswith("/"):
            raise CheckpointError(
                f"HFCheckpointInfo {self.name!r}: revision {self.revision!r} is not a branch, tag or commit"
            )
        bad = [f for f in self.files if not f or "/" in f or "\\" in f or f.startswith(".")]
        if bad:
            raise CheckpointError(
                f"HFCheckpointInfo {self.name!r}: files {bad!r} are not plain file names at the repository's top level"
            )
        if "config.json" not in self.files or not any(f.endswith(".safetensors") for f in self.files):
            raise CheckpointError(
                f"HFCheckpointInfo {self.name!r}: files must include config.json and a .safetensors file, got "
                f"{list(self.files)!r}"
            )

    @property
    def cache_subdir(self) -> Path:
        """``<owner>--<name>/<revision>`` (a revision like ``refs/pr/1`` becomes ``refs--pr--1``)."""
        return Path(self.repo_id.replace("/", "--")) / self.revision.replace("/", "--")

    def file_url(self, file: str, endpoint: str | None = None) -> str:
        """``{endpoint}/{repo_id}/resolve/{revision}/{file}``, the hub's download URL."""
        return f"{resolve_endpoint(endpoint)}/{self.repo_id}/resolve/{quote(self.revision, safe='')}/{quote(file)}"


#: Short name → official repository. A plain dict, so tests (or a user with a
#: mirror of other files) can replace an entry with ``dataclasses.replace``.
#: Sources (checked 2026-12-01): transformers 5.23's own EdgeTamVideo integration
#: tests and ``EdgeTamVideoConfig``'s docstring load ``yonigozlan/EdgeTAM-hf``
#: (the transformers conversion by the contributor of the model; Meta's
#: ``facebook/EdgeTAM`` holds only ``edgetam.pt`` for Meta's code); transformers'
#: SAM3 tracker video docs and ``Sam3TrackerVideoConfig`` load ``facebook/sam3``.
HF_CHECKPOINTS: dict[str, HFCheckpointInfo] = {
    info.name: info
    for info in (
        HFCheckpointInfo(
            name="edgetam",
            repo_id="yonigozlan/EdgeTAM-hf",
            files=(
                "config.json",
                "preprocessor_config.json",
                "processor_config.json",
                "video_preprocessor_config.json",
                "model.safetensors",
            ),
            licence="Apache-2.0 (EdgeTAM's code and checkpoints, facebookresearch/EdgeTAM)",
            gated=False,
            page_url="https://huggingface.co/yonigozlan/EdgeTAM-hf",
        ),
        HFCheckpointInfo(
            name="sam3-tracker",
            repo_id="facebook/sam3",
            files=("config.json", "processor_config.json", "model.safetensors"),
            licence=(
                "SAM License (Meta, 2025-11-19): use, modify and redistribute with the licence attached, but not "
                "for military or warfare, nuclear, espionage, weapons or ITAR uses, nor in breach of trade "
                "controls; publications must acknowledge SAM; no reverse engineering"
            ),
            gated=True,
            page_url="https://huggingface.co/facebook/sam3",
        ),
    )
}


def hf_checkpoint_info(name: str) -> HFCheckpointInfo:
    """The registry entry for a short name (``edgetam``) or its repository id (``facebook/sam3``)."""
    info = _lookup(name)
    if info is None:
        raise CheckpointError(
            f"unknown checkpoint name {name!r}; use one of {', '.join(HF_CHECKPOINTS)}, "
            "or pass --checkpoint DIR to a Hugging Face model folder"
        )
    return info


def _lookup(name: str) -> HFCheckpointInfo | None:
    if name in HF_CHECKPOINTS:
        return HF_CHECKPOINTS[name]
    return next((info for info in HF_CHECKPOINTS.values() if info.repo_id == name), None)


def resolve_endpoint(endpoint: str | None = None) -> str:
    """The hub to download from: ``endpoint``, else ``$HF_ENDPOINT``, else the Hugging Face Hub."""
    return (endpoint or os.environ.get(ENDPOINT_ENV) or DEFAULT_ENDPOINT).rstrip("/")


def offline_reason() -> str | None:
    """``"HF_HUB_OFFLINE=1"`` when the environment turns downloads off (as huggingface_hub reads it), else None."""
    for key in OFFLINE_ENVS:
        value = os.environ.get(key)
        if value is not None and value.strip().upper() in _TRUE_VALUES:
            return f"{key}={value}"
    return None


def hf_checkpoint_dir(info: HFCheckpointInfo, cache: Path | None = None) -> Path:
    """Where ``info``'s files live: ``(cache or cache_dir())/hf/<owner>--<name>/<revision>``."""
    return (cache if cache is not None else cache_dir()) / HF_CACHE_SUBDIR / info.cache_subdir


def _manual_hint(info: HFCheckpointInfo, directory: Path) -> str:
    """What to do when the files cannot be fetched: fetch them by hand into ``directory``, or name another folder."""
    return (
        f"download {', '.join(info.files)} of {info.repo_id} (revision {info.revision}) from {info.page_url} "
        f"into {directory}, or pass --checkpoint DIR to a folder holding them"
    )


# --- checking files -----------------------------------------------------------------


def _json_problem(path: Path) -> str | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        return "is not valid JSON (not UTF-8 text)"
    except json.JSONDecodeError as e:
        return f"is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
    return None if isinstance(value, dict) else f"is not a JSON object (found {type(value).__name__})"


def _safetensors_problem(path: Path) -> str | None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            n_tensors = len(list(f.keys()))
    except (SafetensorError, OSError) as e:
        return f"is not a readable safetensors file ({e})"
    return None if n_tensors else "is a safetensors file holding no tensors"


def file_problem(path: Path, name: str | None = None) -> str | None:
    """Why ``path`` cannot be what ``from_pretrained`` expects of a file called
    ``name`` (default: ``path``'s own name), or None.

    One check for downloads (on the temporary file, before it is moved into
    place), cached files and user folders: ``*.safetensors`` must open and hold
    a tensor, ``*.json`` must be a JSON object; other files are not looked into.
    """
    name = path.name if name is None else name
    if name.endswith(".safetensors"):
        return _safetensors_problem(path)
    if name.endswith(".json"):
        return _json_problem(path)
    return None


def _cached_problem(path: Path) -> str | None:
    if not path.exists():
        return "is missing"
    if not path.is_file():
        return "is not a file"
    return file_problem(path)


# --- local folders ------------------------------------------------------------------


def _local_directory(path: Path) -> Path:
    """A user-given model folder: it exists, holds config.json and weights, and they read."""
    names = ", ".join(HF_CHECKPOINTS)
    if not path.exists():
        if len(path.parts) > 1 or path.suffix:
            raise CheckpointError(
                f"checkpoint directory {path} does not exist; pass --checkpoint DIR to an existing Hugging Face "
                f"model folder (config.json and model.safetensors), or a model name ({names}) to download it"
            )
        raise CheckpointError(
            f"unknown checkpoint {str(path)!r}: no such directory and not a model name; use one of {names}, "
            "or pass --checkpoint DIR to a Hugging Face model folder"
        )
    if not path.is_dir():
        raise CheckpointError(
            f"checkpoint path {path} is a file; pass --checkpoint DIR to the folder holding config.json and "
            "model.safetensors (as save_pretrained writes them)"
        )
    config = path / "config.json"
    if not config.is_file():
        raise CheckpointError(
            f"checkpoint directory {path} has no config.json; pass --checkpoint DIR to a Hugging Face model folder "
            "(config.json and model.safetensors, as save_pretrained writes them)"
        )
    weights = sorted({p for pattern in _WEIGHT_GLOBS for p in path.glob(pattern) if p.is_file()})
    if not weights:
        raise CheckpointError(
            f"checkpoint directory {path} has config.json but no weights (*.safetensors or pytorch_model.bin); "
            "copy the model's weight files into it"
        )
    for file in (config, *weights):
        problem = file_problem(file)
        if problem is not None:
            raise CheckpointError(
                f"checkpoint file {file} {problem}; replace it with the repository's file "
                "(download it again), or pass --checkpoint DIR to another folder"
            )
    return path


# --- downloads ----------------------------------------------------------------------


class _HubRedirects(urllib.request.HTTPRedirectHandler):
    """Follows the hub's redirects (large files are served by a CDN) while keeping
    each hop's headers: the hub puts a file's sha256 and size on its redirect, not
    on the CDN's answer. Credentials go again only to the host they were given for."""

    def __init__(self, origin: str, credentials: Mapping[str, str]) -> None:
        super().__init__()
        self.hops: list[Mapping[str, str]] = []
        self._origin = urlsplit(origin).netloc
        self._credentials = dict(credentials)

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]  # urllib's
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        self.hops.append(headers)
        if new is not None and urlsplit(newurl).netloc == self._origin:
            for key, value in self._credentials.items():
                new.add_unredirected_header(key, value)
        return new


def _hub_sha256(value: str | None) -> str | None:
    """The sha256 in an ETag-like header (quotes and ``W/`` stripped), or None if it holds another kind of tag."""
    if not value:
        return None
    tag = value.strip()
    if tag.startswith("W/"):
        tag = tag[2:]
    tag = tag.strip('"').lower()
    return tag if _SHA256.fullmatch(tag) else None


def _expected(answers: list[Mapping[str, str]]) -> tuple[int | None, str | None]:
    """(size, sha256) the hub announces for a file, from the headers of every answer
    (redirects, then the final one), in the spirit of huggingface_hub: ``X-Linked-Size``
    / ``X-Linked-Etag`` (the hub's, for LFS files) win over ``ETag`` and the final
    answer's ``Content-Length``; an ``ETag`` that is not a sha256 is no check."""
    linked_sizes = [h.get("X-Linked-Size", "").strip() for h in answers]
    size = next((int(v) for v in linked_sizes if v.isdigit()), None)
    if size is None:
        size = announced_length(answers[-1])
    tags = [h.get("X-Linked-Etag") for h in answers] + [h.get("ETag") for h in answers]
    sha = next((sha for sha in map(_hub_sha256, tags) if sha is not None), None)
    return size, sha


def _auth_message(
    e: urllib.error.HTTPError, info: HFCheckpointInfo, url: str, token: str | None, hint: str
) -> str | None:
    if e.code not in (401, 403) or urlsplit(e.geturl()).netloc != urlsplit(url).netloc:
        return None  # not the hub's refusal (a CDN's expired link is not a licence matter)
    status = f"cannot download {url}: HTTP {e.code} {e.reason}"
    gated = info.gated or e.headers.get("X-Error-Code") == "GatedRepo"
    if not gated:
        no_token = "" if token else f"; {TOKEN_ENV} is not set"
        return (
            f"{status}: the hub refuses {info.repo_id} (private or not found{no_token}); "
            f"check the repository id (or {ENDPOINT_ENV}), set {TOKEN_ENV} if it is private, or {hint}"
        )
    if token is None:
        return (
            f"{status}: {info.repo_id} is gated and {TOKEN_ENV} is not set. Accept its licence on {info.page_url} "
            f"while logged in, create an access token at {TOKEN_PAGE} and set {TOKEN_ENV} to it; or {hint}"
        )
    return (
        f"{status}: {info.repo_id} is gated and the token in {TOKEN_ENV} has no access to it (licence not accepted "
        f"yet, request pending, or another account's token). Accept its licence on {info.page_url} with the account "
        f"of that token; or {hint}"
    )


def _download(
    info: HFCheckpointInfo, file: str, path: Path, *, endpoint: str | None, progress: bool, timeout: float
) -> None:
    """Fetch one file of ``info`` into ``path`` (atomically, checked against what the hub announces)."""
    url = info.file_url(file, endpoint)
    hint = _manual_hint(info, path.parent)
    token = os.environ.get(TOKEN_ENV) or None
    credentials = {"Authorization": f"Bearer {token}"} if token else {}
    redirects = _HubRedirects(url, credentials)
    logger.info("downloading %s of %s (%s) from %s to %s", file, info.name, info.repo_id, url, path)
    response = open_url(
        url,
        hint=hint,
        timeout=timeout,
        unredirected_headers=credentials,
        opener=urllib.request.build_opener(redirects),
        http_error=lambda e: _auth_message(e, info, url, token, hint),
    )
    with response:
        answers = [*redirects.hops, response.headers]
        size, sha = _expected(answers)
        received, actual_sha = stream_to_file(
            response,
            url,
            path,
            hint=hint,
            expected_size=size,
            expected_sha256=sha,
            timeout=timeout,
            progress=progress,
            check=lambda tmp: file_problem(tmp, file),
        )
    commit = next((h["X-Repo-Commit"] for h in answers if h.get("X-Repo-Commit")), None)
    logger.info(
        "%s of %s saved to %s (%d bytes, sha256 %s%s)",
        file, info.name, path, received, actual_sha, f", commit {commit}" if commit else "",
    )  # fmt: skip


def resolve_hf_checkpoint(
    name_or_path: str | os.PathLike[str],
    *,
    cache: Path | None = None,
    download: bool = True,
    endpoint: str | None = None,
    progress: bool = True,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> Path:
    """Turn a model name (``edgetam``) or a model folder into a checked local directory.

    A folder (a ``PathLike``, or a string that is not a registry name) is
    returned after a check: it exists and holds a readable ``config.json`` and
    weights (``*.safetensors`` or ``pytorch_model.bin``). A name (or its
    repository id) maps to ``cache_dir()/hf/<owner>--<name>/<revision>``: when
    every file listed in the registry is there and passes its check, the folder is
    returned without touching the network; otherwise each missing or failing file
    is (re)downloaded, one by one, when downloads are allowed.

    Args:
        name_or_path: short name from :data:`HF_CHECKPOINTS`, its repository id, or a folder.
        cache: cache root replacing :func:`~tracker.checkpoints.cache_dir` (the
            files go under ``cache/hf/…``).
        download: allow fetching; off as well when ``HF_HUB_OFFLINE`` (or
            ``TRANSFORMERS_OFFLINE``) is true.
        endpoint: the hub (default ``$HF_ENDPOINT``, else https://huggingface.co).
        progress: show a tqdm progress bar while downloading.
        timeout: seconds to wait for the connection and for each read.

    Raises:
        CheckpointError: a file is missing, invalid, refused (gated repository:
            accept the licence, set ``HF_TOKEN``) or cannot be fetched; the message
            names the repository, the files and the folder to put them in.
    """
    info = _lookup(name_or_path) if isinstance(name_or_path, str) else None
    if info is None:
        return _local_directory(Path(os.fspath(name_or_path)).expanduser())

    directory = hf_checkpoint_dir(info, cache)
    problems = {file: _cached_problem(directory / file) for file in info.files}
    if all(problem is None for problem in problems.values()):
        logger.debug("checkpoint %s: using cached %s", info.name, directory)
        return directory

    off = None if download else "downloading is off"
    if off is None and (reason := offline_reason()) is not None:
        off = f"downloading is off ({reason})"
    if off is not None:
        listed = "; ".join(f"{file} {problem}" for file, problem in problems.items() if problem is not None)
        raise CheckpointError(
            f"checkpoint {info.name} ({info.repo_id}) is not complete in {directory} and {off}: {listed}; "
            + _manual_hint(info, directory)
        )

    for file in info.files:
        path = directory / file
        problem = _cached_problem(path)  # again: another process may have fetched it meanwhile
        if problem is None:
            continue
        if path.is_dir():
            raise CheckpointError(f"{path} is a folder where the file {file} belongs; remove it and run again")
        if path.exists():  # not deleted first: os.replace swaps the new file in, so a reader never sees none
            logger.warning("cached %s %s; downloading it again", path, problem)
        _download(info, file, path, endpoint=endpoint, progress=progress, timeout=timeout)
    return directory


__all__ = [
    "DEFAULT_ENDPOINT",
    "HF_CHECKPOINTS",
    "HFCheckpointInfo",
    "file_problem",
    "hf_checkpoint_dir",
    "hf_checkpoint_info",
    "offline_reason",
    "resolve_endpoint",
    "resolve_hf_checkpoint",
]
