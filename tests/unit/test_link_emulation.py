"""Pure parts of issue 5: link delay with FIFO links, the link table, probe-based link estimation, the simulated
battery, settings and cluster TOML for links/slowdown/power, and the new wire messages."""

from __future__ import annotations

import math

import pytest

from splitinfer.messages import (ClusterState, GetState, LinkReport, LinkSpec, LinkState, Probe, ProbeReply,
                                 SetLinks, decode, encode)
from splitinfer.monitor.links import MBIT, LinkEmulator, LinkParams, LinkTable, estimate_link, link_params
from splitinfer.monitor.runtime import BatterySim, system_load
from splitinfer.config import Settings


def test_link_delay_is_the_planner_hop_cost():
    """One tensor on an idle link: RTT + bytes / bandwidth, the figure planner.costmodel charges (minus broker)."""
    from splitinfer.planner.model import Cluster, Link, Server
    from splitinfer.planner.costmodel import CostModel
    from splitinfer.planner.model import BrokerOverhead, CostGraph, CostNode

    em = LinkEmulator(LinkTable({"device-edge": LinkSpec(rtt_ms=40, bandwidth_mbps=20)}), enabled=True)
    nbytes = 65536
    d = em.delay("device", "edge", nbytes, now=100.0)
    assert d == pytest.approx(0.040 + nbytes / (20 * MBIT))
    graph = CostGraph([CostNode("n", 1.0, ("x",), ("y",))], {"x": nbytes, "y": 4}, ["x"], ["y"])
    cluster = Cluster(servers=[Server(name="a", site="device", speed=1), Server(name="b", site="edge", speed=1)],
                      links=[Link(a="device", b="edge", rtt=0.040, bandwidth=20 * MBIT)], client="a",
                      broker=BrokerOverhead(per_message=0, per_byte=0))
    cm = CostModel(graph, cluster)
    assert cm.hop(0, 1, [nbytes]) == pytest.approx(d)


def test_fifo_link_shares_bandwidth_and_several_tensors_of_a_hop_match_the_planner():
    em = LinkEmulator(LinkTable({"a-b": (0.010, 1000.0)}), enabled=True)  # 10 ms, 1000 B/s
    t1 = em.arrival("a", "b", 500, now=0.0)   # on the wire 0..0.5, arrives 0.51
    t2 = em.arrival("a", "b", 500, now=0.1)   # waits for the link: 0.5..1.0, arrives 1.01
    assert t1 == pytest.approx(0.51) and t2 == pytest.approx(1.01)
    # the planner's hop of both tensors: rtt + sum(bytes) / bandwidth
    assert t2 == pytest.approx(0.010 + 1000 / 1000.0)
    # the other direction is its own link; a link that is idle again starts at now
    assert em.arrival("b", "a", 500, now=0.1) == pytest.approx(0.61)
    assert em.arrival("a", "b", 0, now=5.0) == pytest.approx(5.01)


def test_emulation_off_by_default_adds_nothing():
    s = Settings(_env_file=None)
    assert s.emulate_links is False and s.slowdown == 1.0
    em = LinkEmulator.from_settings(s.model_copy(update={"links": {"a-b": LinkSpec(rtt_ms=100, bandwidth_mbps=1)}}))
    assert em.delay("a", "b", 10**6, now=1.0) == 0.0 and em.wire_s("a", "b", 10**6) == 0.0


def test_table_symmetry_defaults_same_site_and_updates():
    t = LinkTable({"device-edge": LinkSpec(rtt_ms=30, bandwidth_mbps=8)}, default=LinkSpec(rtt_ms=5))
    assert t.get("edge", "device") == t.get("device", "edge") == LinkParams(0.030, 8 * MBIT)
    assert t.get("edge", "cloud") == LinkParams(0.005, math.inf)
    assert t.get("edge", "edge") == LinkParams()
    em = LinkEmulator(t, enabled=True)
    assert em.delay("", "edge", 100, 0.0) == 0.0  # unknown sender site: no delay
    em.update({"edge-device": LinkSpec(rtt_ms=10, bandwidth_mbps=80)}, replace=False)
    assert em.table.get("device", "edge") == LinkParams(0.010, 80 * MBIT)
    assert em.table.get("edge", "cloud").rtt_s == 0.005  # default kept
    em.update({}, emulate=False)
    assert not em.enabled and em.table.get("device", "edge") == LinkParams(0.005, math.inf)  # replaced: default
    with pytest.raises(ValueError, match="siteA-siteB"):
        LinkTable({"a-b-c": LinkSpec()})
    assert link_params((0.02, None)) == LinkParams(0.02, math.inf)


def test_estimate_link_from_probe_round_trips():
    rtt, bw = 0.040, 5 * MBIT
    big = 256 * 1024
    small = [2 * rtt + 0.002, 2 * rtt + 0.001, 2 * rtt + 0.050]  # one outlier
    large = [2 * rtt + 0.001 + big / bw, 2 * rtt + 0.002 + big / bw]
    est_rtt, est_bw = estimate_link(small, large, big)
    assert est_rtt == pytest.approx(rtt, rel=0.05) and est_bw == pytest.approx(bw, rel=0.05)
    assert estimate_link([0.01], [0.01], big)[1] is None  # not measurably slower: unknown, not infinite
    with pytest.raises(ValueError):
        estimate_link([], [0.1], big)


def test_battery_drains_by_the_energy_model():
    b = BatterySim(compute_w=2.0, radio_w=1.0, idle_w=0.5, capacity_j=100.0, last=0.0)
    # 10 s: 3 s compute, 1 s radio, 6 s idle -> 6 + 1 + 3 = 10 J
    assert b.energy(3, 1, 10) == pytest.approx(10.0)
    assert b.account(3, 1, now=10.0) == pytest.approx(0.9) and b.energy_j == pytest.approx(10.0)
    b.account(0, 0, now=410.0)  # 400 s idle = 200 J: empty, not negative
    assert b.level == 0.0


def test_system_load_reports_numbers():
    s = system_load()
    assert s["memory_mb"] > 0 and s["load_avg"] is not None


def test_settings_and_cluster_toml_carry_links_slowdown_power(tmp_path, monkeypatch):
    monkeypatch.setenv("SPLITINFER_LINKS", '{"device-edge": {"rtt_ms": 40, "bandwidth_mbps": 20}}')
    monkeypatch.setenv("SPLITINFER_EMULATE_LINKS", "true")
    s = Settings()
    assert s.emulate_links and s.links["device-edge"] == LinkSpec(rtt_ms=40, bandwidth_mbps=20)
    from splitinfer.actors.supervisor import plan_actors
    from splitinfer.config import ClusterConfig, ConfigError

    cfg = tmp_path / "c.toml"
    cfg.write_text('emulate_links = true\nfront_end_site = "device"\n'
                   '[[servers]]\nid = "phone"\nsite = "device"\nslowdown = 4\n'
                   'power = {compute_w = 3, radio_w = 1, idle_w = 0.2}\n'
                   '[[servers]]\nid = "box"\nsite = "edge"\n'
                   '[links]\ndevice-edge = {rtt_ms = 40, bandwidth_mbps = 20}\n')
    c = ClusterConfig.load(cfg)
    env = c.link_env()
    assert env["SPLITINFER_EMULATE_LINKS"] == "true"
    monkeypatch.setenv("SPLITINFER_LINKS", env["SPLITINFER_LINKS"])
    assert Settings().links == {"device-edge": LinkSpec(rtt_ms=40, bandwidth_mbps=20)}
    argv = dict(plan_actors(c))
    assert argv["server:phone"][-4:] == ["--slowdown", "4.0", "--power", "3.0,1.0,0.2"]
    assert argv["server:box"][-1] == "1.0" and argv["front_end"][-2:] == ["--site", "device"]
    assert "state_pool" in argv
    assert ClusterConfig().link_env() == {}  # nothing given: actors keep their defaults (emulation off)
    cfg.write_text('[links]\ndevice = {rtt_ms = 1}\n')
    with pytest.raises(ConfigError, match="siteA-siteB"):
        ClusterConfig.load(cfg)


def test_new_messages_round_trip():
    link = LinkState(src_site="device", dst_site="edge", rtt_ms=40.5, bandwidth_mbps=19.0, by="a", target="b")
    for msg in (SetLinks(links={"a-b": LinkSpec(rtt_ms=1, bandwidth_mbps=2)}, emulate=True),
                Probe(probe_id="p1", site="device", payload=bytes(100)), ProbeReply(probe_id="p1", site="edge"),
                LinkReport(link=link), GetState(), ClusterState(links=[link])):
        assert decode(encode(msg)) == msg
    assert ClusterState(links=[link]).link("device", "edge") == link


def test_emulated_slowdown_scales_the_typical_call_not_one_spike():
    """A 10x slower device: a call that the shared machine stalled (50 ms instead of 10) is not stretched to
    500 ms; the extra idle time follows the median of the part's recent calls, per batch size."""
    from splitinfer.actors.model_server.runner import EmulatedSlowdown

    slow = EmulatedSlowdown(10.0)  # one per hosted part, keyed by batch size
    assert slow.extra_s(1, 0.010) == pytest.approx(0.090)
    assert slow.extra_s(1, 0.010) == pytest.approx(0.090)
    assert slow.extra_s(1, 0.050) == pytest.approx(0.090)  # median of 10, 10, 50 ms
    assert slow.extra_s(4, 0.030) == pytest.approx(0.270)  # a batch of 4 has its own history
    assert EmulatedSlowdown(1.0).extra_s(1, 0.010) == 0.0
