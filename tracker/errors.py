"""The one exception tree of the project.

Everything the engine raises on purpose derives from :class:`TrackerError`, so a
server can catch one type, report it to the client that caused it and keep
serving everyone else::

    TrackerError
    ├── CheckpointError        checkpoint missing, truncated, corrupt, wrong size/hash
    │   └── CheckpointMismatchError   weights do not fit the chosen config
    ├── ModelConfigError       unknown model name / config, bad image size, bad device
    ├── PromptError            bad points/boxes/masks, unknown object ids, stale frames
    │   └── FrameNotAvailableError    prompt names a frame outside the prompt window
    ├── FrameError             wrong frame shape / dtype handed to the predictor
    ├── MaskError              a mask or RLE that cannot be encoded / decoded
    ├── ExportError            unknown export format, bad export options or files
    └── SourceError            ingest: a source cannot be opened or read
        ├── SourceNotFoundError       file / device does not exist
        ├── SourceUnsupportedError    no decoder / container / no video stream
        ├── SourceConnectionError     host unreachable, timeout, auth failure
        ├── SourceNotAllowedError     refused by the server-side allowlist
        └── SourceOptionError         a source option outside its range (names the option)

Defined next to their users, on the same root: ``tracker.session.SessionError``
(session limits, closed or unknown sessions), ``tracker.evaluate.EvalError``
(a run or ground truth that cannot be scored), ``tracker.image_input.ImageInputError``
(an image that cannot be decoded safely), ``tracker.segment.ImagePromptError`` (a
``PromptError`` naming its field) and, in the ``server`` package
(which ``tracker`` never imports), ``ProtocolError``, ``ConfigError``,
``WebRTCError`` and the client's ``ClientError`` → ``RemoteError`` /
``ConnectionLostError``.

Messages say what to do next; tests assert them verbatim.
"""

from __future__ import annotations


class TrackerError(Exception):
    """Base class of every error the tracker raises deliberately."""


class CheckpointError(TrackerError):
    """A checkpoint file is missing, truncated, corrupt or cannot be fetched."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint's weights do not fit the model config (missing/unexpected keys)."""


class ModelConfigError(TrackerError):
    """The model name, config, image size or device asked for cannot be used."""


class PromptError(TrackerError, ValueError):
    """A prompt (points, box, mask, object id) cannot be applied."""


class FrameNotAvailableError(PromptError):
    """A prompt names a frame whose features are no longer (or not yet) kept."""


class FrameError(TrackerError, ValueError):
    """A frame handed to the predictor has the wrong shape, dtype or size."""


class MaskError(TrackerError, ValueError):
    """A mask, RLE or label image is malformed (wrong shape, bad counts, bad ids)."""


class ExportError(TrackerError, ValueError):
    """An export cannot be written or read (unknown format, bad options, wrong file)."""


class SourceError(TrackerError):
    """A video source cannot be opened or read."""


class SourceNotFoundError(SourceError):
    """The file, folder or device named by a source does not exist."""


class SourceUnsupportedError(SourceError):
    """The source exists but has no decodable video stream (codec/container)."""


class SourceConnectionError(SourceError):
    """A network source is unreachable, timed out, or refused the credentials."""


class SourceNotAllowedError(SourceError):
    """A source was refused by the server-side allowlist."""


class SourceOptionError(SourceError, ValueError):
    """A source option has a value outside its documented range (or the server's cap).

    ``option`` names it (``"timeout_s"``), so a server can answer with the field
    at fault; the message gives the range.
    """

    def __init__(self, message: str, option: str) -> None:
        super().__init__(message)
        self.option = option
