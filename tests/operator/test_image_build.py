"""The Dockerfile's stages, run without Docker (no engine on this machine).

The builder stage's wheel build and the runtime stage's install are run with
the very commands the Dockerfile uses (the test checks the Dockerfile still
contains them), into a clean virtualenv, and the entrypoint is exercised.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"

BUILD_WHEEL = "python -m pip wheel --no-deps --wheel-dir /wheels ."
INSTALL = (
    "/opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check \\\n"
    '       "$(ls /wheels/patio-*.whl)[worker,kubernetes]"'
)

pytestmark = pytest.mark.slow


def run(cmd: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    res = subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, timeout=600, env=env, check=False
    )
    assert res.returncode == 0, f"{cmd}: {res.stdout[-2000:]}{res.stderr[-2000:]}"
    return res.stdout


def test_dockerfile_shape() -> None:
    text = DOCKERFILE.read_text()
    assert "AS builder" in text and "AS runtime" in text
    assert BUILD_WHEEL in text
    assert INSTALL in text
    assert "USER 10001:10001" in text
    assert 'ENTRYPOINT ["patio"]' in text
    # The runtime stage gets the wheel, never the source tree.
    runtime = text.split("AS runtime", 1)[1]
    assert "COPY patio" not in runtime and "COPY operator" not in runtime


def test_wheel_installs_into_a_clean_venv_and_runs(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    # Builder stage (the Dockerfile copies exactly these into /src).
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        (src / name).write_bytes((ROOT / name).read_bytes())
    run(["cp", "-r", str(ROOT / "patio"), str(src / "patio")])
    (src / "operator").mkdir()
    run(["cp", "-r", str(ROOT / "operator" / "src"), str(src / "operator" / "src")])
    run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(wheels), "."],
        cwd=src,
    )
    (wheel,) = wheels.glob("patio-*.whl")
    members = zipfile.ZipFile(wheel).namelist()
    assert any(m.startswith("patio_operator/") for m in members)
    assert "patio_operator/py.typed" in members
    # Nothing may install as a top-level `operator` (it would shadow the stdlib).
    assert not any(m.startswith("operator/") for m in members)

    # Runtime stage: a fresh venv with only the wheel and its extras.
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)])
    pip = venv / "bin" / "pip"
    run([str(pip), "install", "--disable-pip-version-check", f"{wheel}[worker,kubernetes]"])
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": ""}
    env.update({k: v for k, v in os.environ.items() if k.startswith(("PIP_", "http", "HTTP"))})
    assert "worker" in run([str(venv / "bin" / "patio"), "--help"], env=env)
    out = run([str(venv / "bin" / "python"), "-m", "patio_operator", "--help"], env=env)
    assert "--rotation-check" in out
    # The examples' registry as the image ships it (PYTHONPATH=/app).
    code = "import tasks; assert {'mul', 'sleep'} <= set(tasks.rpc)"
    run(
        [str(venv / "bin" / "python"), "-c", code],
        env={**env, "PYTHONPATH": str(ROOT / "examples" / "k8s")},
    )
