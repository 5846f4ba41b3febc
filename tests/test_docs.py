"""The docs: README.md and docs/*.md name every command and config key, and their commands run as pasted.

Conventions (docs/development.md, "The docs and their commands"):
- a fenced block whose info string is ``bash`` is run; ``bash example (why)`` is an example that needs outside
  resources or never exits, and is never run;
- a ``yaml file=PATH`` block is written to PATH when the run reaches it;
- each page runs in one fresh ``bash`` (as a user pasting it into a new terminal), its blocks in order, README
  first and then the pages in the order README links them, all in one temporary directory that looks like the
  repository root (links to the checkout's files); a failing command fails the test with page and line.
"""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
FENCE = re.compile(r"^ {0,3}(`{3,})(.*)$")
EXAMPLE = re.compile(r"^bash example \(.+\)$")
YAML_FILE = re.compile(r"^yaml file=(\S+)$")
NOT_LINKED = {".git", "tiny", "demo_out", "runs", ".pytest_cache", "sweep.yaml"}  # what the pages write
PAGE_TIMEOUT_S = 600


@dataclasses.dataclass
class Block:
    page: Path
    info: str  # the fence's info string, e.g. "bash", "bash example (needs a GPU)", "yaml file=sweep.yaml"
    first: int  # page line of the first line inside the fence (1-based)
    last: int  # page line of the closing fence
    text: str

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}"


def blocks(page: Path) -> list[Block]:
    """Every fenced block of a markdown page, with its info string and page lines."""
    found, lines, i = [], page.read_text().splitlines(), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, info, start = m.group(1), m.group(2).strip(), i + 1
        j = start
        while j < len(lines) and not re.match(rf"^ {{0,3}}{fence}\s*$", lines[j]):
            j += 1
        if j == len(lines):
            raise AssertionError(f"{page.relative_to(ROOT)}:{i + 1}: fence never closed")
        found.append(Block(page, info, start + 1, j + 1, "\n".join(lines[start:j])))
        i = j + 1
    return found


def pages() -> list[Path]:
    """README, then the docs pages in the order of README's "Documentation" table, then any page it does not link."""
    linked, text = [], README.read_text()
    table = text[text.index("## Documentation"):] if "## Documentation" in text else text
    for name in re.findall(r"\]\((docs/[\w.-]+\.md)", table):
        path = ROOT / name
        if path not in linked:
            linked.append(path)
    return [README, *linked, *(p for p in sorted(DOCS.glob("*.md")) if p not in linked)]


def docs_text() -> str:
    return "\n".join(p.read_text() for p in sorted(DOCS.glob("*.md")))


# --- fast: what the pages must name ------------------------------------------------------------------


def subcommands() -> list[str]:
    """Every `fsweep ...` command of the argparse tree, nested ones spelled out (`fsweep roi train`)."""
    import argparse

    from fsweep.cli import build_parser

    def walk(parser: argparse.ArgumentParser, prefix: str) -> list[str]:
        found = []
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    nested = walk(sub, f"{prefix} {name}")
                    found += nested or [f"{prefix} {name}"]
        return found

    return walk(build_parser(), "fsweep")


def config_keys() -> list[str]:
    from fsmodels.config import Config

    return [f"{section.name}.{key.name}" for section in dataclasses.fields(Config)
            for key in dataclasses.fields(section.default_factory())]


def test_docs_name_every_command_and_key():
    text = docs_text()
    commands = subcommands()
    assert len(commands) >= 15 and "fsweep roi train" in commands and "fsweep predict" in commands
    missing = [c for c in commands if c not in text]
    assert not missing, f"fsweep commands that no page in docs/ names: {missing}"
    keys = config_keys()
    assert "space.aspect" in keys and "train.checkpoint_every" in keys
    missing = [k for k in keys if f"`{k}`" not in text]
    assert not missing, f"config keys that no page in docs/ names (as `section.key`): {missing}"


def test_every_page_is_linked_from_readme_and_readme_is_short():
    readme = README.read_text()
    assert len(readme.splitlines()) <= 250, f"README.md has {len(readme.splitlines())} lines (at most 250)"
    on_disk = sorted(DOCS.glob("*.md"))
    assert len(on_disk) >= 10
    unlinked = [p.name for p in on_disk if f"](docs/{p.name}" not in readme]
    assert not unlinked, f"docs pages README.md does not link: {unlinked}"


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_between_pages_resolve():
    broken = []
    for page in pages():
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"^[a-z]+://", target) or target.startswith("mailto:"):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and file.suffix == ".md":
                headings = {_anchor(h) for h in re.findall(r"^#+ (.+)$", file.read_text(), re.M)}
                if anchor not in headings:
                    broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_every_bash_block_is_run_or_marked_as_an_example():
    bad = []
    runnable = 0
    for page in pages():
        for block in blocks(page):
            lang = block.info.split(" ")[0] if block.info else ""
            if lang in ("bash", "sh", "shell", "console") and block.info != "bash" and not EXAMPLE.match(block.info):
                bad.append(f"{block.where}:{block.first - 1}: ```{block.info} (use ```bash, or "
                           "```bash example (why) for one that needs outside resources)")
            if lang == "yaml" and block.info != "yaml" and not YAML_FILE.match(block.info):
                bad.append(f"{block.where}:{block.first - 1}: ```{block.info} (use ```yaml file=PATH)")
            runnable += block.info == "bash"
    assert not bad, "\n".join(bad)
    assert runnable >= 10, f"only {runnable} runnable bash blocks"


def test_harness_names_page_and_line_of_a_broken_block(tmp_path):
    """The runner's own check: a failing command in a page is reported with its page line."""
    page = tmp_path / "broken.md"
    page.write_text("# t\n\n```bash\ntrue\nfsweep-no-such-command --x\ntrue\n```\n")
    with pytest.raises(AssertionError, match=r"broken\.md:5: command failed \(exit 127\)"):
        run_page(page, tmp_path, label="broken.md")


# --- slow: every runnable block, as pasted ------------------------------------------------------------


def page_script(page: Path) -> tuple[str, dict[int, tuple[int, Block]]]:
    """One bash script of a page's runnable blocks, and script line -> (page line, block)."""
    lines = ["set -Eeuo pipefail", "trap 'echo \"__DOCS_FAILED__ $LINENO $?\" >&2' ERR"]
    where: dict[int, tuple[int, Block]] = {}
    for block in blocks(page):
        m = YAML_FILE.match(block.info)
        if m:
            lines += [f"mkdir -p \"$(dirname '{m.group(1)}')\"", f"cat > '{m.group(1)}' <<'__DOCS_EOF__'",
                      *block.text.splitlines(), "__DOCS_EOF__"]
        elif block.info == "bash":
            for offset, line in enumerate(block.text.splitlines()):
                lines.append(line)
                where[len(lines)] = (block.first + offset, block)
    return "\n".join(lines) + "\n", where


def _environment() -> dict:
    """This process's environment without the virtual environment on PATH: the pages activate it themselves."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME")}
    venv_bin = str(ROOT / ".venv" / "bin")
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p and p != venv_bin)
    env.update(MPLBACKEND="Agg", PYTHONUNBUFFERED="1")
    return env


def run_page(page: Path, workdir: Path, label: str | None = None) -> float:
    """Run a page's blocks in one fresh bash in ``workdir``; AssertionError naming page and line on failure."""
    label = label or str(page.relative_to(ROOT))
    script, where = page_script(page)
    if not where:
        return 0.0
    log = workdir / f"docs-{label.replace('/', '_')}.log"
    started = time.monotonic()
    with open(log, "w") as out:
        try:
            proc = subprocess.run(["bash", "-c", script], cwd=workdir, env=_environment(), stdout=out,
                                  stderr=subprocess.STDOUT, timeout=PAGE_TIMEOUT_S)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = None
    output = log.read_text()
    if code == 0:
        return time.monotonic() - started
    failed = re.findall(r"__DOCS_FAILED__ (\d+) (\d+)", output)
    tail = "\n".join(line for line in output.splitlines()[-25:] if "__DOCS_FAILED__" not in line)
    if code is None:
        raise AssertionError(f"{label}: its commands ran past {PAGE_TIMEOUT_S} s\n{tail}")
    if failed:
        script_line, status = int(failed[-1][0]), failed[-1][1]
        line, block = where.get(script_line, (0, None))
        command = script.splitlines()[script_line - 1].strip()
        span = f" in the bash block at lines {block.first}-{block.last - 1}" if block else ""
        raise AssertionError(f"{label}:{line}: command failed (exit {status}){span}: {command}\n{tail}")
    raise AssertionError(f"{label}: its commands failed (exit {code})\n{tail}")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> dict:
    """A temporary directory that looks like the repository root, and the pages already run in it."""
    path = tmp_path_factory.mktemp("docs")
    for entry in ROOT.iterdir():
        if entry.name not in NOT_LINKED:
            (path / entry.name).symlink_to(entry)
    return {"path": path, "ran": {}}


@pytest.mark.slow
@pytest.mark.timeout(PAGE_TIMEOUT_S + 60)
@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_commands_run_as_pasted(page: Path, workdir: dict):
    if page != README and README not in workdir["ran"]:  # the pages use the walk-through's files
        workdir["ran"][README] = run_page(README, workdir["path"])
    workdir["ran"][page] = run_page(page, workdir["path"])
    print(f"{page.relative_to(ROOT)}: {workdir['ran'][page]:.0f} s")
