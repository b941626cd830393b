"""The README test harness: README.md's fenced code blocks, parsed and run as a new user runs them.

Parsing. Every fenced block (a line starting with three backticks or tildes) becomes a ``Block``: its
language (the fence's info string), the README line of its opening fence, and the top-level section
(``## `` heading; blocks above the first one belong to the title) it sits under. A block that cannot
run here is marked by an HTML comment on the line right before its fence, with the reason::

    <!-- readme-test: skip: needs CUDA -->

Languages. ``python`` (a block whose first line starts with ``>>>`` is a REPL transcript, as is
``pycon``: its ``>>>``/``...`` statements run, the output shown is not compared), ``bash``/``sh``/
``shell`` and ``sql`` run; ``text``, ``json`` and the other languages of ``SHOWN`` are output or data
and never run. Any other language, a bare fence, an indented code block and a malformed marker are
errors (``problems()``), so every block says what it is.

Running (``python tests/_readme.py <plan.json>``, one process per section, started by
``tests/test_readme.py`` in a working copy of the repo with a temporary ``BYZERLLM_HOME`` and
``.venv/bin`` first on ``PATH``). The section's blocks run in README order in one interpreter:
python blocks ``exec`` in one namespace (compiled with the README's line numbers, so tracebacks
point into README.md), ``sql`` blocks through that namespace's ``spark`` (``spark.sql(...).show()``)
and shell blocks with ``bash -e -o pipefail``. Before each block the runner prints ``MARK`` with the
block's line; the first failure stops the section. Whatever the section started (Spark, Ray and
Serve, a ``byzerllm start`` cluster) is stopped on the way out.
"""

from __future__ import annotations

import builtins
import dataclasses
import json
import os
import re
import subprocess
import sys
import time
import traceback

RUN_PYTHON = {"python", "py", "pycon"}
RUN_SHELL = {"bash", "sh", "shell"}
RUN_SQL = {"sql"}
SHOWN = {"text", "json", "toml", "yaml", "ini", "csv", "diff", "output"}
MARK = "##### README.md:"
_MARKER = re.compile(r"^<!--\s*readme-test:(.*?)-->\s*$")
_FENCE = re.compile(r"^(`{3,}|~{3,})\s*([^`\s]*)")
_LIST_ITEM = re.compile(r"^\s*([-*+]|\d+[.)])\s")


@dataclasses.dataclass(frozen=True)
class Block:
    line: int  # README line of the opening fence (1-based)
    lang: str
    code: str
    section: str  # the ``## `` heading above it, or the title
    skip: str | None = None  # the marker's reason

    @property
    def runs(self) -> bool:
        return self.skip is None and (self.lang in RUN_PYTHON | RUN_SHELL | RUN_SQL)

    @property
    def where(self) -> str:
        return f"README.md:{self.line} ({self.lang or 'no language'}) in '{self.section}'"


def parse(text: str) -> tuple[list[Block], list[str]]:
    """The fenced blocks of a Markdown text, and the problems found on the way (see ``problems``)."""
    lines = text.splitlines()
    blocks: list[Block] = []
    problems: list[str] = []
    section = ""
    marker: tuple[int, str] | None = None  # (line, reason) waiting for its fence
    i = 0
    while i < len(lines):
        line, number = lines[i], i + 1
        fence = _FENCE.match(line)
        if fence:
            closing, lang = fence.group(1), fence.group(2).lower()
            body = []
            i += 1
            while i < len(lines) and not lines[i].startswith(closing):
                body.append(lines[i])
                i += 1
            if i == len(lines):
                problems.append(f"README.md:{number}: fence never closed")
            code = "\n".join(body) + "\n"
            if lang in ("python", "py") and code.lstrip().startswith(">>>"):
                lang = "pycon"
            skip = marker[1] if marker and marker[0] == number - 1 else None
            if marker and skip is None:
                problems.append(f"README.md:{marker[0]}: a readme-test marker must be on the line right before a fence")
            marker = None
            blocks.append(Block(number, lang, code, section or "(title)", skip))
            if skip is None and lang not in RUN_PYTHON | RUN_SHELL | RUN_SQL | SHOWN:
                problems.append(
                    f"README.md:{number}: fence with language {lang!r}: use one the test runs "
                    f"({', '.join(sorted(RUN_PYTHON | RUN_SHELL | RUN_SQL))}), one it shows "
                    f"({', '.join(sorted(SHOWN))}), or a skip marker with a reason"
                )
        elif line.startswith("<!--") and "readme-test" in line:
            found = _MARKER.match(line.strip())
            reason = re.fullmatch(r"\s*skip:\s*(\S.*?)\s*", found.group(1)) if found else None
            if reason is None:
                problems.append(
                    f"README.md:{number}: malformed marker {line.strip()!r}; "
                    "write <!-- readme-test: skip: <why this block cannot run here> -->"
                )
            else:
                marker = (number, reason.group(1))
        elif line.startswith("## "):
            section = line[3:].strip()
        elif _indented_code(lines, i):
            problems.append(f"README.md:{number}: indented code block; fence it with its language")
        i += 1
    if marker:
        problems.append(f"README.md:{marker[0]}: a readme-test marker must be on the line right before a fence")
    return blocks, problems


def _indented_code(lines: list[str], i: int) -> bool:
    """An indented code block starts: 4+ spaces after a blank line that does not continue a list."""
    if not lines[i].startswith("    ") or not lines[i].strip() or i == 0 or lines[i - 1].strip():
        return False
    j = i - 1
    while j >= 0 and not lines[j].strip():
        j -= 1
    # Walk up the paragraph before the blank: inside a list, indented text continues an item.
    while j >= 0 and lines[j].strip():
        if _LIST_ITEM.match(lines[j]):
            return False
        j -= 1
    return True


def pycon_statements(block: Block) -> list[tuple[int, str]]:
    """The statements of a REPL transcript with their README line: ``>>>`` starts one, ``...`` continues."""
    out: list[tuple[int, str]] = []
    for offset, line in enumerate(block.code.splitlines(), start=block.line + 1):
        if line.startswith(">>>"):
            out.append((offset, line[4:]))
        elif line.startswith("...") and out:
            out[-1] = (out[-1][0], out[-1][1] + "\n" + line[4:])
    return out


def layout_paths(code: str) -> list[str]:
    """The paths a Layout tree names: its entries, and the ``*.py`` files listed beside a folder.

    An entry is the first word of a line; an entry indented by two spaces is inside the last
    unindented folder; a line indented further continues the entry above it.
    """
    paths: list[str] = []
    root = folder = ""
    for line in code.splitlines():
        indent = len(line) - len(line.lstrip())
        entry, _, rest = line.strip().partition(" ")
        if not entry:
            continue
        if indent > 2:
            rest = line
        else:
            path = entry if indent == 0 else root + entry
            paths.append(path)
            if indent == 0:
                root = entry if entry.endswith("/") else ""
            folder = path if path.endswith("/") else root
        paths += [folder + name for name in re.findall(r"(?<![\w./])\w+\.py\b", rest)]
    return paths


# The runner: one process per README section.


def _compile(source: str, line: int, mode: str):
    # Pad so that the code's first line is README line ``line``: tracebacks point into README.md.
    return compile("\n" * (line - 1) + source, "README.md", mode)


def _run_block(block: Block, namespace: dict) -> None:
    if block.lang == "pycon":
        for line, statement in pycon_statements(block):
            exec(_compile(statement + "\n", line, "single"), namespace)
    elif block.lang in RUN_PYTHON:
        exec(_compile(block.code, block.line + 1, "exec"), namespace)
    elif block.lang in RUN_SQL:
        spark = namespace.get("spark")
        if spark is None:
            raise RuntimeError("a sql block, but no earlier python block of this section made `spark`")
        spark.sql(block.code.strip().rstrip(";")).show(truncate=60)
    else:
        subprocess.run(["bash", "-e", "-o", "pipefail", "-c", block.code], check=True)


def _dashboard_agent_port_if_taken() -> None:
    """Let this section's Ray take a free dashboard agent port when another Ray holds the fixed one.

    Ray's dashboard agent listens on 52365, and ``ray.init`` has no argument to change it. Where
    another Ray runs on the machine (the test session's own cluster when the whole suite runs, or
    another run), this section's agent cannot bind, and its Ray takes no jobs: ``bls.sft`` fails
    with "No available agent to submit job". The README is not at fault, so the harness asks Ray
    for a free port (0), which its agent supports, instead.
    """
    import socket

    try:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 52365))
        return
    except OSError:
        pass
    from ray._private.parameter import RayParams

    original = RayParams.__init__

    def init(self, *args, **kwargs):
        kwargs.setdefault("dashboard_agent_listen_port", 0)
        original(self, *args, **kwargs)

    RayParams.__init__ = init
    print("readme-test: port 52365 is taken by another Ray here; this section's dashboard agent takes a free one")


def _cleanup(namespace: dict) -> None:
    """Stop what the section started: Spark first (its UDFs call Serve), then Serve and Ray."""
    if "pyspark" in sys.modules:
        from pyspark.sql import SparkSession

        for session in {id(s): s for s in (namespace.get("spark"), SparkSession.getActiveSession()) if s}.values():
            session.stop()
    if "ray" in sys.modules:
        import ray

        import byzerllm_spark as bls

        if ray.is_initialized():
            try:
                for model in bls.list_models():
                    bls.undeploy(model)
            finally:
                bls.shutdown()
    from byzerllm_spark.cluster import stop_local_cluster

    stop_local_cluster(timeout=30)  # a `byzerllm start` cluster of this section, if any


def main(plan_path: str) -> int:
    with open(plan_path) as f:
        plan = json.load(f)
    blocks = [Block(**b) for b in plan["blocks"]]
    sys.path[0] = ""  # like `python` at a prompt: the working directory is importable
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    _dashboard_agent_port_if_taken()
    failed = None
    seconds: dict[str, float] = {}
    try:
        for block in blocks:
            print(f"\n{MARK}{block.line} ({block.lang}) #####", flush=True)
            started = time.monotonic()
            try:
                _run_block(block, namespace)
            except BaseException:
                traceback.print_exc()
                failed = block.line
                break
            finally:
                seconds[str(block.line)] = round(time.monotonic() - started, 1)
                sys.stdout.flush()
                sys.stderr.flush()
    finally:
        print(f"\n{MARK}cleanup #####", flush=True)
        started = time.monotonic()
        try:
            _cleanup(namespace)
        except Exception:
            traceback.print_exc()
            failed = failed or "cleanup"
        seconds["cleanup"] = round(time.monotonic() - started, 1)
        with open(plan["result"], "w") as f:
            json.dump({"failed": failed, "seconds": seconds}, f)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
