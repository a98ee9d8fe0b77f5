"""Checking cluster job scripts without a scheduler: their directives, and their command lines
with the launchers stubbed out (each stub records its argv)."""
import json
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def directives(path, prefix):
    """The scheduler directives, checked to come before the first command (schedulers stop reading there)."""
    lines = Path(REPO / path).read_text().splitlines()
    assert lines[0] == "#!/bin/bash"
    first_command = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith("#"))
    found = [line for line in lines if line.startswith(prefix + " ")]
    assert found and all(lines.index(line) < first_command for line in found)
    return [line[len(prefix):].strip() for line in found]


def dry_run(script, tmp_path, env, recorded=("python", "torchrun"), passthrough=(), printing=None):
    """``bash -n``, then run ``script`` with the ``recorded`` tools stubbed to log their argv,
    ``passthrough`` tools stubbed to run their arguments, and ``printing`` ({tool: text}) to print
    text. Returns each recorded call's argv (tool name first)."""
    assert subprocess.run(["bash", "-n", str(REPO / script)]).returncode == 0
    log, bin_dir = tmp_path / "calls.jsonl", tmp_path / "bin"
    bin_dir.mkdir()
    stubs = {tool: f"exec {shlex.quote(sys.executable)} -c 'import json, sys; open(sys.argv[1], \"a\")"
                   f".write(json.dumps(sys.argv[2:]) + \"\\n\")' {log} {tool} \"$@\"" for tool in recorded}
    stubs |= {tool: 'while [ "${1#-}" != "$1" ]; do shift; done; exec "$@"' for tool in passthrough}
    stubs |= {tool: f"echo {shlex.quote(text)}" for tool, text in (printing or {}).items()}
    for tool, body in stubs.items():
        (bin_dir / tool).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / tool).chmod(0o755)
    env = env | {"PATH": f"{bin_dir}:{env['PATH']}"}
    done = subprocess.run(["bash", str(REPO / script)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in log.read_text().splitlines()]


def modules_called(calls):
    """{module: its arguments} of the recorded ``... -m module args`` calls."""
    modules = {}
    for call in calls:
        m = call.index("-m")
        modules[call[m + 1]] = call[m + 2:]
    return modules
