"""The command line as a new user meets it: one meaning per flag across commands, switches shown as switches,
`--version`, help for every option, tables that stay one row per line when piped."""

from __future__ import annotations

import collections
import re

import typer.main
from typer.testing import CliRunner

from splitinfer.cli import app

COMMAND = typer.main.get_command(app)


def _options():
    for name, command in sorted(COMMAND.commands.items()):
        for p in command.params:
            if p.param_type_name == "option":
                yield name, p


def test_every_short_flag_means_one_thing_in_every_command():
    meanings: dict[str, set[str]] = collections.defaultdict(set)
    for _, p in _options():
        longs = [o for o in p.opts if o.startswith("--")]
        for short in (o for o in p.opts if re.fullmatch(r"-[A-Za-z]", o)):
            meanings[short] |= set(longs)
    assert meanings, "no short flags at all"
    ambiguous = {short: sorted(longs) for short, longs in meanings.items() if len(longs) != 1}
    assert not ambiguous, f"a short flag with several meanings: {ambiguous}"


def test_a_long_flag_is_the_same_kind_of_value_everywhere():
    kinds: dict[str, set[str]] = collections.defaultdict(set)
    for _, p in _options():
        for o in p.opts:
            if o.startswith("--"):
                kinds[o].add("switch" if p.is_flag else p.bare_type())
    mixed = {o: sorted(k) for o, k in kinds.items() if len(k) > 1}
    assert not mixed, f"one flag, different kinds of value: {mixed}"


def test_every_option_has_help_and_switches_show_no_value():
    missing = [f"{name} {p.opts[0]}" for name, p in _options() if not p.help]
    assert not missing, f"options without help: {missing}"
    runner = CliRunner()
    for name in ("split", "deploy", "results", "status", "demo"):
        out = runner.invoke(app, [name, "--help"], terminal_width=200).output
        assert "--json" in out and "<bool>" not in out, out


def test_version_and_piped_tables():
    r = CliRunner().invoke(app, ["--version"])
    assert r.exit_code == 0 and re.fullmatch(r"splitinfer \S+\n", r.output)
    from splitinfer.cli.app import PIPED_WIDTH, console

    # the test runs with stdout captured, as when piped: the console is wide, so long ids stay on one line
    assert console.width == PIPED_WIDTH >= 160


def test_a_bad_model_variant_or_accuracy_is_a_one_line_error_before_anything_is_sent(tmp_path):
    runner = CliRunner()
    for spec, says in (("small", "NAME=MODEL"), ("sm-all=keras.applications:MobileNetV3Small", "NAME=MODEL"),
                       ("small=keras.applications:MobileNetV3Small@high", "not a number"),
                       ("small=keras.applications:MobileNetV3Small@1.5", "(0, 1]"),
                       (f"small={tmp_path / 'missing.keras'}", "not a .keras file")):
        r = runner.invoke(app, ["deploy", "keras.applications:MobileNetV3Large", "--variant", spec,
                                "--broker-url", "amqp://guest:guest@127.0.0.1:1/"])
        assert r.exit_code != 0, (spec, r.output)
        lines = [line for line in r.output.splitlines() if line.strip()]
        assert len(lines) == 1 and says in lines[0], (spec, r.output)
    r = runner.invoke(app, ["infer", "-d", "m", "-i", str(tmp_path / "x.npy"), "--min-accuracy", "0"])
    assert r.exit_code != 0 and "--min-accuracy" in r.output
