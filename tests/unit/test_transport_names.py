"""Broker names: every queue and exchange name starts with the namespace, tensor names escape into routing keys
and back, and odd deployment or part names still give valid, distinct AMQP names. Pure code: no broker."""

from __future__ import annotations

import pytest

from splitinfer.actors.transport.topology import Names, escape_key, unescape_key


@pytest.mark.parametrize("name", ["conv/x:0", "a.b.c:1", "x*#%2E.y", "tf.math.add@2:0", "%", ""])
def test_escape_key_round_trip(name):
    esc = escape_key(name)
    assert "." not in esc and "*" not in esc and "#" not in esc
    assert unescape_key(esc) == name
    key = Names("ns").tensor_key("dep.1", name)
    assert key.count(".") == 1


def test_names_are_namespaced():
    n = Names("abc")
    for name in (n.tensors, n.results, n.jobs, n.control, n.dead, n.registry_queue, n.pool_queue,
                 n.part_exchange("d", "p"), n.replica_queue("d", "p", 1)):
        assert name.startswith("abc.")
    # AMQP allows only letters, digits, '-', '_', '.' and ':' in names: a model's plan `m:p0`, a dotted or
    # odd deployment id still give valid names, and different (deployment, part) pairs never share one
    import re

    pairs = [("d.x", "p"), ("d", "x.p"), ("m:p0", "part0"), ("m", "p0:part0"), ("a b/ü%", "p"), ("a", "b")]
    names = [n.replica_queue(d, p, 1) for d, p in pairs] + [n.part_exchange(d, p) for d, p in pairs]
    assert all(re.fullmatch(r"[A-Za-z0-9_.:-]+", x) for x in names), names
    assert len(set(names)) == len(names)


def test_key_problem_refuses_what_cannot_be_a_routing_key():
    from splitinfer.actors.transport.topology import MAX_ROUTING_KEY_BYTES, escape_key, key_problem

    assert key_problem("job-1", "job id") is None
    assert key_problem("", "reply_to") == "reply_to is empty"
    fits = "a" * MAX_ROUTING_KEY_BYTES
    assert key_problem(fits, "job id") is None
    grows = "a." * 95  # 190 characters, more than 255 bytes once each '.' is escaped
    assert len(escape_key(grows).encode()) > MAX_ROUTING_KEY_BYTES
    assert "routing key" in key_problem(grows, "job id")
    assert key_problem("é" * 200, "reply_to") is not None  # bytes, not characters


def test_queue_policy_declares_kept_queues_by_type_and_bounds_the_dead_letters():
    from splitinfer.actors.transport.topology import Names, QueuePolicy

    names = Names("ns")
    classic = QueuePolicy()
    assert classic.arguments(names) == {"x-dead-letter-exchange": "ns.dead"}
    quorum = QueuePolicy(queue_type="quorum", expires_s=60)
    assert quorum.arguments(names)["x-queue-type"] == "quorum"
    assert "x-queue-type" not in quorum.arguments(names, kept=False)
    assert quorum.arguments(names)["x-expires"] == 60_000
    dead = QueuePolicy(dead_max=5, dead_max_bytes=1000, dead_ttl_s=2).dead_arguments(names)
    assert dead["x-max-length"] == 5 and dead["x-max-length-bytes"] == 1000 and dead["x-message-ttl"] == 2000
    assert dead["x-overflow"] == "drop-head" and "x-dead-letter-exchange" not in dead


def test_a_cluster_url_list_is_split_and_masked_node_by_node():
    from splitinfer.actors.transport import broker_urls, masked

    urls = "amqp://u:secret@h1:5672/, amqp://u:secret@h2:5673/vh ,,amqps://u:secret@h3/"
    assert broker_urls(urls) == ["amqp://u:secret@h1:5672/", "amqp://u:secret@h2:5673/vh", "amqps://u:secret@h3/"]
    assert masked(urls) == "amqp://h1:5672/,amqp://h2:5673/vh,amqps://h3/"
    assert "secret" not in masked(urls)
    with pytest.raises(ValueError):
        broker_urls(" , ")
