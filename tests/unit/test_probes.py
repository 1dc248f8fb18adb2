"""The node's probe SNAT chain as data (golden files), and how the pods let its source in.

Regenerate the golden files with `UPDATE_GOLDEN=1 pytest tests/unit/test_probes.py` and review the
diff; tests/e2e/test_kube_probes.py runs the chain for real, with each in-pod backend.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.config import RedirectionConfig
from agent.redirect.probes import host_rules
from agent.redirect.rules import PROBE_SOURCE, Family, desired_rules, render

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
PODS = ["10.244.1.7", "fd00:10:244:1::7", "10.244.1.3", "10.244.1.7"]


@pytest.mark.parametrize("family", [4, 6])
def test_golden(family: Family) -> None:
    path = GOLDEN / f"probes_v{family}.golden"
    text = render(host_rules(PODS), family)
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(text)
    assert path.exists(), f"{path} is missing; run with UPDATE_GOLDEN=1 to create it"
    assert text == path.read_text(), f"{path} differs; run with UPDATE_GOLDEN=1 and review"


def test_one_rule_per_pod_address_and_no_chain_without_pods() -> None:
    rules = host_rules(PODS).rules
    snat = [r.destination for r in rules if r.chain == "FERRY_POSTROUTING"]
    assert snat == ["10.244.1.3/32", "10.244.1.7/32", "fd00:10:244:1::7/128"]
    assert host_rules([]).is_empty()
    assert all(r.family == 4 for r in host_rules(PODS, ipv6=False).rules)


def test_every_pod_lets_the_probe_source_in_before_the_inbound_redirect() -> None:
    for family in (4, 6):
        prerouting = [
            r
            for r in desired_rules(RedirectionConfig()).rules
            if r.family == family and r.table == "nat" and r.chain == "FERRY_PREROUTING"
        ]
        targets = [(r.source, r.target.name) for r in prerouting]
        assert (PROBE_SOURCE[family], "RETURN") in targets[:-1]
        assert targets[-1] == (None, "REDIRECT")
