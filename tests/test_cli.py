"""The command-line contract of every console script (setup.cfg ``console_scripts``).

* a missing input is one line ``m2-<tool>: error: ...`` naming it, exit status 2, no traceback;
* a usage error (a flag combination argparse or the tool refuses) is one line too;
* ``--help`` shows each flag's default exactly once (flags whose default means "not set" show
  none) and names no file outside the repository.
"""

import argparse
import configparser
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_m2.cli.common import HelpFormatter, shows_default

ROOT = Path(__file__).resolve().parents[1]


def _scripts():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    out = {}
    for line in cfg["options.entry_points"]["console_scripts"].strip().splitlines():
        name, target = (x.strip() for x in line.split("="))
        out[name] = target
    return out


SCRIPTS = _scripts()
MISSING = "/nonexistent/m2-test"
# One run of each tool on an input that does not exist. New console scripts must be added here.
MISSING_INPUT = {
    "m2-pretrain": ["--data-path", f"{MISSING}/train", "--tokenizer-model", f"{MISSING}/tok"],
    "m2-preprocess": ["--input", f"{MISSING}/a.jsonl", "--output-prefix", "/tmp/m2-x",
                      "--tokenizer-model", f"{MISSING}/tok"],
    "m2-train-tokenizer": ["--input", f"{MISSING}/c.txt", "--model-prefix", "/tmp/m2-x",
                           "--vocab-size", "100"],
    "m2-merge-datasets": ["--input", f"{MISSING}/a", "--output-prefix", "/tmp/m2-x"],
    "m2-inspect-dataset": ["--input", f"{MISSING}/a"],
    "m2-convert": ["--from", "ours", "--to", "single", "--input", f"{MISSING}/ckpt",
                   "--output", "/tmp/m2-x.safetensors"],
    "m2-eval": ["--load", f"{MISSING}/ckpt", "--task", "retrieval", "--data", f"{MISSING}/d"],
    "m2-plan": ["--model-config", f"{MISSING}/model.json"],
    "m2-embed": ["--load", f"{MISSING}/ckpt", "--images", f"{MISSING}/photos", "--output",
                 "/tmp/m2-x"],
    "m2-serve": ["--load", f"{MISSING}/model.safetensors", "--store", f"{MISSING}/store"],
}
USAGE_ERROR = {  # a flag value or combination the tool refuses before doing anything
    "m2-pretrain": ["--synthetic", "--lr", "-1"],
    "m2-preprocess": ["--input", "x.jsonl", "--output-prefix", "x", "--tokenizer-model", "t",
                      "--max-reject-fraction", "2"],
    "m2-train-tokenizer": ["--input", "x.txt", "--model-prefix", "x"],
    "m2-merge-datasets": ["--output-prefix", "x"],
    "m2-inspect-dataset": ["--input", "x", "--write-card"],
    "m2-convert": ["--from", "official", "--to", "single", "--input", "x", "--output", "y"],
    "m2-eval": ["--load", "x", "--task", "zeroshot"],
    "m2-plan": ["--flavor", "tiny", "--build-groups", "--ranks", "0,x"],
    "m2-embed": ["--load", "x", "--output", "y", "--texts", "t", "--chunk-size", "0"],
    "m2-serve": ["--load", "x", "--max-batch", "0"],
}


def _run(name, argv):
    module, func = SCRIPTS[name].split(":")
    code = f"import sys; from {module} import {func}; sys.exit({func}())"
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                          timeout=180, cwd=ROOT)


def test_every_console_script_is_covered():
    assert set(MISSING_INPUT) == set(SCRIPTS) == set(USAGE_ERROR)


def test_every_console_script_lives_in_the_cli_package():
    """One place for entry points: ``megatron_m2/cli/<tool>.py``, each with ``build_parser``."""
    for name, target in SCRIPTS.items():
        module, func = target.split(":")
        assert module.startswith("megatron_m2.cli.") and func == "main", f"{name} -> {target}"
        assert hasattr(importlib.import_module(module), "build_parser"), name


def test_module_aliases_run_the_console_scripts():
    """``python -m megatron_m2.pretrain`` (torchrun, the Slurm recipes) and ``tools/plan.py``
    are the console scripts, not copies."""
    import megatron_m2.cli.plan
    import megatron_m2.cli.pretrain
    import megatron_m2.pretrain
    from tests.helpers.tools import load_tool

    assert megatron_m2.pretrain.main is megatron_m2.cli.pretrain.main
    assert load_tool("plan").main is megatron_m2.cli.plan.main


def _one_error_line(name, argv) -> str:
    """Run the tool; it must exit 2 with exactly one stderr line ``name: error: ...``."""
    proc = _run(name, argv)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{name}: error: "), proc.stderr
    return lines[0]


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_missing_input_is_one_line(name):
    assert MISSING in _one_error_line(name, MISSING_INPUT[name])


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_usage_error_is_one_line(name):
    _one_error_line(name, USAGE_ERROR[name])


def _parser(name) -> argparse.ArgumentParser:
    return importlib.import_module(SCRIPTS[name].split(":")[0]).build_parser()


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_help_shows_each_default_once(name):
    parser = _parser(name)
    assert parser.prog == name
    text = parser.format_help()
    for banned in ("DESIGN", "../shared", "shared/"):
        assert banned not in text, f"{name} --help mentions {banned!r}"
    formatter = HelpFormatter(name)
    for action in parser._actions:
        if action.help in (None, argparse.SUPPRESS):
            continue
        help_text = formatter._get_help_string(action) % {"default": action.default,
                                                          "prog": name}
        count = len(re.findall(r"\(default[:\s]", help_text))  # "(default: ...)" statements
        flag = "/".join(action.option_strings)
        assert count <= 1, f"{name} {flag}: the default is stated {count} times: {help_text!r}"
        if shows_default(action):
            assert count == 1, f"{name} {flag}: default {action.default!r} not shown"
