"""The split/verify/cuts commands as a user runs them: real processes, exit codes, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SMALL = "keras.applications:MobileNetV3Small"


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "splitinfer.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "200"},
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


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
        (["split", SMALL, "--parts", "500", "-o", "{tmp}/o"], ["cannot make 500 parts", "cut point"]),
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


# -- the same rule in-process, for many bad inputs at once (no TensorFlow start-up per case) -----------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A small saved model, a good split of it, and damaged copies of that split."""
    import shutil

    from splitinfer import _tf  # noqa: F401
    import keras

    from splitinfer.splitter import ModelGraph, load_source_model, save_split, split_at_cuts

    root = tmp_path_factory.mktemp("tiny")
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 3), name="img")
    x = keras.layers.Conv2D(4, 3, padding="same", name="c1")(inp)
    x = keras.layers.Dropout(0.5, name="drop")(keras.layers.BatchNormalization(name="bn")(x))
    x = keras.layers.GlobalAveragePooling2D(name="gap")(keras.layers.ReLU(name="r1")(x))
    keras.Model(inp, keras.layers.Dense(2, name="head")(x), name="tiny").save(root / "tiny.keras")
    data = (root / "tiny.keras").read_bytes()
    (root / "truncated.keras").write_bytes(data[: len(data) // 2])
    (root / "empty.keras").write_bytes(b"")
    (root / "dir.keras").mkdir()
    (root / "afile").write_text("x")
    import json
    import zipfile

    with zipfile.ZipFile(root / "tiny.keras") as z:
        files = {n: z.read(n) for n in z.namelist()}
    config = json.loads(files["config.json"])
    config["config"]["layers"][1]["class_name"] = "NoSuchLayer"
    with zipfile.ZipFile(root / "unknown_class.keras", "w") as z:
        for n, d in files.items():
            z.writestr(n, json.dumps(config) if n == "config.json" else d)

    @keras.saving.register_keras_serializable(package="splitinfer_tests")
    class Subclassed(keras.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.dense = keras.layers.Dense(2)

        def call(self, x):
            return self.dense(x)

    sub = Subclassed(name="subclassed")
    sub(keras.ops.zeros((1, 3)))
    sub.save(root / "subclassed.keras")

    graph = ModelGraph(load_source_model(str(root / "tiny.keras")))
    save_split(graph, split_at_cuts(graph, ["r1:0"]), root / "good", origin="tiny")

    def damaged(name, change):
        shutil.copytree(root / "good", root / name)
        change(root / name)

    damaged("modified", lambda d: (d / "part1.keras").write_bytes((d / "part1.keras").read_bytes() + b"x"))
    damaged("missing", lambda d: (d / "part0.keras").unlink())
    damaged("corrupt", lambda d: (d / "manifest.json").write_text('{"format": '))
    damaged("schema", lambda d: (d / "manifest.json").write_text('{"format": "splitinfer.manifest", "version": 1}'))

    def escape(d):
        m = json.loads((d / "manifest.json").read_text())
        m["parts"][0]["file"] = "../../etc/passwd"
        (d / "manifest.json").write_text(json.dumps(m))

    damaged("escape", escape)

    def part_dir(d):
        (d / "part0.keras").unlink()
        (d / "part0.keras").mkdir()

    damaged("partdir", part_dir)
    return root


@pytest.mark.parametrize(
    "args, needle",
    [
        (["split", "{t}/dir.keras", "--parts", "2", "-o", "{t}/o"], "is not a .keras file"),
        (["split", "{t}/empty.keras", "--parts", "2", "-o", "{t}/o"], "not a valid .keras file"),
        (["split", "{t}/truncated.keras", "--parts", "2", "-o", "{t}/o"], "not a valid .keras file"),
        (["split", "{t}/unknown_class.keras", "--parts", "2", "-o", "{t}/o"], "cannot load"),
        (["cuts", "{t}/subclassed.keras"], "no graph to cut"),
        (["profile", "{t}/unknown_class.keras"], "cannot load"),
        (["split", "{t}/tiny.keras", "--parts", "0", "-o", "{t}/o"], "--parts must be at least 1"),
        (["split", "{t}/tiny.keras", "--parts", "10000000000000", "-o", "{t}/o"], "cannot make 10000000000000 parts"),
        (["split", "{t}/tiny.keras", "--cuts", "img:0", "-o", "{t}/o"], "model input"),
        (["split", "{t}/tiny.keras", "--cuts", "head:0", "-o", "{t}/o"], "nothing to run after it"),
        (["split", "{t}/tiny.keras", "--cuts", "r1:0, r1:0", "-o", "{t}/o"], "same place"),
        (["split", "{t}/tiny.keras", "--cuts", " , ", "-o", "{t}/o"], "--cuts is empty"),
        (["split", "{t}/tiny.keras", "--cuts", "r1:0", "-o", "{t}/afile"], "exists and is not a directory"),
        (["split", "{t}/tiny.keras", "--cuts", "r1:0", "-o", "{t}/afile/sub"], "cannot write the split"),
        (["split", "{t}/tiny.keras", "--parts", "2", "--input-shape", "abc", "-o", "{t}/o"], "not a list of integers"),
        (["split", "{t}/tiny.keras", "--parts", "2", "--input-shape", "0x0x3", "-o", "{t}/o"], "positive"),
        (["split", "{t}/tiny.keras", "--parts", "2", "--input-shape", "8x8", "-o", "{t}/o"], "takes inputs of shape"),
        (["split", "{t}/tiny.keras", "--parts", "2", "--input-shape", " ", "-o", "{t}/o"], "input shape is empty"),
        (["split", "{t}/tiny.keras", "--parts", "2", "--input-shape", "99999x99999x3", "-o", "{t}/o"], "too large"),
        (["cuts", "{t}/tiny.keras", "--batch", "0"], "--batch"),
        (["cuts", "{t}/tiny.keras", "--plot", "{t}/afile/cuts.png"], "cannot write the plot"),
        (["verify", "{t}/modified"], "sha256"),
        (["verify", "{t}/missing"], "part file missing"),
        (["verify", "{t}/corrupt"], "invalid manifest"),
        (["verify", "{t}/schema"], "split_id: Field required"),
        (["verify", "{t}/escape"], "not a plain file name"),
        (["verify", "{t}/partdir"], "is not a file"),
        (["verify", "{t}/afile"], "invalid manifest"),
    ],
)
def test_bad_input_in_process_is_one_line(tiny, args, needle):
    from typer.testing import CliRunner

    from splitinfer.cli import app

    result = CliRunner().invoke(app, [a.replace("{t}", str(tiny)) for a in args])
    assert result.exit_code != 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert needle in lines[0], lines[0]


def test_cuts_with_spaces_duplicates_and_in_any_order_are_accepted(tiny):
    from typer.testing import CliRunner

    from splitinfer.cli import app

    out = tiny / "ok"
    result = CliRunner().invoke(app, ["split", str(tiny / "tiny.keras"), "--cuts", " gap:0 , r1:0+r1:0 ", "-o", str(out),
                                      "--json"])
    assert result.exit_code == 0, result.output
    assert [p["outputs"] for p in json.loads(result.stdout)["parts"]] == [["r1:0"], ["gap:0"], ["head:0"]]
    result = CliRunner().invoke(app, ["verify", str(out), "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["max_abs_error"] == 0.0
