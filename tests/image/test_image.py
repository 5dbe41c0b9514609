"""The image built from the repository's Dockerfile, run as containers with runc.

What a user's container runtime does: the image's own user (non-root), a
read-only root filesystem, no capabilities, a network namespace of its own.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .runc import Image, ImageMissingError, Runc, bundle_config, netns, proc_ids

pytestmark = pytest.mark.slow

KEY = "image-test-key"


@pytest.fixture(scope="module")
def image() -> Image:
    try:
        return Image.find()
    except ImageMissingError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="module")
def rootfs(image: Image, tmp_path_factory: pytest.TempPathFactory) -> Path:
    # One unpacked copy serves every container: they cannot write to it.
    return image.unpack(tmp_path_factory.mktemp("image") / "rootfs")


@pytest.fixture
def runc(tmp_path: Path) -> Iterator[Runc]:
    r = Runc(tmp_path)
    try:
        yield r
    finally:
        r.delete_all()


@pytest.fixture
def ns() -> Iterator[Path]:
    with netns(f"patio-img-{os.getpid()}") as path:
        yield path


def test_image_runs_as_its_non_root_user(image: Image, rootfs: Path, runc: Runc, ns: Path) -> None:
    assert image.user() == (10001, 10001)
    res = runc.run("help", bundle_config(image, rootfs, ["--help"], netns=ns))
    assert res.returncode == 0, res.stderr
    assert "worker" in res.stdout and "call" in res.stdout
    probe = (
        "import os, pathlib\n"
        "print(os.getuid(), os.getgid())\n"
        "try:\n"
        "    pathlib.Path('/app/x').write_text('x')\n"
        "except OSError as e:\n"
        "    print(e.strerror)\n"
    )
    res = runc.run(
        "probe",
        bundle_config(image, rootfs, ["python", "-c", probe], netns=ns, entrypoint=False),
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.split("\n")[:2] == ["10001 10001", "Read-only file system"]


def test_operator_module_runs(image: Image, rootfs: Path, runc: Runc, ns: Path) -> None:
    res = runc.run(
        "operator",
        bundle_config(
            image, rootfs, ["python", "-m", "patio_operator", "--help"], netns=ns, entrypoint=False
        ),
    )
    assert res.returncode == 0, res.stderr
    assert "usage" in res.stdout.lower()


def test_worker_serves_a_call_from_another_container(
    image: Image, rootfs: Path, runc: Runc, ns: Path
) -> None:
    worker = runc.start(
        "worker",
        bundle_config(
            image,
            rootfs,
            ["worker", "tasks:rpc", "--listen", "127.0.0.1", "--key", KEY, "--metrics-port", "0"],
            netns=ns,
            hostname="worker",
        ),
    )
    call = ["call", "--peer", "127.0.0.1:15383", "--key", KEY, "--timeout", "5", "mul", "6", "7"]
    deadline = time.monotonic() + 60
    attempt = 0
    while True:
        assert worker.poll() is None, f"worker exited {worker.returncode}: {runc.log('worker')}"
        attempt += 1
        res = runc.run(f"call-{attempt}", bundle_config(image, rootfs, call, netns=ns))
        if res.returncode == 0:
            break
        assert time.monotonic() < deadline, f"{res.stderr}\nworker log:\n{runc.log('worker')}"
        time.sleep(0.5)
    assert res.stdout.strip() == "42"
    state = runc.state_of("worker")
    assert state is not None and state["status"] == "running"
    assert proc_ids(int(state["pid"])) == (10001, 10001)
