"""`splitinfer profile` and `splitinfer calibrate` in-process (Typer's CliRunner): bad inputs are one line and a
non-zero exit; good ones give JSON, a profile file and a plot. The command in a fresh process: e2e/test_cli_profile.py."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from splitinfer import _tf  # noqa: F401
from splitinfer.monitor.machine import apply_threads

try:
    apply_threads(1, 1)  # as settings.intra_op_threads: the in-process CLI then finds TF already matching
except RuntimeError:
    pass

from splitinfer.cli import app  # noqa: E402

runner = CliRunner()


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    from splitinfer.config import get_settings

    monkeypatch.setenv("SPLITINFER_CACHE_DIR", str(tmp_path / "cache"))
    get_settings.cache_clear()
    yield tmp_path / "cache"
    get_settings.cache_clear()


def _one_line_error(result) -> str:
    assert result.exit_code != 0, result.output
    text = result.output.strip()
    assert "Traceback" not in text
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    assert lines[0].startswith("error:")
    return lines[0]


@pytest.mark.parametrize(
    "args, needle",
    [
        (["/nonexistent/model.keras"], "not found"),
        (["keras.applications:NoSuchNet"], "unknown model"),
        (["keras.applications:MobileNetV3Small", "--input-shape", "8x8x3"], "cannot build"),
        (["keras.applications:MobileNetV3Small", "--input-shape", "224x224"], "cannot build"),
        (["keras.applications:MobileNetV3Small", "--input-shape", "axb"], "not a list of integers"),
        (["keras.applications:MobileNetV3Small", "--input-shape", "0x224x3"], "positive"),
        (["keras.applications:MobileNetV3Small", "--batch", "0"], "--batch"),
        (["keras.applications:MobileNetV3Small", "--rounds", "1"], "--rounds"),
    ],
)
def test_profile_bad_input_is_one_line(args, needle):
    line = _one_line_error(runner.invoke(app, ["profile", *args]))
    assert needle in line


def test_profile_not_a_keras_archive(tmp_path):
    bad = tmp_path / "broken.keras"
    bad.write_text("not a zip")
    assert "not a valid .keras" in _one_line_error(runner.invoke(app, ["profile", str(bad)]))
    other = tmp_path / "model.h5"
    other.write_text("x")
    assert "not a .keras file" in _one_line_error(runner.invoke(app, ["profile", str(other)]))


def test_profile_wrong_shape_for_a_saved_model(tmp_path):
    import keras

    inp = keras.Input((8, 8, 3))
    model = keras.Model(inp, keras.layers.Conv2D(4, 3)(inp))
    path = tmp_path / "m.keras"
    model.save(path)
    line = _one_line_error(runner.invoke(app, ["profile", str(path), "--input-shape", "16x16x3"]))
    assert "takes inputs of shape" in line


def test_profile_saved_model_json_out_and_plot(tmp_path, private_cache):
    import keras

    inp = keras.Input((32, 32, 3), name="image")
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="c1")(inp)
    x = keras.layers.MaxPooling2D(name="pool")(x)
    x = keras.layers.Conv2D(16, 3, padding="same", name="c2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    model = keras.Model(inp, keras.layers.Dense(10, name="head")(x), name="tiny")
    path = tmp_path / "tiny.keras"
    model.save(path)
    out, png = tmp_path / "p.json", tmp_path / "p.png"
    args = ["profile", str(path), "--json", "--out", str(out), "--plot", str(png), "--rounds", "5", "--segments", "3"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["model"] == "tiny" and data["format"] == "splitinfer.profile"
    assert [o["name"] for o in data["ops"]] == ["image", "c1", "pool", "c2", "gap", "head"]
    assert data["totals"]["flops"] == data["totals"]["profiler_flops"] > 0
    assert json.loads(out.read_text()) == data
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((private_cache / "profiles").glob("*.json"))
    # the table output names the totals
    table = runner.invoke(app, ["profile", str(path)])
    assert table.exit_code == 0 and "whole model" in table.output


def test_calibrate_json(private_cache):
    result = runner.invoke(app, ["calibrate", "--json", "--rounds", "5"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["format"] == "splitinfer.calibration"
    for key in ("conv_gflops", "dense_gflops", "memory_gbps", "call_overhead_ms"):
        assert data[key] > 0
    assert (private_cache / "calibration" / f"{data['machine']['fingerprint']}.json").exists()
    assert "--rounds" in _one_line_error(runner.invoke(app, ["calibrate", "--rounds", "0"]))


def test_profile_models_with_an_unused_input_or_no_operations(tmp_path):
    """An input nothing consumes is still fed to the whole model; a model without operations has nothing to time."""
    import keras

    a, unused = keras.Input((6,), name="a"), keras.Input((3,), name="unused")
    h = keras.layers.Dense(8, name="h")(a)
    keras.Model([a, unused], [keras.layers.Dense(2, name="out")(h), a], name="odd").save(tmp_path / "odd.keras")
    result = runner.invoke(app, ["profile", str(tmp_path / "odd.keras"), "--json", "--rounds", "3", "--segments", "2"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["totals"]["flops"] == data["totals"]["profiler_flops"] > 0
    assert [c["tensor"] for c in data["cut_points"]] == ["h:0"]
    x = keras.Input((3,), name="x")
    keras.Model(x, x, name="identity").save(tmp_path / "identity.keras")
    line = _one_line_error(runner.invoke(app, ["profile", str(tmp_path / "identity.keras"), "--rounds", "3"]))
    assert "no operations" in line


def test_profile_free_input_dimensions_need_a_shape(tmp_path):
    import keras

    inp = keras.Input((None, None, 3), name="img")
    x = keras.layers.Conv2D(4, 3, name="conv")(inp)
    keras.Model(inp, keras.layers.GlobalAveragePooling2D(name="gap")(x), name="free").save(tmp_path / "free.keras")
    line = _one_line_error(runner.invoke(app, ["profile", str(tmp_path / "free.keras"), "--rounds", "3"]))
    assert "--input-shape" in line
    result = runner.invoke(app, ["profile", str(tmp_path / "free.keras"), "--input-shape", "12x12x3", "--json",
                                 "--rounds", "3", "--segments", "2"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["input_shapes"] == [[12, 12, 3]]
    assert data["totals"]["flops"] == data["totals"]["profiler_flops"] > 0
    line = _one_line_error(runner.invoke(app, ["profile", str(tmp_path / "free.keras"), "--out",
                                               str(tmp_path / "free.keras" / "p.json"), "--input-shape", "12x12x3",
                                               "--rounds", "3"]))
    assert "cannot write the profile" in line
