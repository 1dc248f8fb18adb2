"""A worker's admission: connection bounds per node (and open files), workload and source,
handshake bounds, shedding counted per workload and logged at a bounded rate, memory trimmed
after a burst (agent.proxy.admission)."""

from __future__ import annotations

import logging

import pytest

from agent.config import LimitsConfig
from agent.proxy.admission import FD_RESERVE, FDS_PER_RELAY, LOG_INTERVAL, Admission, ShedLog
from agent.proxy.workload import ServedWorkload

PEER, OTHER = "10.0.0.9", "10.0.0.10"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _admission(fd_limit: int = 1 << 20, workers: int = 1, **limits: int) -> Admission:
    trims: list[int] = []
    admission = Admission(LimitsConfig(**limits), workers, fd_limit, wall=lambda: 1000.0,
                          trim=lambda: trims.append(1))  # fmt: skip
    admission.trims = trims  # type: ignore[attr-defined]
    return admission


def _take(
    admission: Admission, wl: ServedWorkload, peer: str, inbound: bool = True, fds: int = 6
) -> bool:
    if not admission.admit(wl, peer, inbound, fds):
        return False
    admission.opened(object(), peer if inbound else "", fds)
    return True


def test_one_source_cannot_take_the_room_of_the_others() -> None:
    admission = _admission(connections_per_source=4, workers=2)  # 2 per worker
    wl = ServedWorkload("b", -1)
    held = []
    for _ in range(2):
        assert admission.admit(wl, PEER, inbound=True)
        held.append(object())
        admission.opened(held[-1], PEER, FDS_PER_RELAY)
    assert not admission.admit(wl, PEER, inbound=True)
    assert wl.shed["connections_per_source"].count == 1
    assert wl.shed["connections_per_source"].last_peer == PEER
    assert _take(admission, wl, OTHER)  # another peer still has room
    assert _take(admission, wl, PEER, inbound=False)  # outbound: not a source's share
    admission.closed(held.pop())
    assert admission.admit(wl, PEER, inbound=True)  # room again once one closed
    assert admission.connections == 3 and admission.by_peer == {PEER: (1, 6), OTHER: (1, 6)}


def test_the_worker_s_share_of_the_node_is_shed() -> None:
    admission = _admission(connections_per_node=6, workers=2)
    wl = ServedWorkload("b", -1)
    assert [_take(admission, wl, f"10.0.1.{i}") for i in range(4)] == [True] * 3 + [False]
    assert wl.shed["connections_per_node"].last_peer == "10.0.1.3"


def test_descriptors_are_counted_and_one_peer_gets_at_most_its_part_of_them() -> None:
    """Room for 8 plaintext relays (6 descriptors each): one peer may hold 3/4 of it, the rest
    is left for the others; a tunnel stream (one descriptor) fits where a relay does not."""
    admission = _admission(fd_limit=FD_RESERVE + 8 * FDS_PER_RELAY)
    wl = ServedWorkload("b", -1)
    assert [_take(admission, wl, PEER) for _ in range(7)] == [True] * 6 + [False]
    assert wl.shed["connections_per_source"].last_peer == PEER
    assert _take(admission, wl, OTHER) and _take(admission, wl, OTHER, fds=1)
    assert not _take(admission, wl, OTHER)
    assert wl.shed["open_files"].last_peer == OTHER
    assert _take(admission, wl, "10.0.0.11", fds=1)
    assert admission.fds == 7 * FDS_PER_RELAY + 2


def test_handshakes_are_bounded_per_worker_and_per_source() -> None:
    admission = _admission(handshakes_per_worker=3, handshakes_per_source=2)
    wl = ServedWorkload("b", -1)
    assert admission.handshake(wl, PEER) and admission.handshake(wl, PEER)
    assert not admission.handshake(wl, PEER)
    assert admission.handshake(wl, OTHER)
    assert not admission.handshake(wl, "10.0.0.11")
    assert set(wl.shed) == {"handshakes_per_source", "handshakes_per_worker"}
    admission.handshake_over(PEER)
    assert admission.handshake(wl, PEER)


def test_a_limit_is_logged_once_then_counted_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    shed_log = ShedLog(clock)
    with caplog.at_level(logging.WARNING, "ferry.proxy.limits"):
        for _ in range(10_000):
            shed_log.shed("back/api", "connections_per_source", PEER)
        shed_log.flush()
        assert len(caplog.records) == 1
        assert "connections_per_source" in caplog.text and PEER in caplog.text
        clock.now += LOG_INTERVAL
        shed_log.flush()
    assert len(caplog.records) == 2
    assert "9999 more refusal(s)" in caplog.records[1].getMessage()


def test_memory_is_trimmed_once_a_burst_is_over() -> None:
    admission = _admission()
    wl = ServedWorkload("b", -1)
    held = [object() for _ in range(300)]
    for h in held:
        assert admission.admit(wl, PEER, inbound=False)
        admission.opened(h, "", 1)
    admission.sweep(0)
    assert admission.trims == []  # type: ignore[attr-defined]
    for h in held[:200]:
        admission.closed(h)
    admission.sweep(0)
    assert admission.trims == [1]  # type: ignore[attr-defined]
    admission.sweep(0)
    assert admission.trims == [1]  # type: ignore[attr-defined]
