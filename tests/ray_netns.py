"""Running a Ray test module inside a network namespace that has only loopback.

Ray binds every node to the machine's routable address even when told
``127.0.0.1`` and its gRPC servers listen on all interfaces. So the Ray tests
never run in the test session's own namespace: the session re-executes the
module under ``unshare -n`` (after ``ip link set lo up``), where 127.0.0.1 is the
only address there is. A Ray test module does::

    if in_namespace():
        ... the real tests (module-scoped cluster fixture) ...
    else:
        def test_in_loopback_namespace():
            run_module_in_namespace(__file__)

The child gets its own ``RAY_TMPDIR`` (no ``/tmp/ray/ray_current_cluster`` is read
or left behind), token auth with a fresh token, and a time limit; it is killed
with everything it started if it overruns.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV_FLAG = "SAM2_STREAM_RAY_NETNS"


def in_namespace() -> bool:
    """True in the re-executed child (the loopback-only namespace)."""
    return os.environ.get(ENV_FLAG) == "1"


def unavailable_reason() -> str | None:
    """Why the loopback-only namespace cannot be made here (None: it can)."""
    try:
        import ray  # noqa: F401
    except ImportError:
        return "ray is not installed (pip install -e .[ray])"
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "the Ray tests need `unshare` (util-linux) and `ip` (iproute2) for a loopback-only network namespace"
    try:
        probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"`unshare -n` failed ({e}): the Ray tests run only in a loopback-only network namespace"
    if probe.returncode != 0:
        return (
            "`unshare -n` is not permitted here (needs root or user namespaces: "
            f"{probe.stderr.decode(errors='replace').strip()}); the Ray tests run only in a loopback-only network namespace"
        )
    return None


def run_module_in_namespace(test_file: str, timeout_s: float = 600.0) -> None:
    """Run ``test_file``'s tests in a loopback-only namespace; fail with the child's output if they fail."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's unix sockets live under it
    env = {
        **os.environ,
        ENV_FLAG: "1",
        "RAY_TMPDIR": tmp,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
        "RAY_USAGE_STATS_ENABLED": "0",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    # no hypothesis plugin (the Ray tests do not use it): it imports hypothesis at the session's end,
    # with Ray's threads still alive, where CPython 3.11's AST recursion-depth bug (cpython#106905)
    # made pytest's rewrite of that import fail once after every test had passed
    command = [
        "unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh",
        sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-p", "no:hypothesispytest", "-rs", str(test_file),
    ]
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"the Ray tests in the loopback namespace ran past {timeout_s:.0f} s:\n{out.decode(errors='replace')[-8000:]}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    text = out.decode(errors="replace")
    print(text[-4000:])
    if proc.returncode == 5:  # no tests collected
        pytest.fail(f"no Ray tests ran in the namespace:\n{text[-4000:]}")
    assert proc.returncode == 0, f"the Ray tests failed in the loopback namespace:\n{text[-12000:]}"
