"""tools/gpu_all.sh, every stage, with a stand-in Python that only records its command lines.

The script runs only on a lent GPU host, where device time is scarce: a misspelt option or a
renamed tool costs a call there. Here each recorded command is checked against what it names:
click commands and argparse tools parse their arguments (nothing runs), `python -c` code
imports what it names and calls it with the right arity, pytest paths exist, and every
MOEPACK_* variable is one the package reads, with a value it accepts.
"""
from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest

from tests.runtime.test_offload_helpers import load_tool

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu_all.sh"

SHIM = """import json, os, sys
env = {k: v for k, v in os.environ.items() if k.startswith("MOEPACK_")}
with open(os.environ["GPU_ALL_RECORD"], "a") as f:
    f.write(json.dumps({"argv": sys.argv[1:], "env": env}) + "\\n")
"""


def _flag(value: str) -> bool:
    return value in ("0", "1")


def _prefill(value: str) -> bool:
    from runtime.kernels.prefill import PREFILL_MODES
    return value in PREFILL_MODES


# what each variable accepts; a name missing here is one the package does not read
ENV_VALUES = {
    "MOEPACK_CACHE_DIR": lambda v: bool(v),
    "MOEPACK_CPU_KERNEL": lambda v: v in ("native", "numba", "torch"),
    "MOEPACK_CPU_STEP": _flag,
    "MOEPACK_CPU_WIDE": _flag,
    "MOEPACK_CPU_WORKER": _flag,
    "MOEPACK_FLASH_DECODE": _flag,
    "MOEPACK_FUSED_DECODE": _flag,
    "MOEPACK_GEMV_INT": _flag,
    "MOEPACK_NO_TUNING": _flag,
    "MOEPACK_PREFILL": _prefill,
    "MOEPACK_SPLIT_ROWS": _flag,
}


class _Parsed(Exception):
    """Raised by the patched argparse once a tool's arguments parsed: the tool never runs."""


def _stages() -> str:
    return " ".join(sorted(set(re.findall(r"\bhas (\d+)\b", SCRIPT.read_text())), key=int))


@pytest.fixture(scope="module")
def script_run(tmp_path_factory) -> tuple[list[dict], str]:
    """(the recorded commands, $OUT/all.log) of one run over every stage."""
    if shutil.which("timeout") is None:
        pytest.skip("coreutils' timeout is not installed")
    tmp = tmp_path_factory.mktemp("gpu_all")
    shim = tmp / "shim.py"
    shim.write_text(SHIM)
    record = tmp / "record.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOEPACK_")}
    env.update(STAGES=_stages(), PY=f"{sys.executable} {shim}", OUT=str(tmp / "out"), GPU_ALL_RECORD=str(record))
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = record.read_text().splitlines() if record.exists() else []
    return [json.loads(line) for line in lines], (tmp / "out" / "all.log").read_text()


@pytest.fixture(scope="module")
def records(script_run) -> list[dict]:
    return script_run[0]


@pytest.fixture(scope="module")
def all_log(script_run) -> str:
    return script_run[1]


def test_every_stage_runs_a_command(records):
    log = " ".join(" ".join(r["argv"]) for r in records)
    for module in ("pytest", "runtime.tune", "runtime.bench", "runtime.baseline_bench", "quantize.measure"):
        assert f"-m {module} " in log
    for tool in ("kernel_bench", "profile_decode", "cpu_expert_bench", "offload_host", "cpu_diag"):
        assert f"tools/{tool}.py" in log


def test_no_stage_is_skipped(records, all_log):
    # with nothing taking time every stage fits the deadline: a skip here is a broken time budget
    assert "skipped" not in all_log
    started = re.findall(r"\] start (\S+) ", all_log)
    assert len(started) > 40
    assert re.findall(r"\] end (\S+): exit 0", all_log) == started


def _check_env(env: dict[str, str]) -> list[str]:
    bad = []
    for name, value in env.items():
        accepts = ENV_VALUES.get(name)
        if accepts is None:
            bad.append(f"{name} is not read by the package")
        elif not accepts(value):
            bad.append(f"{name}={value!r} is not accepted")
    return bad


def _click_command(module) -> click.Command:
    found = [v for v in vars(module).values()
             if isinstance(v, click.Command) and getattr(v.callback, "__module__", None) == module.__name__]
    groups = [c for c in found if isinstance(c, click.Group)]
    if groups:
        return groups[0]
    assert len(found) == 1, f"{module.__name__}: expected one click command, found {len(found)}"
    return found[0]


def _check_click(command: click.Command, prog: str, args: list[str]) -> None:
    if isinstance(command, click.Group):
        ctx = click.Context(command, info_name=prog)
        sub = command.get_command(ctx, args[0]) if args else None
        assert sub is not None, f"{prog}: no subcommand {args[:1]}"
        command, prog, args, parent = sub, args[0], args[1:], ctx
    else:
        parent = None
    # a path a stage makes before this command (make-checkpoint, then memory) exists on the GPU
    # host, not here: whether it exists is the run's business, not the parse's
    paths = [p.type for p in command.params if isinstance(p.type, click.Path) and p.type.exists]
    for t in paths:
        t.exists = False
    try:
        command.make_context(prog, list(args), parent=parent)
    except click.exceptions.Exit:
        pass
    except click.UsageError as e:
        pytest.fail(f"{prog} {' '.join(args)}: {e.format_message()}")
    finally:
        for t in paths:
            t.exists = True


def _check_argparse(main, prog: str, args: list[str], monkeypatch, capsys) -> None:
    if not inspect.signature(main).parameters:
        assert not args, f"{prog} takes no arguments, given {args}"
        return
    parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, argv=None, namespace=None):
        raise _Parsed(parse(self, argv, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    try:
        main(list(args))
    except _Parsed:
        return
    except SystemExit:
        pytest.fail(f"{prog} {' '.join(args)}: {capsys.readouterr().err.strip()}")
    finally:
        monkeypatch.undo()
    pytest.fail(f"{prog} returned without parsing its arguments")


def _check_code(code: str) -> None:
    tree = ast.parse(code)
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{node.module} has no {alias.name}"
                names[alias.asname or alias.name] = getattr(module, alias.name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in names:
            fn = names[node.func.id]
            try:
                inspect.signature(fn).bind(*node.args, **{k.arg: k.value for k in node.keywords})
            except TypeError as e:
                pytest.fail(f"python -c: {node.func.id}(...): {e}")


def _check_pytest(args: list[str]) -> None:
    for arg in args:
        if arg.startswith("tests/"):
            path = ROOT / arg.split("::")[0]
            assert path.exists(), f"pytest names {arg}, which does not exist"


def test_every_command_parses(records, monkeypatch, capsys):
    assert records
    for rec in records:
        argv, env = rec["argv"], rec["env"]
        assert not _check_env(env), (argv, _check_env(env))
        if argv[0] == "-m" and argv[1] == "pip":
            continue
        if argv[0] == "-m" and argv[1] == "pytest":
            _check_pytest(argv[2:])
        elif argv[0] == "-m":
            _check_click(_click_command(importlib.import_module(argv[1])), f"python -m {argv[1]}", argv[2:])
        elif argv[0] == "-c":
            _check_code(argv[1])
        else:
            path = Path(argv[0])
            assert path.parts[0] == "tools" and (ROOT / path).exists(), f"unknown script {argv[0]}"
            _check_argparse(load_tool(path.stem).main, argv[0], argv[1:], monkeypatch, capsys)


def test_the_checks_catch_a_misspelt_option(monkeypatch, capsys):
    from runtime import bench
    with pytest.raises(pytest.fail.Exception, match="--gpu-memroy"):
        _check_click(_click_command(bench), "python -m runtime.bench", ["--gpu-memroy", "12GiB"])
    with pytest.raises(pytest.fail.Exception, match="--jsn"):
        _check_argparse(load_tool("kernel_bench").main, "tools/kernel_bench.py", ["--jsn", "x"], monkeypatch, capsys)
    with pytest.raises(pytest.fail.Exception, match="bench_file"):
        _check_code("from runtime.bench import bench_file; bench_file(1)")
    assert _check_env({"MOEPACK_PREFILL": "fast", "MOEPACK_FUSE": "1"}) == [
        "MOEPACK_PREFILL='fast' is not accepted", "MOEPACK_FUSE is not read by the package"]


def test_a_path_made_earlier_in_the_stage_need_not_exist_here(tmp_path):
    """Stage 4 makes /tmp/ckpt-1g and then quantizes it: the check parses the second command on
    a machine where the folder was never made, and still catches what is wrong beside it."""
    from quantize import measure
    command, missing = _click_command(measure), str(tmp_path / "made-by-the-stage")
    _check_click(command, "python -m quantize.measure", ["memory", missing, "-o", missing + ".moepack"])
    with pytest.raises(pytest.fail.Exception, match="'cdua' is not one of"):
        _check_click(command, "python -m quantize.measure", ["memory", missing, "--device", "cdua"])
    memory = command.get_command(click.Context(command), "memory")
    assert next(p for p in memory.params if p.name == "src").type.exists  # the check put it back


def test_a_misspelt_recipe_fails_at_parse_time(monkeypatch, capsys):
    from runtime import baseline_bench
    with pytest.raises(pytest.fail.Exception, match="'4/2m8' is not one of"):
        _check_click(_click_command(baseline_bench), "python -m runtime.baseline_bench", ["--recipe", "4/2m8"])
    with pytest.raises(pytest.fail.Exception, match="'4/2m8' is not one of"):
        _check_argparse(load_tool("profile_decode").main, "tools/profile_decode.py", ["--recipe", "4/2m8"],
                        monkeypatch, capsys)


def test_tests_that_run_on_the_gpu_when_there_is_one_carry_the_cuda_marker():
    """Stage 1 runs `pytest -m cuda`: a test file that switches its device to CUDA where there is
    one, but carries no cuda marker, runs on the CPU in CI and never on the GPU host."""
    switch = re.compile(r"""["']cuda["'] if CUDA""")
    texts = {p.relative_to(ROOT).as_posix(): p.read_text() for p in (ROOT / "tests").rglob("*.py")}
    unmarked = [name for name, text in texts.items() if switch.search(text) and "mark.cuda" not in text]
    assert unmarked == []
