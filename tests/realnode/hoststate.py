"""What a real node changes on the machine, recorded before and undone after.

kubelet, kube-proxy, containerd and the CNI plugins change the host beyond
their own folders: sysctls (``kernel.panic``, ``vm.overcommit_memory``,
``net.ipv4.ip_forward``, ...), iptables chains and tables, fixed paths
(``/var/lib/kubelet/device-plugins``, ``/var/log/containers``, ...), cgroups,
mounts. :meth:`HostState.record` takes a snapshot; :meth:`HostState.restore`
undoes every difference that is the node's and returns the ones it could not,
so that a test session leaves the machine as it found it or says what is left.

Other test sessions may run at the same time (network namespaces, bridges and
mounts of the partition lab, runc containers of the image tests), so only
what is recognisably the node's is undone: mounts under its folder or under a
fixed path it created, its bridge and the veths on it, iptables rules and
chains of kube-proxy, kubelet and the CNI plugins (``KUBE-``, ``CNI-``,
``PATIO-NODE``, or naming the bridge or its range), containerd's cgroups.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

# sysctls that change by themselves (counters, random values, clocks).
_VOLATILE_SYSCTLS = (
    "fs.dentry-state",
    "fs.file-nr",
    "fs.inode-nr",
    "fs.inode-state",
    "fs.quota.",
    "kernel.ns_last_pid",
    "kernel.random.",
    "kernel.pty.nr",
    "kernel.sched_domain",
    "kernel.tainted",
    "net.netfilter.nf_conntrack_count",
    "vm.nr_",
    "fs.aio-nr",
    "kernel.keys.",
    "kernel.perf_event_max_sample_rate",
    "fs.binfmt_misc",
)
# Fixed paths the node writes no matter its configuration.
FIXED_PATHS = (
    "/var/lib/kubelet",
    "/var/log/containers",
    "/var/log/pods",
    "/run/containerd",
    "/var/lib/containerd",
    "/opt/containerd",
    "/var/lib/cni",
    "/etc/cni",
    "/opt/cni",
    "/usr/libexec/kubernetes",
    "/var/run/nri",
    "/run/nri",
    "/etc/kubernetes",
    "/etc/cdi",
    "/run/cdi",
)
_CGROUP_ROOT = Path("/sys/fs/cgroup")
# Top-level cgroups of pods: containerd names them after its namespace
# (k8s.io) when kubelet has no QoS hierarchy; kubepods if it has.
_OUR_CGROUPS = ("k8s.io", "kubepods", "kubepods.slice")
_OUR_IPTABLES = ("KUBE-", "CNI-", "PATIO-NODE")
_TOPS = {(name,) for name in _OUR_CGROUPS}


def _quiet(*argv: str) -> None:
    """Run a clean-up step; whatever it leaves is found by comparing afterwards."""
    subprocess.run(argv, capture_output=True, check=False)


_PER_INTERFACE = re.compile(r"^net\.ipv[46]\.(conf|neigh)\.([^.]+)\.")


def _compared(key: str) -> bool:
    """Not volatile, and not of one interface (other sessions add and remove
    theirs at any time; ours go away with the interfaces)."""
    if key.startswith(_VOLATILE_SYSCTLS):
        return False
    m = _PER_INTERFACE.match(key)
    return m is None or m.group(2) in ("all", "default")


def sysctls() -> dict[str, str]:
    out = subprocess.run(["sysctl", "-a"], capture_output=True, text=True, check=False).stdout
    values: dict[str, str] = {}
    for line in out.splitlines():
        key, sep, value = line.partition(" = ")
        if sep and _compared(key):
            values[key] = value
    return values


def iptables_rules(tool: str) -> dict[str, list[str]]:
    """``{table: [":CHAIN ..." and "-A ..." lines]}`` of ``iptables-save``."""
    out = subprocess.run([f"{tool}-save"], capture_output=True, text=True, check=False).stdout
    tables: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in out.splitlines():
        if line.startswith("*"):
            current = tables.setdefault(line[1:], [])
        elif current is not None and line.startswith((":", "-A")):
            # Counters change; keep ":NAME POLICY" only.
            current.append(" ".join(line.split()[:2]) if line.startswith(":") else line)
    return tables


def cgroups() -> set[str]:
    """Every cgroup folder up to three levels deep, per controller."""
    found: set[str] = set()
    if not _CGROUP_ROOT.is_dir():
        return found
    for controller in _CGROUP_ROOT.iterdir():
        for dirpath, dirnames, _ in os.walk(controller):
            depth = Path(dirpath).relative_to(controller).parts
            if len(depth) >= 3:
                dirnames.clear()
            found.add(dirpath)
    return found


def mounts() -> list[str]:
    return [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]


def links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=False).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def bridge_ports(bridge: str) -> set[str]:
    out = subprocess.run(
        ["ip", "-o", "link", "show", "master", bridge], capture_output=True, text=True, check=False
    ).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


@dataclass
class HostState:
    workdir: str
    bridge: str
    range_prefix: str
    sysctl: dict[str, str] = field(default_factory=dict)
    iptables: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    paths: dict[str, bool] = field(default_factory=dict)
    cgroup_dirs: set[str] = field(default_factory=set)
    mount_points: list[str] = field(default_factory=list)
    link_names: set[str] = field(default_factory=set)

    def save(self, path: Path) -> None:
        data = dataclasses.asdict(self)
        for key in ("cgroup_dirs", "link_names"):
            data[key] = sorted(data[key])
        path.write_text(json.dumps(data))

    @classmethod
    def load(cls, path: Path) -> HostState:
        data = json.loads(path.read_text())
        for key in ("cgroup_dirs", "link_names"):
            data[key] = set(data[key])
        return cls(**data)

    @classmethod
    def record(cls, workdir: Path, bridge: str, range_prefix: str) -> HostState:
        """``range_prefix``: how the node's addresses start in iptables rules."""
        return cls(
            workdir=str(workdir),
            bridge=bridge,
            range_prefix=range_prefix,
            sysctl=sysctls(),
            iptables={tool: iptables_rules(tool) for tool in ("iptables", "ip6tables")},
            paths={p: os.path.lexists(p) for p in FIXED_PATHS},
            cgroup_dirs=cgroups(),
            mount_points=mounts(),
            link_names=links(),
        )

    def restore(self) -> list[str]:
        """Undo the node's changes since :meth:`record`; return what could not be undone."""
        left: list[str] = []
        left += self._unmount()
        left += self._links()
        for tool in ("iptables", "ip6tables"):
            left += self._iptables(tool)
        left += self._cgroups()
        left += self._paths()
        left += self._sysctls()
        return left

    def _ours(self, mount_point: str) -> bool:
        roots = [self.workdir, *(p for p, existed in self.paths.items() if not existed)]
        return any(mount_point == r or mount_point.startswith(r + "/") for r in roots)

    def _unmount(self) -> list[str]:
        # New mounts of ours, deepest first; each one once (a path may be stacked).
        before = set(self.mount_points)
        for _ in range(3):
            new = {m for m in mounts() if m not in before and self._ours(m)}
            if not new:
                return []
            for point in sorted(new, key=len, reverse=True):
                _quiet("umount", "-l", point)
        return [f"mount {m}" for m in mounts() if m not in before and self._ours(m)]

    def _links(self) -> list[str]:
        ours = ({self.bridge} | bridge_ports(self.bridge)) - self.link_names
        for name in sorted(ours, key=lambda n: n == self.bridge):  # the bridge last
            _quiet("ip", "link", "delete", name)
        return [f"network interface {n}" for n in ours & links()]

    def _iptables(self, tool: str) -> list[str]:
        before = self.iptables[tool]
        now = iptables_rules(tool)
        for table, lines in now.items():
            old = set(before.get(table, []))
            # Rules first (they may jump to new chains), then the new chains.
            for line in reversed(lines):
                if line.startswith("-A") and line not in old and self._our_rule(line):
                    rule = ["-D", *shlex.split(line)[1:]]
                    _quiet(tool, "-w", "-t", table, *rule)
            for line in lines:
                if line.startswith(":") and line not in old and self._our_rule(line):
                    chain = line.split()[0][1:]
                    if any(o.startswith(f":{chain} ") for o in old):
                        continue  # a built-in chain whose policy changed: below
                    _quiet(tool, "-w", "-t", table, "-F", chain)
                    _quiet(tool, "-w", "-t", table, "-X", chain)
            rules_left = [ln for ln in iptables_rules(tool).get(table, []) if ln.startswith("-A")]
            if table not in before and not rules_left:
                # A table the node created (kubelet makes empty mangle/ip6 tables).
                family = "ip6" if tool == "ip6tables" else "ip"
                _quiet("nft", "delete", "table", family, table)
        after = iptables_rules(tool)
        diff = []
        for table, lines in after.items():
            old = set(before.get(table, []))
            diff += [
                f"{tool} -t {table}: {ln}" for ln in lines if ln not in old and self._our_rule(ln)
            ]
            if table not in before:
                diff.append(f"{tool} table {table}")
        return diff

    def _our_rule(self, line: str) -> bool:
        return any(m in line for m in (*_OUR_IPTABLES, self.bridge, self.range_prefix))

    def _our_cgroups(self) -> list[str]:
        new = cgroups() - self.cgroup_dirs
        ours = [p for p in new if Path(p).relative_to(_CGROUP_ROOT).parts[1:2] in _TOPS]
        return sorted(ours, key=len, reverse=True)

    def _cgroups(self) -> list[str]:
        for path in self._our_cgroups():
            with contextlib.suppress(OSError):
                os.rmdir(path)
        return [f"cgroup {p}" for p in self._our_cgroups()]

    def _paths(self) -> list[str]:
        for path, existed in self.paths.items():
            if not existed and os.path.lexists(path):
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        os.unlink(path)
        return [f"path {p}" for p, e in self.paths.items() if not e and os.path.lexists(p)]

    def _sysctls(self) -> list[str]:
        now = sysctls()
        before = {k: v for k, v in self.sysctl.items() if _compared(k)}
        for key, value in before.items():
            if now.get(key) != value:
                _quiet("sysctl", "-q", "-w", f"{key}={value}")
        after = sysctls()
        return [
            f"sysctl {k}: {after.get(k)!r}, was {v!r}"
            for k, v in before.items()
            if after.get(k) != v
        ]
