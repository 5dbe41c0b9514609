"""Run the project's image, built by ``hack/image/build.sh``, as OCI containers with runc.

:class:`Image` finds the build of the current sources in the cache (and says
how to make it when it is missing); :func:`bundle_config` turns the image's
own config (``User``, ``Env``, ``WorkingDir``, ``Entrypoint``) into a runc
``config.json`` with a read-only root filesystem, no capabilities and
``noNewPrivileges``; :class:`Runc` runs containers under a state folder of
the test's own, and :func:`netns` makes a network namespace for them that is
removed afterwards.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.kube import procs

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "hack" / "image" / "build.sh"


class ImageMissingError(RuntimeError):
    pass


@dataclass(frozen=True)
class Image:
    dir: Path
    config: dict[str, Any]

    @classmethod
    def find(cls) -> Image:
        """The image of the sources as they are now; raises if it was not built."""
        out = subprocess.run(
            ["bash", str(BUILD), "--print-dir"], capture_output=True, text=True, check=True
        )
        path = Path(out.stdout.strip())
        if not (path / ".done").is_file():
            raise ImageMissingError(
                f"the image of these sources is not built ({path} is missing): "
                f"run `bash {BUILD.relative_to(ROOT)}` (scripts/test.sh does)"
            )
        return cls(path, json.loads((path / "config.json").read_text()))

    @property
    def archive(self) -> Path:
        """The OCI archive, image name ``patio:dev``."""
        return self.dir / "image.tar"

    def unpack(self, dest: Path) -> Path:
        """Extract the root filesystem into ``dest`` (owners kept) and return it."""
        dest.mkdir(parents=True)
        subprocess.run(
            ["tar", "--numeric-owner", "-xpf", str(self.dir / "rootfs.tar"), "-C", str(dest)],
            check=True,
        )
        return dest

    def user(self) -> tuple[int, int]:
        uid, _, gid = str(self.config["User"]).partition(":")
        return int(uid), int(gid or uid)


def bundle_config(
    image: Image,
    rootfs: Path,
    args: Sequence[str],
    *,
    netns: Path,
    entrypoint: bool = True,
    hostname: str = "patio",
) -> dict[str, Any]:
    """A runc config that runs ``args`` the way a container runtime runs the image."""
    uid, gid = image.user()
    argv = [*image.config.get("Entrypoint", []), *args] if entrypoint else list(args)
    no_caps: list[str] = []
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": uid, "gid": gid},
            "args": argv,
            "env": [*image.config.get("Env", []), f"HOSTNAME={hostname}"],
            "cwd": image.config.get("WorkingDir") or "/",
            "capabilities": dict.fromkeys(
                ("bounding", "effective", "permitted", "inheritable", "ambient"), no_caps
            ),
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 4096, "soft": 4096}],
            "noNewPrivileges": True,
        },
        "root": {"path": str(rootfs), "readonly": True},
        "hostname": hostname,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {
                "destination": "/dev",
                "type": "tmpfs",
                "source": "tmpfs",
                "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
            },
            {
                "destination": "/dev/pts",
                "type": "devpts",
                "source": "devpts",
                "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"],
            },
            {
                "destination": "/dev/shm",
                "type": "tmpfs",
                "source": "shm",
                "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
            },
            {
                "destination": "/sys",
                "type": "sysfs",
                "source": "sysfs",
                "options": ["nosuid", "noexec", "nodev", "ro"],
            },
        ],
        "linux": {
            "namespaces": [
                {"type": "pid"},
                {"type": "ipc"},
                {"type": "uts"},
                {"type": "mount"},
                {"type": "network", "path": str(netns)},
            ],
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys"],
        },
    }


class Runc:
    """runc with a state folder of its own (never the machine's /run/runc)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.state = workdir / "runc-state"
        self.state.mkdir(parents=True, exist_ok=True)
        self._ids: list[str] = []
        runc = shutil.which("runc")
        if runc is None:
            raise ImageMissingError("runc is not installed (apt-get install runc)")
        self.binary = runc

    def _bundle(self, name: str, config: dict[str, Any]) -> Path:
        bundle = self.workdir / name
        bundle.mkdir()
        (bundle / "config.json").write_text(json.dumps(config))
        self._ids.append(name)
        return bundle

    def run(
        self, name: str, config: dict[str, Any], timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run to completion in the foreground; stdout/stderr captured."""
        bundle = self._bundle(name, config)
        try:
            return subprocess.run(
                [self.binary, "--root", str(self.state), "run", "--bundle", str(bundle), name],
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
                stdin=subprocess.DEVNULL,
            )
        finally:
            self.delete(name)

    def start(self, name: str, config: dict[str, Any]) -> subprocess.Popen[bytes]:
        """Start in the background (runc stays in the foreground of its own process)."""
        bundle = self._bundle(name, config)
        return procs.spawn(
            [self.binary, "--root", str(self.state), "run", "--bundle", str(bundle), name],
            log=self.workdir / f"{name}.log",
        )

    def log(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def state_of(self, name: str) -> dict[str, Any] | None:
        res = subprocess.run(
            [self.binary, "--root", str(self.state), "state", name],
            capture_output=True,
            text=True,
            check=False,
        )
        return json.loads(res.stdout) if res.returncode == 0 else None

    def delete(self, name: str) -> None:
        subprocess.run(
            [self.binary, "--root", str(self.state), "delete", "--force", name],
            capture_output=True,
            check=False,
        )

    def delete_all(self) -> None:
        for name in self._ids:
            self.delete(name)
        self._ids.clear()


@contextlib.contextmanager
def netns(name: str) -> Iterator[Path]:
    """A network namespace with loopback up, removed on exit."""
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield Path("/run/netns") / name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def proc_ids(pid: int) -> tuple[int, int]:
    """(real uid, real gid) of a host process."""
    uid = gid = -1
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            uid = int(line.split()[1])
        elif line.startswith("Gid:"):
            gid = int(line.split()[1])
    return uid, gid
