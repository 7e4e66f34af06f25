"""A network namespace joined to the host by a veth pair: a real network path to break.

Setting the namespace's end of the veth down drops every packet silently, in the kernel:
no RST, no ICMP, no ACK. That is what a load balancer or NAT that forgot a flow looks like
to the client's TCP stack, and the only way to test kernel keepalive and TCP_USER_TIMEOUT.
Needs root (CAP_NET_ADMIN) and iproute2, as CI machines of this project have.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


class NetNamespace:
    """``with NetNamespace() as ns``: run a server under ``ns.wrapper`` bound to ``ns.address``."""

    def __init__(self) -> None:
        tag = os.getpid() % 100_000
        self.name = f"asyncgone{tag}"
        self.host_if = f"agh{tag}"
        self.ns_if = f"agn{tag}"
        # A /30 of its own inside 10.231.0.0/16, chosen by the process id.
        base = (tag % 16_000) * 4
        self.host_address = f"10.231.{base // 256}.{base % 256 + 1}"
        self.address = f"10.231.{base // 256}.{base % 256 + 2}"
        self.wrapper = ("ip", "netns", "exec", self.name)

    def __enter__(self) -> NetNamespace:
        try:
            _ip("netns", "add", self.name)
            _ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
            _ip("link", "set", self.ns_if, "netns", self.name)
            _ip("addr", "add", f"{self.host_address}/30", "dev", self.host_if)
            _ip("link", "set", self.host_if, "up")
            _ip(
                "netns",
                "exec",
                self.name,
                "ip",
                "addr",
                "add",
                f"{self.address}/30",
                "dev",
                self.ns_if,
            )
            _ip("netns", "exec", self.name, "ip", "link", "set", self.ns_if, "up")
            _ip("netns", "exec", self.name, "ip", "link", "set", "lo", "up")
        except (OSError, subprocess.CalledProcessError) as exc:
            self.__exit__()
            detail = getattr(exc, "stderr", "") or exc
            raise RuntimeError(
                f"could not build a network namespace for the kernel blackhole tests ({detail}); "
                "they need root and iproute2"
            ) from exc
        return self

    def blackhole(self) -> None:
        """Drop every packet on the path, silently."""
        _ip("netns", "exec", self.name, "ip", "link", "set", self.ns_if, "down")

    def restore(self, port: int | None = None) -> None:
        """Bring the path back; with ``port``, wait until it accepts connections again."""
        _ip("netns", "exec", self.name, "ip", "link", "set", self.ns_if, "up")
        # Neighbour entries that failed while the link was down would refuse new connections
        # (EHOSTUNREACH) until they expire.
        _ip("neigh", "flush", "dev", self.host_if)
        _ip("netns", "exec", self.name, "ip", "neigh", "flush", "dev", self.ns_if)
        if port is None:
            return
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection((self.address, port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, check=False)
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True, check=False)
