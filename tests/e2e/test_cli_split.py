"""The split/verify/cuts commands as a user runs them: real processes, exit codes, one-line errors. The same rule
in-process, for many bad inputs at once: unit/test_cli_split_inprocess.py."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support.cli import assert_one_line_error
from tests.support.cli import cli as run

SMALL = "keras.applications:MobileNetV3Small"


def test_split_in_parts_then_verify_in_a_fresh_process(tmp_path):
    out = tmp_path / "split"
    proc = run("split", SMALL, "--parts", "3", "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert len(summary["parts"]) == 3
    assert (out / "manifest.json").exists() and (out / "part2.keras").exists()
    proc = run("verify", str(out), "--samples", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] is True and report["parts"] == 3
    assert report["max_abs_error"] <= 1e-5


def test_split_at_named_cuts_and_tensor_names_are_stable_across_processes(tmp_path):
    first = json.loads(run("cuts", SMALL, "--json").stdout)
    second = json.loads(run("cuts", SMALL, "--json").stdout)
    assert first == second
    tensors = [c["tensor"] for c in first["cut_points"]]
    assert len(tensors) > 10 and all(c["bytes"] > 0 for c in first["cut_points"])
    chosen = f"{tensors[3]},{tensors[len(tensors) // 2]}"
    proc = run("split", SMALL, "--cuts", chosen, "-o", str(tmp_path / "s"), "--json")
    assert proc.returncode == 0, proc.stderr
    assert [p["outputs"] for p in json.loads(proc.stdout)["parts"][:2]] == [[tensors[3]], [tensors[len(tensors) // 2]]]
    assert run("verify", str(tmp_path / "s")).returncode == 0


def test_cuts_plot_is_a_png(tmp_path):
    png = tmp_path / "cuts.png"
    proc = run("cuts", SMALL, "--plot", str(png))
    assert proc.returncode == 0, proc.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_split_a_keras_file_with_a_custom_input_shape(tmp_path):
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    code = (
        "from splitinfer import _tf; import keras; "
        "keras.applications.MobileNetV2(weights=None, input_shape=(96, 96, 3), alpha=0.35)"
        f".save(r'{model_dir / 'net.keras'}')"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
    proc = run("split", str(model_dir / "net.keras"), "--parts", "4", "-o", str(tmp_path / "s"))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(run("verify", str(tmp_path / "s"), "--json").stdout)
    assert report["ok"] and report["parts"] == 4


@pytest.mark.parametrize(
    "args, needles",
    [
        (["split", "missing.keras", "--parts", "2", "-o", "{tmp}/o"], ["model file not found", "missing.keras"]),
        (["split", "{tmp}/corrupt.keras", "--parts", "2", "-o", "{tmp}/o"], ["not a valid .keras file"]),
        (["split", "{tmp}/truncated.keras", "--parts", "2", "-o", "{tmp}/o"], ["cannot load"]),
        (["split", SMALL, "--cuts", "no_such_layer:0", "-o", "{tmp}/o"], ["unknown tensor", "no_such_layer:0"]),
        (["split", SMALL, "--cuts", "expanded_conv_squeeze_excite_conv:0", "-o", "{tmp}/o"], ["does not separate the graph"]),
        (["split", SMALL, "--parts", "500", "-o", "{tmp}/o"], ["cannot make 500 parts", "only 181 operation(s)"]),
        (["split", SMALL, "-o", "{tmp}/o"], ["exactly one of --parts, --cuts or --partition"]),
        (["split", "keras.applications:NoSuchNet", "--parts", "2", "-o", "{tmp}/o"], ["unknown model"]),
        (["split", SMALL, "--parts", "2", "--input-shape", "2x2x3", "-o", "{tmp}/o"], ["cannot build"]),
        (["split", SMALL, "--parts", "2", "--input-shape", "abc", "-o", "{tmp}/o"], ["input shape"]),
        (["verify", "{tmp}/nowhere"], ["no manifest"]),
        # a malformed command line is one line too, not Typer's usage box
        (["split", SMALL, "--parts", "two", "-o", "{tmp}/o"], ["--parts", "valid integer", "--help"]),
        (["splitt", SMALL], ["No such command", "splitt"]),
        (["cuts", "missing.keras"], ["model file not found"]),
        (["cuts", "{tmp}"], ["is not a .keras file"]),
        (["split", SMALL, "--parts", "0", "-o", "{tmp}/o"], ["--parts must be at least 1"]),
        (["split", SMALL, "--cuts", "input_layer:0", "-o", "{tmp}/o"], ["model input"]),
        (["split", SMALL, "--parts", "2", "--input-shape", "0x0x3", "-o", "{tmp}/o"], ["positive"]),
        (["verify", "{tmp}/broken"], ["invalid manifest"]),
    ],
)
def test_bad_input_is_one_line_and_non_zero(args, needles, tmp_path):
    (tmp_path / "corrupt.keras").write_bytes(b"\x00garbage")
    import zipfile

    with zipfile.ZipFile(tmp_path / "truncated.keras", "w") as z:
        z.writestr("config.json", "{not json")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "manifest.json").write_text('{"format": "splitinfer.manifest", ')
    proc = run(*[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert_one_line_error(proc, *needles)


def test_verify_fails_loudly_on_a_mismatch(tmp_path):
    out = tmp_path / "s"
    assert run("split", SMALL, "--cuts", "expanded_conv_project_bn:0", "-o", str(out)).returncode == 0
    # Replace the source with a differently initialised model of the same architecture (and fix its hash).
    code = (
        "from splitinfer import _tf; import keras, json, hashlib; "
        "from splitinfer.splitter.manifest import file_sha256; "
        f"keras.utils.set_random_seed(123); m = keras.applications.MobileNetV3Small(weights=None); "
        f"m.save(r'{out / 'source.keras'}'); p = r'{out / 'manifest.json'}'; d = json.load(open(p)); "
        f"d['source']['file_sha256'] = file_sha256(r'{out / 'source.keras'}'); json.dump(d, open(p, 'w'))"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
    proc = run("verify", str(out), "--json")
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["ok"] is False
