"""Runs the walk-through of an example's README.md, as a reader would type it, against a
running example stack, and compares what each command prints with what the README says
it prints. The README and the example can therefore not drift apart.

The README's convention (examples/README.md says it to readers):

- The walk-through is every ```sh block under the `## Walk-through` heading, run in
  order in one shell from the repository root (variables carry over between blocks).
- A line `# => text` under a command is a line the command prints (stdout and stderr);
  several such lines are its output in order. `...` in a line matches anything; a line
  that is only `...` matches any number of lines. A command with expected output may exit
  non-zero (`keygate check` exits 3 on a denial); one without must exit 0.
- Other `#` lines are comments. A line ending in `\\` continues on the next.

The test moves the addresses the README uses (Envoy on localhost:10000, keygate's HTTP
listener on 127.0.0.1:9090, and any other port the test names, such as a second
deployment's Envoy) to the stack's ports, and gives the shell the environment a reader
would have exported (KEYGATE_ADMIN_TOKEN, the example's secrets).
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import harness

SEP = "\x1e"


@dataclass
class Step:
    command: str
    expected: list[str] = field(default_factory=list)
    line: int = 0


def steps(readme: Path) -> list[Step]:
    """The walk-through's commands with what each is said to print."""
    lines = readme.read_text().splitlines()
    out: list[Step] = []
    in_section = in_block = False
    pending = ""
    for n, line in enumerate(lines, 1):
        if line.startswith("## "):
            in_section = line.strip() == "## Walk-through"
            continue
        if not in_section:
            continue
        if line.strip().startswith("```"):
            if in_block:
                assert not pending, f"{readme}:{n}: a command continues past its block"
            in_block = not in_block and line.strip() == "```sh"
            continue
        if not in_block:
            continue
        text = line.strip()
        if text.startswith("# =>"):
            assert out, f"{readme}:{n}: output before any command"
            out[-1].expected.append(text[len("# =>"):].removeprefix(" "))
        elif not text or text.startswith("#"):
            continue
        elif text.endswith("\\"):
            pending += text[:-1] + " "
        else:
            out.append(Step(pending + text, line=n))
            pending = ""
    assert out, f"{readme} has no `## Walk-through` with ```sh blocks"
    return out


def matches(expected: list[str], actual: list[str]) -> bool:
    pattern = ""
    for line in expected:
        if line == "...":
            pattern += r"(?:.*\n)*?"
        else:
            pattern += ".*".join(re.escape(part) for part in line.split("...")) + r"\n"
    return re.fullmatch(pattern, "".join(a + "\n" for a in actual)) is not None


def run(
    readme: Path, stack, env: dict[str, str], timeout: float = 120, ports: dict[int, int] | None = None
) -> None:
    """Runs every step against `stack` (an example `harness.Stack`); fails on the first
    command whose output or exit status is not what the README says. `ports`: other
    loopback ports the README names, moved to the test's (README port: test port)."""
    all_steps = steps(readme)
    moves = {10000: stack.envoy.port, 9090: stack.keygate.http_port, **(ports or {})}
    pattern = re.compile(r"\b(localhost|127\.0\.0\.1):(" + "|".join(map(str, moves)) + r")\b")
    script = ["set -u"]
    for i, step in enumerate(all_steps):
        # All at once: a test port may be one of the README's. keygate's HTTP listener is
        # on 127.0.0.1 only.
        command = pattern.sub(
            lambda m: f"{'127.0.0.1' if m.group(2) == '9090' else m.group(1)}:{moves[int(m.group(2))]}",
            step.command,
        )
        script.append(f"printf '{SEP}step {i}\\n'")
        script.append(f"{command} 2>&1")
        script.append(f"printf '{SEP}rc %d\\n' $?")
    bindir = str(Path(harness.keygate_bin()).resolve().parent)
    shell_env = stack.keygate.cli_env(**env)
    shell_env["PATH"] = bindir + ":" + shell_env.get("PATH", "")
    done = subprocess.run(
        ["bash", "--noprofile", "--norc", "-c", "\n".join(script)],
        cwd=harness.REPO,
        env=shell_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    outputs: dict[int, tuple[list[str], int]] = {}
    current, lines = None, []
    for raw in done.stdout.split("\n"):
        if raw.startswith(f"{SEP}step "):
            current, lines = int(raw.split()[-1]), []
        elif raw.startswith(f"{SEP}rc "):
            outputs[current] = (lines, int(raw.split()[-1]))
            current, lines = None, []
        elif current is not None:
            lines.append(raw.rstrip())
    for i, step in enumerate(all_steps):
        where = f"{readme.relative_to(harness.REPO)}:{step.line}: {step.command}"
        assert i in outputs, f"{where}\nnever finished; the shell printed:\n{done.stdout}\n{done.stderr}"
        actual, rc = outputs[i]
        if step.expected:
            assert matches(step.expected, actual), (
                f"{where}\nprinted:\n" + "\n".join(actual) + "\nthe README says:\n" + "\n".join(step.expected)
            )
        else:
            assert rc == 0, f"{where}\nexited {rc}:\n" + "\n".join(actual)
