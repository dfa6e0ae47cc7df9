"""Bandwidth-shaped links between local ranks: one network namespace per rank, tc tbf on every link.

Two ranks get a veth pair; more ranks get a bridge that lives in its own hub namespace, so nothing
is ever added to the host's namespace. Only addresses inside namespaces made here are used. Names
carry the process id and a counter, so concurrent runs never collide, and ``Links`` always deletes
what it created (deleting a namespace removes its veth ends and qdiscs too).
"""

from __future__ import annotations

import itertools
import os
import subprocess
from dataclasses import dataclass, field

from krakenlm.errors import KrakenError

_COUNTER = itertools.count()
PREFIX = "kbench"


class NetnsUnavailable(KrakenError):
    """Namespaces, veth or tbf cannot be created here (not root, no iproute2, no kernel support)."""


def _ip(*args: str, ns: str | None = None) -> None:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(args)
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=30)
    except FileNotFoundError as err:
        raise NetnsUnavailable(f"netns: {cmd[0]} not found") from err
    except subprocess.CalledProcessError as err:
        raise NetnsUnavailable(f"netns: `{' '.join(cmd)}` failed: {err.stderr.strip()}") from err


def list_namespaces(prefix: str = PREFIX) -> list[str]:
    """Our namespaces that currently exist (used by tests to check cleanup)."""
    try:
        out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    except FileNotFoundError:
        return []
    return [line.split()[0] for line in out.splitlines() if line.startswith(prefix)]


@dataclass
class Links:
    """Context manager: ``world`` namespaces joined at ``gbit`` Gbit/s; attributes give each rank's
    namespace, address and interface name."""

    world: int
    gbit: float
    namespaces: list[str] = field(default_factory=list)
    addresses: list[str] = field(default_factory=list)
    interfaces: list[str] = field(default_factory=list)
    _created: list[str] = field(default_factory=list)

    def __enter__(self) -> Links:
        tag = f"{os.getpid() % 100000}x{next(_COUNTER)}"
        subnet = 200 + (os.getpid() + next(_COUNTER)) % 50
        try:
            self.namespaces = [f"{PREFIX}-{tag}-r{r}" for r in range(self.world)]
            self.addresses = [f"10.{subnet}.{r // 250}.{r % 250 + 1}" for r in range(self.world)]
            self.interfaces = [f"kb{tag}r{r}"[:15] for r in range(self.world)]
            for ns in self.namespaces:
                self._add_namespace(ns)
            if self.world == 2:
                self._veth(self.interfaces[0], self.namespaces[0], self.interfaces[1], self.namespaces[1])
            else:
                self._bridge(tag)
            for ns, dev, addr in zip(self.namespaces, self.interfaces, self.addresses, strict=True):
                _ip("ip", "addr", "add", f"{addr}/16", "dev", dev, ns=ns)
                _ip("ip", "link", "set", dev, "up", ns=ns)
                self._shape(dev, ns)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _add_namespace(self, ns: str) -> None:
        _ip("ip", "netns", "add", ns)
        self._created.append(ns)
        _ip("ip", "link", "set", "lo", "up", ns=ns)

    def _veth(self, a: str, ns_a: str, b: str, ns_b: str) -> None:
        _ip("ip", "link", "add", a, "netns", ns_a, "type", "veth", "peer", "name", b, "netns", ns_b)

    def _bridge(self, tag: str) -> None:
        hub = f"{PREFIX}-{tag}-hub"
        self._add_namespace(hub)
        _ip("ip", "link", "add", "br0", "type", "bridge", ns=hub)
        _ip("ip", "link", "set", "br0", "up", ns=hub)
        for r, ns in enumerate(self.namespaces):
            port = f"p{r}"
            self._veth(self.interfaces[r], ns, port, hub)
            _ip("ip", "link", "set", port, "master", "br0", ns=hub)
            _ip("ip", "link", "set", port, "up", ns=hub)
            self._shape(port, hub)

    def _shape(self, dev: str, ns: str) -> None:
        rate = f"{self.gbit * 1000:g}mbit"
        _ip("tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate, "burst", "128kb",
            "latency", "50ms", ns=ns)

    def close(self) -> None:
        for ns in reversed(self._created):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        self._created.clear()

    def prefix(self, rank: int) -> list[str]:
        """Command prefix that runs a program inside rank's namespace."""
        return ["ip", "netns", "exec", self.namespaces[rank]]
