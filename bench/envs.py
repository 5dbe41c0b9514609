"""Interpreters the benchmark runs: ours, the original patio, tool venvs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORKERS = Path(__file__).resolve().parent / "workers"
ORIGINAL_VERSION = "0.1.4"


def cache_dir() -> Path:
    base = os.environ.get("PATIO_CACHE_DIR") or str(Path.home() / ".cache" / "patio")
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass(frozen=True)
class PythonEnv:
    """An interpreter plus the environment variables to start it with."""

    python: str
    extra_env: dict[str, str]
    # run with ``-E -s`` (no PYTHONPATH, no user site: nothing from the work tree leaks in)
    isolated: bool

    def command(self, script: Path, *args: str) -> list[str]:
        flags = ["-E", "-s"] if self.isolated else []
        return [self.python, *flags, str(script), *args]

    def environ(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        env.update(self.extra_env)
        return env

    def can_import(self, module: str) -> bool:
        flags = ["-E", "-s"] if self.isolated else []
        proc = subprocess.run(
            [self.python, *flags, "-c", f"import {module}"],
            env=self.environ(),
            capture_output=True,
            timeout=60,
            check=False,
        )
        return proc.returncode == 0


def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure_venv(
    name: str, requirements: list[str], log: Path | None = None, timeout: float = 900
) -> Path:
    """Create ``<cache>/<name>`` with ``requirements`` unless it already has them.

    A marker file records what was installed; a venv whose marker matches is
    reused as is, so a cached run costs nothing here.
    """
    venv = cache_dir() / name
    marker = venv / ".bench-requirements.json"
    want = sorted(requirements)
    if marker.exists() and _venv_python(venv).exists():
        try:
            if json.loads(marker.read_text()) == want:
                return _venv_python(venv)
        except ValueError:
            pass
    out = open(log, "a") if log else subprocess.DEVNULL  # noqa: SIM115
    try:
        if not _venv_python(venv).exists():
            subprocess.run(
                [sys.executable, "-m", "venv", str(venv)],
                check=True,
                stdout=out,
                stderr=out,
                timeout=timeout,
            )
        subprocess.run(
            [
                str(_venv_python(venv)),
                "-m",
                "pip",
                "install",
                "-q",
                "--disable-pip-version-check",
                *requirements,
            ],
            check=True,
            stdout=out,
            stderr=out,
            timeout=timeout,
        )
    finally:
        if log:
            out.close()  # type: ignore[union-attr]
    marker.write_text(json.dumps(want))
    return _venv_python(venv)


def ours_env(tree: Path | None = None) -> PythonEnv:
    """Our package from the work tree (or from ``tree``, e.g. another checkout
    to compare a change), run by the project's ``.venv``."""
    venv_python = REPO / ".venv" / "bin" / "python"
    python = str(venv_python if venv_python.exists() else Path(sys.executable))
    return PythonEnv(python=python, extra_env={"PYTHONPATH": str(tree or REPO)}, isolated=False)


def original_env(log: Path | None = None) -> PythonEnv:
    """``patio==0.1.4`` from PyPI in its own venv (with msgpack and uvloop,
    which the ceiling worker and the loop policy need there too)."""
    python = ensure_venv(
        f"bench-venv-patio-{ORIGINAL_VERSION}",
        [f"patio=={ORIGINAL_VERSION}", "msgpack", "uvloop"],
        log=log,
    )
    return PythonEnv(python=str(python), extra_env={}, isolated=True)


def ceiling_env() -> PythonEnv:
    """The raw-asyncio RPC: needs only msgpack (and uvloop), from ``.venv``."""
    venv_python = REPO / ".venv" / "bin" / "python"
    python = str(venv_python if venv_python.exists() else Path(sys.executable))
    return PythonEnv(python=python, extra_env={}, isolated=True)
