"""Every code block of README.md runs as written, so the README cannot drift (harness: tests/_readme.py).

One test per README section runs that section's blocks in order in a fresh interpreter, in a
working copy of the repo, with a temporary BYZERLLM_HOME; a block marked
``<!-- readme-test: skip: <reason> -->`` is reported as a skipped test with its reason.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from _readme import MARK, layout_paths, parse

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
VENV = ROOT / ".venv"
SECTION_TIMEOUT_S = 480

BLOCKS, PROBLEMS = parse(README.read_text())
SECTIONS: dict[str, list] = {}
for _block in BLOCKS:
    if _block.runs:
        SECTIONS.setdefault(_block.section, []).append(_block)


def _slug(section: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", section.lower()).strip("-")


def test_every_block_says_what_it_is():
    """Each fence has a language the harness knows, each marker a reason, and no code is indented."""
    assert not PROBLEMS, "\n".join(PROBLEMS)
    assert SECTIONS, "the parser found no runnable block in README.md"


def test_no_seed_or_issue_wording():
    """Users read about Byzer-LLM and its docs, not about this project's seed files or issue numbers."""
    # "seed" alone, but not the sampling parameter (`seed`, generation.seed).
    pattern = re.compile(r"(?<![.`])\bseeds?\b|\(issues? \d", re.IGNORECASE)
    found = [f"README.md:{n}: {line.strip()}" for n, line in enumerate(README.read_text().splitlines(), 1)
             if pattern.search(line)]
    package = re.compile(r"seed 00|\(issue ", re.IGNORECASE)
    for path in sorted((ROOT / "byzerllm_spark").rglob("*.py")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if package.search(line):
                found.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    found += [f"{command}: {line.strip()}" for command, text in _cli_help().items() for line in text.splitlines()
              if package.search(line)]
    assert not found, "\n".join(found)


def test_layout_names_real_files():
    """The Layout tree names files and folders that exist."""
    layout = [b for b in BLOCKS if b.section == "Layout" and b.lang == "text"]
    assert len(layout) == 1, "README.md's Layout section should have one text block, the tree"
    paths = layout_paths(layout[0].code)
    missing = [p for p in paths if not (ROOT / p).exists()]
    assert paths and not missing, f"{layout[0].where} names what does not exist: {missing}"


def _cli_help() -> dict[str, str]:
    """``byzerllm --help`` and each subcommand's ``--help``."""
    def run(*args: str) -> str:
        done = subprocess.run([str(VENV / "bin" / "byzerllm"), *args, "--help"], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, f"byzerllm {' '.join(args)} --help failed:\n{done.stderr}"
        return done.stdout

    top = run()
    helps = {"byzerllm --help": top}
    for sub in re.findall(r"^ {4}([a-z][\w-]*)", top, re.MULTILINE):  # argparse lists subcommands indented by 4
        helps[f"byzerllm {sub} --help"] = run(sub)
    assert len(helps) > 1, f"no subcommands found in `byzerllm --help`:\n{top}"
    return helps


def test_docs_live_in_the_readme():
    """docs/ copies of README sections drifted before; the README is the one place."""
    copies = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").rglob("*.md")) if (ROOT / "docs").exists() else []
    assert not copies, f"move these into README.md (its blocks are tested) and delete them: {copies}"


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.skip], ids=lambda b: f"line{b.line}")
def test_skipped_block(block):
    """A marked block is reported with its reason; the files its command names must still exist."""
    for path in re.findall(r"(?<![\w/.])((?:scripts|benchmarks|tests|examples)/[\w./-]+\.(?:py|sh))", block.code):
        assert (ROOT / path).exists(), f"{block.where} names {path}, which does not exist"
    pytest.skip(f"{block.where}: {block.skip}")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A working copy of the repo (tracked and untracked files; the package and .venv linked) and a temporary home."""
    base = tmp_path_factory.mktemp("readme")
    copy = base / "repo"
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    linked = ("byzerllm_spark", ".venv")  # the package Ray's and Spark's workers import, and its environment
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file() and name.split("/")[0] not in linked:
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, copy / name)
    for name in linked:
        (copy / name).symlink_to(ROOT / name)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYSPARK_", "BYZERLLM_", "SPARK_", "RAY_ADDRESS", "VIRTUAL_ENV"))}
    env.update(
        PATH=f"{VENV / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",  # an activated .venv
        VIRTUAL_ENV=str(VENV),
        BYZERLLM_HOME=str(base / "home"),
        PYTHONUNBUFFERED="1",
    )
    yield copy, env
    shutil.rmtree(base, ignore_errors=True)


def _stop_group(pgid: int) -> None:
    """Whatever the section left running in its process group (a Ray worker, a server) goes too."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        time.sleep(2)


# Ray waits a fixed 30 s for a new node's raylet to register; on a machine shared with other heavy
# test runs it can miss that, which says nothing about the README. Such a section runs once more.
RAY_START_TIMEOUT = "The current node timed out during startup"


def _failure(log: str, line) -> str:
    start = log.rfind(f"{MARK}{line} ") if line not in (None, "cleanup") else -1
    start = log.rfind(MARK) if start < 0 else start
    shown = log[start:] if start >= 0 else log
    tail = shown.splitlines()[-200:]
    return "\n".join(tail)


def _run_section(section: str, copy: Path, env: dict) -> tuple[dict | None, str, float, int]:
    """Run one section's blocks in a fresh interpreter: (outcome or None on timeout, output, seconds, exit code)."""
    blocks = SECTIONS[section]
    plan = copy.parent / f"plan-{_slug(section)}.json"
    result = copy.parent / f"result-{_slug(section)}.json"
    log_path = copy.parent / f"log-{_slug(section)}.txt"
    result.unlink(missing_ok=True)
    plan.write_text(json.dumps({"blocks": [b.__dict__ for b in blocks], "result": str(result)}))
    started = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([str(VENV / "bin" / "python"), str(copy / "tests" / "_readme.py"), str(plan)],
                                cwd=copy, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=SECTION_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass
        finally:
            _stop_group(proc.pid)
            proc.wait()
    outcome = json.loads(result.read_text()) if result.exists() else None
    return outcome, log_path.read_text(errors="replace"), time.monotonic() - started, proc.returncode


@pytest.mark.slow
@pytest.mark.parametrize("section", list(SECTIONS), ids=_slug)
def test_section(section, workdir):
    copy, env = workdir
    outcome, output, elapsed, code = _run_section(section, copy, env)
    if outcome and outcome["failed"] is not None and RAY_START_TIMEOUT in output:
        print(f"'{section}': Ray did not start in time (an overloaded machine); running the section again")
        outcome, output, elapsed, code = _run_section(section, copy, env)
    if outcome is None:
        running = re.findall(re.escape(MARK) + r"(\S+) ", output)
        where = f"README.md:{running[-1]}" if running else "before the first block"
        pytest.fail(f"section '{section}' did not finish in {SECTION_TIMEOUT_S} s (exit {code}); "
                    f"it was running {where}:\n{_failure(output, None)}")
    failed = outcome["failed"]
    print(f"'{section}' ran in {elapsed:.0f} s; seconds per README line: {outcome['seconds']}")
    if failed is not None:
        where = f"README.md:{failed}" if failed != "cleanup" else "the clean-up after the last block"
        pytest.fail(f"section '{section}': {where} failed:\n{_failure(output, failed)}", pytrace=False)
