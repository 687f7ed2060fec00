"""Kernel-enforced links for benchmarks: each tier server in its own network namespace.

The client-side emulator (`tierwise.net.shaping`) paces bytes in Python. This module is the
independent check on it: the Linux kernel enforces the bandwidth, so whatever the client, the
server or the HTTP stack does, bytes cannot cross the link faster than the set rate.

Layout, per tier::

    root namespace                         namespace tierwise-<pid>-<seq>-<tier>
    tw<pid>-<seq>r<i>  10.231.<b>.1/30  <── veth ──>  tw<pid>-<seq>n<i>  10.231.<b>.2/30
    egress qdisc: tbf = uplink                       egress qdisc: tbf = downlink

A qdisc only shapes what leaves an interface, so the uplink (device → tier) is the egress
qdisc of the root-side end and the downlink (tier → device) that of the namespace-side end.
Servers bind to the namespace-side address; clients in the root namespace connect to it, and
routing sends every byte through the veth pair and its two qdiscs. Names carry the pid (in hex
for the 15-character interface names) and the subnets are picked under a file lock, so parallel
runs never clash; namespaces left by a killed run are reaped by the next one.

Why tbf (a token bucket) and no netem: this kernel has no netem, and netem is not needed here,
since the RTT is added by the client transport. tbf is the simplest qdisc that enforces a rate
(htb would do the same with more set-up; it has the same one-packet credit described below).

What a token bucket means for the measurements (measured here; `tests/test_tc_links.py` checks
the rates, the one-frame burst and rate changes under load):

* Rates are TCP goodput. tbf counts whole Ethernet frames: a full segment is 1514 bytes on
  the wire for 1448 bytes of payload, so the qdisc rate is raised by that ratio and a bulk
  transfer of n payload bytes takes n / rate, as with the emulator.
* The bucket must hold at least one full frame, or tbf drops every full-size packet and TCP
  stalls for good: `burst` is never below `MIN_BURST_BYTES`. At high rates it is a couple of
  milliseconds' worth, because the qdisc watchdog cannot wake per packet without losing rate.
* After an idle period the bucket is full, so the first `burst` bytes (≥ one packet, ~1.5 KB)
  leave at once. Unnoticeable at 100 KB/s (15 ms), but at 1 KB/s 2 KB take 0.7–0.9 s rather
  than 2 s, and 10 KB take 8.7 s rather than 10 s. A token bucket cannot do better (htb has
  the same credit); a real serialising link, or the emulator, would.
* ACKs share the reverse direction: about 66 bytes per two or three segments. With up and
  down more than ~50× apart the slow side's ACKs throttle the fast side (5 MB/s up over
  50 KB/s down: 79% of the rate; over 20 KB/s: 26%), as on a real asymmetric link.
* The queue (`limit`) is deep, at least a second's worth: the emulator's pipe never drops, and
  drops at low rates would make TCP stall in retransmission timeouts rather than queue.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from itertools import count
from pathlib import Path
from types import TracebackType
from typing import Any

from tierwise.config import format_rate

# Payload → wire: a 1448-byte TCP segment (MSS with timestamps) is a 1514-byte Ethernet frame.
WIRE_BYTES_PER_PAYLOAD_BYTE = 1514 / 1448
# One full frame (1514 bytes) plus margin: tc stores the burst as time and rounds it down.
MIN_BURST_BYTES = 1600
# Bucket size at high rates, in seconds of rate (2 ms: 20 KB at 10 MB/s).
BURST_S = 0.002
# Queue depth: at least this many seconds of traffic, and at least this many bytes.
LIMIT_S = 1.0
MIN_LIMIT_BYTES = 256 * 1024
# tc stores the burst as a 32-bit count of 1/64 µs ticks (67 s): below ~25 B/s a one-frame
# burst no longer fits, so very low rates are refused rather than silently stalling.
MIN_RATE_BYTES_PER_S = 100.0

_TIER_NAME = re.compile(r"^[A-Za-z0-9_]{1,32}$")
_NS_PREFIX = "tierwise-"
_LOCK_FILE = Path("/run/tierwise-tc.lock")
_SUBNET_RE = re.compile(r"\binet 10\.231\.(\d+)\.\d+/")
_sequence = count()  # several NamespaceLinks in one process need distinct names too


class TcUnavailableError(RuntimeError):
    """Kernel-enforced links cannot be set up here; the message says why."""


def tc_unavailable_reason() -> str | None:
    """None when kernel-enforced links can be used here, else why not (for pytest skip messages)."""
    if os.geteuid() != 0:
        return "kernel-enforced links need root (network namespaces and tc)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"kernel-enforced links need `{tool}` (iproute2), not found on PATH"
    try:
        # The only real test: make a namespace, a veth pair and a tbf qdisc, then remove them.
        with NamespaceLinks(["probe"], {"probe": (1e6, 1e6)}):
            pass
    except TcUnavailableError as error:
        return str(error)
    return None


def _run(command: list[str]) -> str:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=30,
                                check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise TcUnavailableError(f"`{' '.join(command)}` failed: {error}") from error
    if result.returncode != 0:
        raise TcUnavailableError(f"`{' '.join(command)}` failed ({result.returncode}): "
                                 f"{result.stderr.strip()}")
    return result.stdout


def _tbf(rate_bytes_per_s: float) -> list[str]:
    """tbf parameters for a goodput rate. In tc, `bps` is BYTES per second (`bit` is bits)."""
    if not rate_bytes_per_s >= MIN_RATE_BYTES_PER_S:
        raise ValueError(f"rate {rate_bytes_per_s!r} B/s is below the supported "
                         f"{MIN_RATE_BYTES_PER_S:g} B/s")
    wire = rate_bytes_per_s * WIRE_BYTES_PER_PAYLOAD_BYTE
    burst = max(MIN_BURST_BYTES, round(wire * BURST_S))
    limit = max(MIN_LIMIT_BYTES, round(wire * LIMIT_S))
    return ["tbf", "rate", f"{round(wire)}bps", "burst", str(burst), "limit", str(limit)]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class NamespaceLinks:
    """Context manager: one network namespace per tier, each with a veth pair to the root namespace.

    `rates` maps each tier to (uplink, downlink) in bytes of TCP payload per second.
    """

    def __init__(self, tiers: list[str], rates: dict[str, tuple[float, float]]) -> None:
        for tier in tiers:
            if not _TIER_NAME.match(tier):
                raise ValueError(f"tier name {tier!r}: expected letters, digits or '_'")
            if tier not in rates:
                raise ValueError(f"no rates given for tier {tier!r}")
            for rate in rates[tier]:
                _tbf(rate)  # refuses unsupported rates now, not halfway through set-up
        self.tiers = list(tiers)
        self.rates = {tier: rates[tier] for tier in tiers}
        self._namespaces: dict[str, str] = {}
        self._root_veths: dict[str, str] = {}
        self._ns_veths: dict[str, str] = {}
        self._addresses: dict[str, str] = {}
        self._processes: list[subprocess.Popen[Any]] = []

    def __enter__(self) -> NamespaceLinks:
        try:
            self._create()
        except BaseException:
            self._cleanup()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._cleanup()

    def _create(self) -> None:
        pid, seq = os.getpid(), next(_sequence)
        # Allocation and creation under one lock, so parallel runs never pick the same subnet.
        with _allocation_lock():
            _reap_stale_namespaces()
            used = {int(b) for b in _SUBNET_RE.findall(_run(["ip", "-4", "-o", "addr", "show"]))}
            free = [b for b in range(256) if b not in used]
            if len(free) < len(self.tiers):
                raise TcUnavailableError("no free 10.231.<b>.0/30 subnet in the root namespace")
            for index, (tier, block) in enumerate(zip(self.tiers, free, strict=False)):
                namespace = f"{_NS_PREFIX}{pid}-{seq}-{tier}"
                root_veth, ns_veth = f"tw{pid:x}-{seq:x}r{index}", f"tw{pid:x}-{seq:x}n{index}"
                if len(root_veth) > 15:  # IFNAMSIZ - 1
                    raise TcUnavailableError(f"interface name {root_veth!r} is too long")
                _run(["ip", "netns", "add", namespace])
                self._namespaces[tier] = namespace
                _run(["ip", "link", "add", root_veth, "type", "veth",
                      "peer", "name", ns_veth, "netns", namespace])
                self._root_veths[tier], self._ns_veths[tier] = root_veth, ns_veth
                _run(["ip", "addr", "add", f"10.231.{block}.1/30", "dev", root_veth])
                _run(["ip", "link", "set", root_veth, "up"])
                _run(["ip", "-n", namespace, "addr", "add", f"10.231.{block}.2/30",
                      "dev", ns_veth])
                _run(["ip", "-n", namespace, "link", "set", ns_veth, "up"])
                _run(["ip", "-n", namespace, "link", "set", "lo", "up"])
                self._addresses[tier] = f"10.231.{block}.2"
        for tier in self.tiers:
            self.set_rate(tier, *self.rates[tier])

    def address(self, tier: str) -> str:
        """The tier's IP inside its namespace: what servers bind to and clients connect to."""
        return self._addresses[tier]

    def namespace(self, tier: str) -> str:
        return self._namespaces[tier]

    def set_rate(self, tier: str, up_bytes_per_s: float, down_bytes_per_s: float) -> None:
        """Change both directions; safe while traffic flows (queued packets are kept)."""
        up, down = _tbf(up_bytes_per_s), _tbf(down_bytes_per_s)
        _run(["tc", "qdisc", "replace", "dev", self._root_veths[tier], "root", *up])
        _run(["tc", "-n", self._namespaces[tier], "qdisc", "replace",
              "dev", self._ns_veths[tier], "root", *down])
        self.rates[tier] = (up_bytes_per_s, down_bytes_per_s)

    def popen(self, tier: str, argv: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Run `argv` inside the tier's namespace; it is terminated when the links close."""
        # `ip netns exec` execs argv in place, so the Popen's pid is the program itself.
        process = subprocess.Popen(["ip", "netns", "exec", self._namespaces[tier], *argv],
                                   **kwargs)
        self._processes.append(process)
        return process

    def describe(self) -> str:
        parts = [f"{tier} up {format_rate(up)} down {format_rate(down)}"
                 for tier, (up, down) in self.rates.items()]
        return "kernel-enforced (tc tbf on veth, netns): " + "; ".join(parts)

    def _cleanup(self) -> None:
        """Best effort and silent: it runs on the way out of errors too."""
        for process in self._processes:
            _stop(process)
        self._processes.clear()
        for tier, namespace in self._namespaces.items():
            _kill_namespace_processes(namespace)
            # Deleting one end of a veth deletes both; do it explicitly in case a process we
            # do not know of keeps the namespace (and so its veth and address) alive.
            if tier in self._root_veths:
                _quiet(["ip", "link", "del", self._root_veths[tier]])
            _quiet(["ip", "netns", "del", namespace])
        self._namespaces.clear()
        self._root_veths.clear()
        self._ns_veths.clear()
        self._addresses.clear()


def _stop(process: subprocess.Popen[Any], timeout_s: float = 5.0) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _quiet(command: list[str]) -> None:
    subprocess.run(command, capture_output=True, timeout=30, check=False)


def _kill_namespace_processes(namespace: str) -> None:
    """Kill, by pid, whatever still runs in one of our namespaces (e.g. a server's children)."""
    listing = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True,
                             text=True, timeout=30, check=False)
    for pid in (int(word) for word in listing.stdout.split() if word.isdigit()):
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _reap_stale_namespaces() -> None:
    """Delete namespaces left by a tierwise process that died without cleaning up.

    They would keep their veth and so their subnet in the root namespace. Only namespaces
    named by this module whose creating process no longer exists are touched.
    """
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                             timeout=30, check=False)
    for line in listing.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        match = re.match(rf"^{_NS_PREFIX}(\d+)-\d+-", name)
        if match and not _pid_alive(int(match.group(1))):
            _kill_namespace_processes(name)
            # The kernel frees a deleted namespace's veths lazily; delete them now so their
            # subnets are free for the scan that follows.
            veths = subprocess.run(["ip", "-n", name, "-o", "link", "show", "type", "veth"],
                                   capture_output=True, text=True, timeout=30, check=False)
            for veth in re.findall(r"^\d+: ([^@:]+)", veths.stdout, re.MULTILINE):
                _quiet(["ip", "-n", name, "link", "del", veth])
            _quiet(["ip", "netns", "del", name])


@contextmanager
def _allocation_lock() -> Iterator[None]:
    with open(_LOCK_FILE, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
