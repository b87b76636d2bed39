"""The split/verify/cuts commands in-process (Typer's CliRunner), for many bad inputs at once with no TensorFlow
start-up per case: every refusal is one line starting with "error:" and a non-zero exit."""

from __future__ import annotations

import json

import pytest


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

    def runtime_without_file(d):
        m = json.loads((d / "manifest.json").read_text())
        m["parts"][0]["runtime"] = "onnxruntime"
        (d / "manifest.json").write_text(json.dumps(m))

    damaged("runtime_without_file", runtime_without_file)
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
        (["split", "{t}/tiny.keras", "--parts", "2", "--runtimes", "tf,tvm", "-o", "{t}/o"], "unknown runtime 'tvm'"),
        (["split", "{t}/tiny.keras", "--parts", "2", "--runtimes", "tf", "--runtime", "litert", "-o", "{t}/o"],
         "is not one of --runtimes"),
        (["verify", "{t}/runtime_without_file"], "has no onnx file"),
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


def test_parts_get_a_file_per_runtime_the_fastest_measured_is_chosen_and_every_runtime_verifies(tiny):
    from typer.testing import CliRunner

    from splitinfer.cli import app
    from splitinfer.splitter.manifest import Manifest

    out = tiny / "runtimes"
    result = CliRunner().invoke(app, ["split", str(tiny / "tiny.keras"), "--cuts", "r1:0", "-o", str(out),
                                      "--runtimes", "tf,onnxruntime", "--json"])
    assert result.exit_code == 0, result.output
    manifest = Manifest.load(out)
    for part in manifest.parts:
        assert part.format == "keras" and set(part.exports) == {"onnx"} and (out / part.exports["onnx"].file).is_file()
        assert set(part.runtime_ms) == {"tf", "onnxruntime"} and all(ms > 0 for ms in part.runtime_ms.values())
        assert part.runtime == min(part.runtime_ms, key=part.runtime_ms.get)
    rows = json.loads(result.stdout)["parts"]
    assert [r["runtime"] for r in rows] == [p.runtime for p in manifest.parts]
    result = CliRunner().invoke(app, ["verify", str(out), "--json", "--tolerance", "1e-5"])
    report = json.loads(result.stdout)
    assert result.exit_code == 0 and set(report["per_runtime"]) == {"tf", "onnxruntime"}, result.output
    # a runtime fixed by the user wins over the measurement
    fixed = tiny / "fixed"
    result = CliRunner().invoke(app, ["split", str(tiny / "tiny.keras"), "--cuts", "r1:0", "-o", str(fixed),
                                      "--runtime", "onnxruntime"])
    assert result.exit_code == 0, result.output
    assert {p.runtime for p in Manifest.load(fixed).parts} == {"onnxruntime"}


def test_parts_beyond_the_single_tensor_cut_points_use_multi_tensor_frontiers(tmp_path):
    """Two inputs, two long branches joined once: one single-tensor cut point (the join), yet --parts 3 splits,
    at a frontier of one tensor per branch, and verifies within 1e-5; more parts than operations is an error."""
    from typer.testing import CliRunner

    from splitinfer import _tf  # noqa: F401
    import keras

    from splitinfer.cli import app
    from splitinfer.splitter import ModelGraph
    from splitinfer.splitter.manifest import Manifest

    keras.utils.set_random_seed(0)
    a, b = keras.Input((16,), name="a"), keras.Input((8,), name="b")
    x = keras.layers.Dense(32, activation="relu", name="a1")(a)
    x = keras.layers.Dense(32, activation="relu", name="a2")(x)
    y = keras.layers.Dense(32, activation="tanh", name="b1")(b)
    y = keras.layers.Dense(32, activation="tanh", name="b2")(y)
    joined = keras.layers.Concatenate(name="join")([x, y])
    model = keras.Model([a, b], keras.layers.Dense(4, name="head")(joined), name="two_branches")
    model.save(tmp_path / "m.keras")
    assert ModelGraph(model).cut_points() == ["join:0"]
    out = tmp_path / "s"
    runner = CliRunner()
    result = runner.invoke(app, ["split", str(tmp_path / "m.keras"), "--parts", "3", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    manifest = Manifest.load(out)
    assert len(manifest.parts) == 3
    assert any(len(p.inputs) > 1 and not {t.name for t in p.inputs} <= {"a:0", "b:0"} for p in manifest.parts), \
        "some part takes a frontier of several handed-over tensors"
    result = runner.invoke(app, ["verify", str(out), "--json", "--tolerance", "1e-5"])
    assert result.exit_code == 0 and json.loads(result.stdout)["ok"], result.output
    result = runner.invoke(app, ["split", str(tmp_path / "m.keras"), "--parts", "9", "-o", str(tmp_path / "t")])
    assert result.exit_code != 0 and "only 6 operation(s)" in result.output, result.output
