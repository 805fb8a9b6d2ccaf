"""Start and stop the test servers that run as separate processes.

:class:`RtspServer` runs ``rtsp_server.py`` under the system Python (GStreamer's
bindings are Debian packages, not in the venv) and waits for its ``READY``
line; :class:`FfmpegSender` runs the ``ffmpeg`` CLI as a live sender (UDP/RTP
MPEG-TS, or an RTMP server in listen mode). Every wait is bounded; every
process is killed by ``stop()`` (the fixtures call it in ``finally``).
"""

from __future__ import annotations

import os
import selectors
import shutil
import subprocess
import time
from pathlib import Path

SYSTEM_PYTHON = "/usr/bin/python3"
RTSP_SCRIPT = Path(__file__).with_name("rtsp_server.py")


def gstreamer_rtsp_available() -> bool:
    """Whether the system Python can import GStreamer's RTSP server bindings."""
    if not os.path.exists(SYSTEM_PYTHON):
        return False
    probe = subprocess.run(
        [SYSTEM_PYTHON, "-c", "import gi; gi.require_version('GstRtspServer', '1.0'); "
         "from gi.repository import GstRtspServer"],
        capture_output=True, timeout=30,
    )
    return probe.returncode == 0


def ffmpeg_available() -> bool:
    return shutil.which("ffmpeg") is not None


def _read_line(proc: subprocess.Popen[bytes], timeout_s: float) -> str:
    """One line of the process's stdout, or '' if none came within ``timeout_s``."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    buf = b""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while b"\n" not in buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not sel.select(remaining):
                break
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                break
            buf += chunk
    return buf.decode(errors="replace").strip()


class RtspServer:
    """A GStreamer RTSP server process serving a solid-colour H.264 stream."""

    def __init__(self, log_dir: Path, port: int = 0, mount: str = "/cam", size_wh: tuple[int, int] = (320, 240),
                 fps: int = 25, rgb: tuple[int, int, int] = (200, 40, 60),
                 user: str | None = None, password: str | None = None) -> None:
        self.port, self.mount, self.size_wh, self.fps, self.rgb = port, mount, size_wh, fps, rgb
        self.user, self.password = user, password
        self.log_path = log_dir / "rtsp_server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, user: str | None = None, password: str | None = None) -> str:
        auth = f"{user}:{password}@" if user else ""
        return f"rtsp://{auth}127.0.0.1:{self.port}{self.mount}"

    def start(self, timeout_s: float = 20.0) -> RtspServer:
        args = [SYSTEM_PYTHON, str(RTSP_SCRIPT), "--port", str(self.port), "--mount", self.mount,
                "--size", f"{self.size_wh[0]}x{self.size_wh[1]}", "--fps", str(self.fps),
                "--rgb", ",".join(map(str, self.rgb))]
        if self.user:
            args += ["--user", self.user, "--password", self.password or ""]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=log)
        line = _read_line(self.proc, timeout_s)
        if not line.startswith("READY "):
            self.stop()
            raise RuntimeError(f"RTSP server did not start: {line!r}; see {self.log_path}")
        self.port = int(line.split()[1])
        return self

    def kill(self) -> None:
        """SIGKILL: the server vanishes without a goodbye, as a crashed camera does."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(10)
            if self.proc.stdout:
                self.proc.stdout.close()
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        self.kill()


class FfmpegSender:
    """``ffmpeg`` sending a live solid-colour H.264 stream (real-time paced) to ``output_args``."""

    def __init__(self, output_args: list[str], log_dir: Path, size_wh: tuple[int, int] = (160, 120),
                 fps: int = 25, rgb: tuple[int, int, int] = (48, 80, 208)) -> None:
        self.output_args = output_args
        self.size_wh, self.fps, self.rgb = size_wh, fps, rgb
        self.log_path = log_dir / "ffmpeg_sender.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> FfmpegSender:
        colour = "0x{:02X}{:02X}{:02X}".format(*self.rgb)
        args = ["ffmpeg", "-hide_banner", "-nostdin", "-loglevel", "error", "-re", "-f", "lavfi",
                "-i", f"color=c={colour}:size={self.size_wh[0]}x{self.size_wh[1]}:rate={self.fps}",
                "-c:v", "libx264", "-preset", "ultrafast", "-tune", "zerolatency",
                "-g", str(max(1, self.fps // 2)), "-pix_fmt", "yuv420p", *self.output_args]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None
