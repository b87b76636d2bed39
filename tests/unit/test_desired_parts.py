"""What a model server keeps of its orders, so that it reloads its parts after a restart: pure file code."""

from __future__ import annotations

from splitinfer.actors.model_server.desired import DesiredParts
from splitinfer.messages import PartRef


def test_orders_add_and_remove_parts_and_survive_a_new_instance(tmp_path):
    path = tmp_path / "hosting" / "ns" / "s1.json"
    assert DesiredParts(path).load() == []
    kept = DesiredParts(path)
    kept.add(PartRef(deployment="d", part="p0"))
    kept.add(PartRef(deployment="d", part="p1", replica=1, replicas=2))
    kept.add(PartRef(deployment="d", part="p0", replica=0, replicas=3))  # loaded again: replaces the first
    assert DesiredParts(path).load() == [PartRef(deployment="d", part="p1", replica=1, replicas=2),
                                         PartRef(deployment="d", part="p0", replica=0, replicas=3)]
    kept.remove("d", "p1")
    assert [r.part for r in DesiredParts(path).load()] == ["p0"]


def test_an_unreadable_file_means_starting_empty(tmp_path):
    path = tmp_path / "s1.json"
    path.write_text("{not json")
    assert DesiredParts(path).load() == []
    DesiredParts(tmp_path / "absent.json").remove("d", "p0")  # nothing to remove: no file made
    assert not (tmp_path / "absent.json").exists()
