"""patio as a user gets it: a wheel installed in a fresh virtualenv, run from an empty folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from .helpers import REPO

# What the wheel needs at run time, taken from this virtualenv (no download):
# msgpack (required) and prometheus_client (the worker's metrics). Not kopf:
# the operator's extra stays missing on purpose.
DEPENDENCIES = ("msgpack", "prometheus_client")


def clean_env() -> dict[str, str]:
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PATIO_") and k not in ("PYTHONPATH", "VIRTUAL_ENV", "POD_IP")
    }


@pytest.mark.slow
def test_installed_wheel_runs_local_version_and_operator_hint(tmp_path: Path) -> None:
    source = tmp_path / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "patio", source / "patio", ignore=ignore)
    shutil.copytree(REPO / "operator" / "src", source / "operator" / "src", ignore=ignore)
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(source)],
        check=True, timeout=600, capture_output=True,
    )  # fmt: skip
    (wheel,) = wheels.glob("patio-*.whl")

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
         str(wheel)],
        check=True, timeout=300, capture_output=True,
    )  # fmt: skip
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    deps = tmp_path / "deps"
    deps.mkdir()
    ours = Path(sysconfig.get_paths()["purelib"])
    for name in DEPENDENCIES:
        (deps / name).symlink_to(ours / name)
    Path(site, "patio-test-deps.pth").write_text(f"{deps}\n")

    empty = tmp_path / "empty"
    empty.mkdir()
    patio = str(venv / "bin" / "patio")

    def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [patio, *args], capture_output=True, text=True, cwd=empty, env=clean_env(),
            timeout=timeout, check=False,
        )  # fmt: skip

    version = run("--version")
    assert version.returncode == 0 and version.stdout.startswith("patio "), version
    local = run("local", "-n", "2", "--calls", "50")
    assert local.returncode == 0, local.stdout + local.stderr
    assert "total: 50 calls" in local.stdout and "stopped all workers" in local.stdout
    assert str(REPO) not in local.stdout  # nothing came from the checkout
    operator = run("operator", "--help")
    assert operator.returncode == 0 and "Traceback" not in operator.stderr, operator
    assert "pip install 'patio[kubernetes]'" in operator.stdout
    assert list(empty.iterdir()) == []
