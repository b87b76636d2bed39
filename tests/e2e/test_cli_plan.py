"""`splitinfer plan` offline, as a user runs it: a cluster file in, a plan table (JSON) out; bad options are one
line on stderr and a non-zero exit."""

from __future__ import annotations

import json

from tests.support.cli import cli as _cli


def test_plan_cli_offline_json_and_one_line_errors(tmp_path):
    cfg = tmp_path / "cluster.toml"
    cfg.write_text('front_end_site = "device"\n'
                   '[[servers]]\nid = "phone"\nsite = "device"\nslowdown = 4.0\n'
                   'power = {compute_w = 5.0, radio_w = 0.5, idle_w = 0.1}\n'
                   '[[servers]]\nid = "cloud1"\nsite = "cloud"\n'
                   '[links]\ndevice-cloud = {rtt_ms = 5, bandwidth_mbps = 100}\n')
    r = _cli("plan", "keras.applications:MobileNetV3Small", "--input-shape", "96x96x3", "--config", str(cfg),
             "--objective", "energy", "--json")
    assert r.returncode == 0, r.stderr
    table = json.loads(r.stdout)
    assert table["client"] == "phone" and table["objective"] == "energy" and table["plans"]
    servers = {part["server"] for p in table["plans"] for part in p["parts"]}
    assert servers <= {"phone", "cloud1"}
    primary = next(p for p in table["plans"] if p["id"] == table["primary"])
    assert primary["energy"] == min(p["energy"] for p in table["plans"])
    # each part runs on a runtime the profile measured (every segment is timed on every installed runtime; the
    # choice per part is the planner's, tested in unit/test_planner.py)
    from splitinfer.splitter.runtimes import available_runtimes

    assert {part["runtime"] for p in table["plans"] for part in p["parts"]} <= set(available_runtimes())
    # a privacy floor: the first 5 operations stay on the phone in every plan
    r = _cli("plan", "keras.applications:MobileNetV3Small", "--input-shape", "96x96x3", "--config", str(cfg),
             "--objective", "latency", "--keep-on-device", "5", "--json")
    assert r.returncode == 0, r.stderr
    from splitinfer.splitter import ModelGraph, load_source_model

    first = ModelGraph(load_source_model("keras.applications:MobileNetV3Small", (96, 96, 3))).compute_nodes[:5]
    for p in json.loads(r.stdout)["plans"]:
        where = {n: part["server"] for part in p["parts"] for n in part["nodes"]}
        assert all(where[n] == "phone" for n in first), (first, p["parts"])
    for args, needle in [
        (["--keep-on-device", "no_such_tensor:0"], "unknown tensor"),
        (["--sla", "0.001ms"], "no plan meets the SLA"),
        (["--objective", "cheapest"], "--objective"),
        (["--sla", "soon"], "--sla"),
        (["--config", str(tmp_path / "missing.toml")], "not found"),
    ]:
        r = _cli("plan", "keras.applications:MobileNetV3Small", "--input-shape", "96x96x3", *args)
        lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
        assert r.returncode != 0 and len(lines) == 1 and needle in lines[0], (args, r.stderr)
        assert "Traceback" not in r.stderr
