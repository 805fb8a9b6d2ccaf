"""Model building: names, devices, image sizes, random weights, and checkpoints in
Meta's format, including the download path end to end against a local server."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import threading

import pytest
import torch

from tests.conftest import TEST_IMAGE_SIZE, TEST_SEED
from tracker import checkpoints
from tracker.errors import CheckpointError, CheckpointMismatchError, ModelConfigError
from tracker.model import autocast_context, build_model, check_precision, model_state_dict, pick_device, resolve_config


def test_short_names_and_config_paths_resolve():
    assert resolve_config("sam2.1-tiny") == "configs/sam2.1/sam2.1_hiera_t.yaml"
    assert resolve_config("sam2.1-b+") == "configs/sam2.1/sam2.1_hiera_b+.yaml"
    assert resolve_config("sam2-large") == "configs/sam2/sam2_hiera_l.yaml"
    assert resolve_config("configs/sam2.1/sam2.1_hiera_s.yaml") == "configs/sam2.1/sam2.1_hiera_s.yaml"


def test_unknown_model_and_bad_image_size():
    with pytest.raises(ModelConfigError) as err:
        build_model("sam3-huge", random_weights_seed=0, device="cpu")
    assert str(err.value).startswith("unknown model 'sam3-huge'; use one of sam2.1-tiny, sam2.1-small")
    with pytest.raises(ModelConfigError) as err:
        build_model("sam2.1-tiny", random_weights_seed=0, device="cpu", image_size=100)
    assert str(err.value) == "image_size 100 is not usable: it must be a multiple of 32 (e.g. (256, 512, 768, 1024))"


def test_device_choice():
    assert pick_device("cpu") == torch.device("cpu")
    auto = pick_device("auto")
    assert auto.type == ("cuda" if torch.cuda.is_available() else auto.type)
    if not torch.cuda.is_available():
        assert auto.type in ("cpu", "mps")
        with pytest.raises(ModelConfigError) as err:
            pick_device("cuda")
        assert str(err.value) == "device 'cuda' asked for but CUDA is not available; use --device cpu"
    with pytest.raises(ModelConfigError) as err:
        pick_device("gpu0")
    assert str(err.value) == "unknown device 'gpu0': use auto, cpu, cuda, cuda:N or mps"


def test_precision_choices():
    cpu = torch.device("cpu")
    for precision in ("auto", "fp32"):
        with autocast_context(cpu, precision):
            assert not torch.is_autocast_enabled("cpu")
    with autocast_context(cpu, "bf16"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    assert check_precision("bf16", cpu) == "bf16"
    with pytest.raises(ModelConfigError) as err:
        check_precision("fp16", cpu)
    assert str(err.value) == "precision fp16 is for GPUs; on the CPU use bf16 (or fp32)"
    with pytest.raises(ModelConfigError) as err:
        build_model("sam2.1-tiny", random_weights_seed=0, device="cpu", image_size=256, precision="int8")
    assert str(err.value) == "unknown precision 'int8': use one of auto, fp32, bf16, fp16"
    net = build_model("sam2.1-tiny", random_weights_seed=0, device="cpu", image_size=256, precision="bf16")
    assert net.autocast_precision == "bf16"


def test_precision_choices_agree_everywhere():
    """The CLI and the server config spell the choices out (neither imports torch)."""
    import typing

    from server.config import ModelEntry
    from tracker.cli import build_parser
    from tracker.model import PRECISIONS

    assert typing.get_args(typing.get_type_hints(ModelEntry)["precision"]) == PRECISIONS
    for precision in PRECISIONS:
        args = build_parser().parse_args(["annotate", "v.mp4", "--prompts", "p.json", "--out", "o", "--precision", precision])
        assert args.precision == precision


def test_random_weights_are_seeded():
    a = model_state_dict(build_model("sam2.1-tiny", random_weights_seed=3, device="cpu", image_size=256))
    b = model_state_dict(build_model("sam2.1-tiny", random_weights_seed=3, device="cpu", image_size=256))
    c = model_state_dict(build_model("sam2.1-tiny", random_weights_seed=4, device="cpu", image_size=256))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_checkpoint_round_trip(model, random_checkpoint):
    reference = build_model("sam2.1-tiny", random_weights_seed=TEST_SEED, device="cpu", image_size=TEST_IMAGE_SIZE)
    loaded, ref = model_state_dict(model), model_state_dict(reference)
    assert loaded.keys() == ref.keys()
    assert all(torch.equal(loaded[k], ref[k]) for k in ref)
    assert model.image_size == TEST_IMAGE_SIZE and not model.training


def test_checkpoint_that_does_not_fit_the_config(random_checkpoint, tmp_path):
    with pytest.raises(CheckpointMismatchError) as err:
        build_model("sam2.1-small", checkpoint=random_checkpoint, device="cpu", image_size=256)
    message = str(err.value)
    assert message.startswith(f"checkpoint {random_checkpoint} does not fit model sam2.1-small: ")
    assert "missing keys (e.g. " in message
    assert message.endswith(
        "Pass the checkpoint that matches --model (e.g. sam2.1_hiera_tiny.pt for sam2.1-tiny)"
    )

    sd = checkpoints.load_state_dict_file(random_checkpoint)
    del sd["no_mem_embed"]
    sd["extra.weight"] = torch.zeros(1)
    broken = checkpoints.save_checkpoint(sd, tmp_path / "broken.pt")
    with pytest.raises(CheckpointMismatchError) as err:
        build_model("sam2.1-tiny", checkpoint=broken, device="cpu", image_size=256)
    assert str(err.value) == (
        f"checkpoint {broken} does not fit model sam2.1-tiny: 1 missing keys (e.g. no_mem_embed); "
        "1 unexpected keys (e.g. extra.weight). "
        "Pass the checkpoint that matches --model (e.g. sam2.1_hiera_tiny.pt for sam2.1-tiny)"
    )


def test_corrupt_checkpoint_file(tmp_path):
    bad = tmp_path / "sam2.1_hiera_tiny_copy.pt"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError) as err:
        build_model("sam2.1-tiny", checkpoint=bad, device="cpu", image_size=256)
    assert "is not a SAM 2 checkpoint" in str(err.value)


@pytest.fixture()
def mirror(random_checkpoint, tmp_path, monkeypatch):
    """A local HTTP server laid out like Meta's download host, serving the random
    checkpoint as ``092824/sam2.1_hiera_tiny.pt``; the registry entry is pointed
    at that file's real size and sha256."""
    root = tmp_path / "www"
    (root / "092824").mkdir(parents=True)
    target = root / "092824" / "sam2.1_hiera_tiny.pt"
    target.write_bytes(random_checkpoint.read_bytes())
    data = target.read_bytes()
    info = dataclasses.replace(
        checkpoints.CHECKPOINTS["sam2.1-tiny"], size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest()
    )
    monkeypatch.setitem(checkpoints.CHECKPOINTS, "sam2.1-tiny", info)
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):  # keep test output clean
            pass

        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("SAM2_STREAM_CHECKPOINT_URL", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("SAM2_STREAM_CACHE", str(tmp_path / "cache"))
    yield requests
    server.shutdown()
    server.server_close()


def test_official_checkpoint_downloaded_once_then_cached(mirror, tmp_path):
    net = build_model("sam2.1-tiny", device="cpu", image_size=TEST_IMAGE_SIZE)
    assert mirror == ["/092824/sam2.1_hiera_tiny.pt"]
    assert (tmp_path / "cache" / "sam2.1_hiera_tiny.pt").is_file()
    again = build_model("sam2.1-tiny", device="cpu", image_size=TEST_IMAGE_SIZE)
    assert len(mirror) == 1  # served from the cache
    a, b = model_state_dict(net), model_state_dict(again)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_no_download_allowed_and_nothing_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("SAM2_STREAM_CACHE", str(tmp_path / "empty"))
    with pytest.raises(CheckpointError) as err:
        build_model("sam2.1-tiny", device="cpu", download=False)
    message = str(err.value)
    assert message.startswith("checkpoint sam2.1-tiny is not in the cache and downloading is off; ")
    assert "https://dl.fbaipublicfiles.com/segment_anything_2/092824/sam2.1_hiera_tiny.pt" in message
    assert str(tmp_path / "empty" / "sam2.1_hiera_tiny.pt") in message
