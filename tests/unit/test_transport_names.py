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
