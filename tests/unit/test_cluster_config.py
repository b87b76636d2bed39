"""The cluster description (TOML) and the actors it plans, and the broker's rabbitmq.conf."""

from __future__ import annotations

import re

import pytest

from splitinfer.actors.supervisor import plan_actors
from splitinfer.config import ClusterConfig, ConfigError
from splitinfer.config import Settings

from tests.support import REPO


def test_cluster_config_from_toml(tmp_path):
    cfg = tmp_path / "cluster.toml"
    cfg.write_text('namespace = "lab"\n[[servers]]\nid = "phone"\nsite = "device"\n'
                   '[[servers]]\nid = "edge"\nsite = "edge"\nreplicas = 2\n')
    c = ClusterConfig.load(cfg)
    assert c.namespace == "lab" and [s.process_ids() for s in c.servers] == [["phone"], ["edge-1", "edge-2"]]
    names = [n for n, _ in plan_actors(c)]
    assert names == ["registry", "state_pool", "model_pool", "result_store", "optimizer", "server:phone", "server:edge-1",
                     "server:edge-2",
                     "front_end"]
    argv = dict(plan_actors(c))["server:edge-2"]
    assert argv[1:3] == ["-m", "splitinfer.actors.model_server"] and argv[3:7] == ["--id", "edge-2", "--site", "edge"]


@pytest.mark.parametrize("text, needle", [
    ('[[servers]]\nid = "a"\n[[servers]]\nid = "a"\n', "appears twice"),
    ('[[servers]]\nid = "a b"\n', "servers.0.id"),
    ('[[servers]]\nid = "a"\nreplicas = 0\n', "replicas"),
    ('servers = [', "cannot read"),
])
def test_bad_cluster_configs_say_what_is_wrong(tmp_path, text, needle):
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(needle)):
        ClusterConfig.load(cfg)


def test_default_cluster_has_distinct_servers_over_sites():
    c = ClusterConfig.default(5)
    assert [s.id for s in c.servers] == ["s1", "s2", "s3", "s4", "s5"]
    assert {s.site for s in c.servers} == {"device", "edge", "cloud"}


def test_rabbitmq_conf_fits_the_largest_message_and_sets_heartbeat_and_consumer_timeout():
    conf = dict(
        (k.strip(), v.split("#")[0].strip())
        for k, v in (line.split("=", 1) for line in (REPO / "rabbitmq.conf").read_text().splitlines()
                     if "=" in line and not line.lstrip().startswith("#"))
    )
    assert int(conf["max_message_size"]) >= Settings().max_message_bytes + 1024 * 1024
    assert int(conf["max_message_size"]) <= 512 * 1024 * 1024  # RabbitMQ's own ceiling
    assert 5 <= int(conf["heartbeat"]) <= 60
    assert int(conf["consumer_timeout"]) >= 60_000
