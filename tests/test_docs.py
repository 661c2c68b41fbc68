"""The documentation: no section of the former single-file README is lost, its links resolve, and every
example runs.

* Every ``##``/``###`` title of the README before it was split into ``docs/``, ``benchmarks/README.md``,
  ``CONTRIBUTING.md`` and ``CHANGELOG.md`` (``OLD_SECTIONS``, copied literally) is still a heading in one
  of those files, and every relative link between them points to a file and heading that exist.
* Every ``bash`` and ``python`` block of ``README.md`` and ``docs/*.md`` runs (``docs/compatibility.md``
  is written by ``pass-zoo check --sweep`` and has none): the blocks of one file in order, in one fresh
  temporary folder holding copies of the checkout's inputs; bash with ``bash -e``, each Python block in
  a fresh interpreter. ``PASS_ZOO_DOCS_SMALL=1`` (the default here) makes the ``pass-zoo`` on PATH
  append small settings to each command as written (``tests/docs_small.py`` lists them);
  ``PASS_ZOO_DOCS_SMALL=0`` runs the examples at full size (hours).
* A block whose first line is ``# needs: REASON`` (``NEEDS``) is only syntax-checked, and so is every
  block of ``benchmarks/README.md`` and ``CONTRIBUTING.md`` (benchmarks of hours, background jobs).
  ``yaml`` blocks must parse; plain blocks are output and are left alone.

Documented substitutions (``SUBSTITUTIONS``): in the README's quickstart ``bash scripts/setup.sh``
becomes ``bash -n scripts/setup.sh`` (it installs from the package registries into the environment)
and ``python3 -m pytest tests`` gets ``--collect-only`` (the suite would run itself); the temporary
folder's ``.venv/bin/activate`` activates the environment this test runs in.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

# `grep '^##' README.md` of the README before the split, copied literally.
OLD_SECTIONS = [
    "## Publish",
    "## What `prune` does",
    "### The export as a timm model: backbones, new heads, timm's train.py",
    "## Baselines, benchmarks and transfer",
    "## VPNs: unstructured weight masks",
    "## Results",
    "### Fair stage 1, layer-collapse guard, direct logits",
    "### B2: the same transfer, long enough to separate methods, under equal compute",
    "### B1: ImageNet Lite0 -> Fashion-MNIST at 64 px, every method under the same budget",
    "### Ablations (paper Table 3 and section 5): 25 % MACs, seed 0, B1's budget",
    "### Transfer (paper Table 2): 25 % MACs, seed 0, B1's budget",
    "### Costs",
    "## Design",
    "### Adding a method",
    "### Choices the paper leaves open",
    "## Distributed, checkpoints and resume",
    "## Robustness",
    "## Compatibility",
    "## Tests",
    "## Recipes",
]

GENERATED = {"compatibility.md"}  # written by `pass-zoo check --sweep`
NEEDS = {"network", "a pytorch-image-models checkout"}
SUBSTITUTIONS = {
    "README.md": [("bash scripts/setup.sh", "bash -n scripts/setup.sh"),
                  ("python3 -m pytest tests", "python3 -m pytest tests --collect-only -q")],
}
SMALL = os.environ.get("PASS_ZOO_DOCS_SMALL", "1")
BLOCK_TIMEOUT = 600 if SMALL == "1" else 6 * 3600


def doc_files():
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md",
            ROOT / "CONTRIBUTING.md", ROOT / "CHANGELOG.md"]


def run_files():
    return [ROOT / "README.md"] + [p for p in sorted((ROOT / "docs").glob("*.md")) if p.name not in GENERATED]


def check_files():
    return [ROOT / "benchmarks" / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "CHANGELOG.md"]


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


FENCE = re.compile(r"^```([^\s`]*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)


def blocks(path: Path):
    """``(language, first line number, code)`` of every fenced block, in order."""
    text = path.read_text()
    for m in FENCE.finditer(text):
        yield m.group(1), text.count("\n", 0, m.start()) + 2, m.group(2)


def prose(path: Path) -> str:
    """The file without its fenced blocks (headings and links inside code do not count)."""
    return FENCE.sub("", path.read_text())


def headings(path: Path):
    return [re.sub(r"^#+\s*", "", line).strip() for line in prose(path).splitlines()
            if re.match(r"^#{1,6}\s", line)]


def slug(title: str) -> str:
    """GitHub's anchor of a heading."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def anchors(path: Path):
    seen, out = {}, set()
    for title in headings(path):
        s = slug(title)
        out.add(s if s not in seen else f"{s}-{seen[s]}")
        seen[s] = seen.get(s, 0) + 1
    return out


def needs(code: str):
    first = code.lstrip("\n").splitlines()[0] if code.strip() else ""
    m = re.match(r"#\s*needs:\s*(.+)", first)
    return m.group(1).strip() if m else None


# --------------------------------------------------------------------------------------------------
# no section lost, links resolve, the README stays a first screen


def test_no_section_of_the_old_readme_is_lost():
    found = {title for path in doc_files() for title in headings(path)}
    missing = [s for s in OLD_SECTIONS if re.sub(r"^#+\s*", "", s) not in found]
    assert not missing, f"sections of the former README that are no heading anywhere now: {missing}"


def test_relative_links_and_anchors_resolve():
    bad = []
    for path in doc_files():
        for target in re.findall(r"\]\(([^)\s]+)\)", prose(path)):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            if not dest.exists():
                bad.append(f"{rel(path)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                bad.append(f"{rel(path)}: {target} (no heading with that anchor in {dest.name})")
    assert not bad, "\n".join(bad)


def test_readme_is_a_first_screen_and_keeps_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 300
    first_bash = next(code for lang, _, code in blocks(ROOT / "README.md") if lang == "bash" and not needs(code))
    assert "bash scripts/setup.sh && . .venv/bin/activate && pass-zoo prune " in first_bash
    assert ". .venv/bin/activate && python3 -m pytest tests" in first_bash
    assert "python3 -m pytest tests" in (ROOT / ".ci" / "run").read_text()  # CI runs the README's test command


def test_needs_markers_name_a_known_reason():
    bad = [f"{rel(p)}:{line}: # needs: {needs(code)}" for p in doc_files() for _, line, code in blocks(p)
           if needs(code) is not None and needs(code) not in NEEDS]
    assert not bad, f"unknown '# needs:' reasons (known: {sorted(NEEDS)}):\n" + "\n".join(bad)


# --------------------------------------------------------------------------------------------------
# examples


def syntax_check(path: Path, lang: str, line: int, code: str, tmp: Path) -> None:
    where = f"{rel(path)}:{line}"
    if lang == "python":
        compile(code, where, "exec")
    elif lang in ("bash", "sh", "shell"):
        res = subprocess.run(["bash", "-n"], input=code, capture_output=True, text=True)
        assert res.returncode == 0, f"{where}: bash -n failed\n{res.stderr}"
    elif lang == "yaml":
        yaml.safe_load(code)


def prepare(tmp: Path) -> dict:
    """A fresh folder with the checkout's inputs, and the environment the blocks run in."""
    for name in ("recipes", "scripts", "tests"):
        (tmp / name).symlink_to(ROOT / name, target_is_directory=True)
    (tmp / "benchmarks").mkdir()
    for spec in (ROOT / "benchmarks").glob("*.yaml"):
        shutil.copy(spec, tmp / "benchmarks" / spec.name)
    (tmp / "docs").mkdir()
    shutil.copy(ROOT / "docs" / "compatibility.json", tmp / "docs" / "compatibility.json")

    bin_dir = tmp / ".docs-bin"
    bin_dir.mkdir()
    shim = bin_dir / "pass-zoo"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{ROOT / "tests" / "docs_small.py"}" "$@"\n')
    shim.chmod(0o755)
    # `. .venv/bin/activate`: the environment this test runs in, with the docs' pass-zoo first on PATH
    real = Path(sys.prefix) / "bin" / "activate"
    venv_bin = tmp / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "activate").write_text((f'. "{real}"\n' if sys.prefix != sys.base_prefix and real.exists() else "")
                                       + f'export PATH="{bin_dir}:{Path(sys.executable).parent}:$PATH"\n')
    env = dict(os.environ)
    env.update(PATH=f"{bin_dir}:{Path(sys.executable).parent}:{env.get('PATH', '')}",
               PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p]),
               PASS_ZOO_DOCS_SMALL=SMALL, PASS_ZOO_DOCS_RECIPES=str(tmp / ".docs-recipes"),
               PASS_ZOO_CACHE=str(tmp / ".cache"), HF_HUB_OFFLINE="1", MPLBACKEND="Agg")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.pop("PASS_ZOO_TIMM_TRAIN", None)
    return env


def run_block(path: Path, lang: str, line: int, code: str, tmp: Path, env: dict) -> None:
    where = f"{rel(path)}:{line}"
    for old, new in SUBSTITUTIONS.get(rel(path), []):
        code = code.replace(old, new)
    if lang == "python":
        script = tmp / f".docs-block-{line}.py"
        script.write_text(code)
        cmd = [sys.executable, script.name]
    else:
        script = tmp / f".docs-block-{line}.sh"
        script.write_text(code)
        cmd = ["bash", "-e", script.name]
    res = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT)
    assert res.returncode == 0, (f"{where}: the {lang} block exited with {res.returncode}\n--- block\n{code}"
                                 f"--- output\n{(res.stdout + res.stderr)[-6000:]}")


@pytest.mark.parametrize("path", run_files(), ids=rel)
def test_examples_run(path, tmp_path):
    env = prepare(tmp_path)
    for lang, line, code in blocks(path):
        if lang not in ("bash", "python", "yaml"):
            continue
        if lang == "yaml" or needs(code):
            syntax_check(path, lang, line, code, tmp_path)
        else:
            run_block(path, lang, line, code, tmp_path, env)


@pytest.mark.parametrize("path", check_files(), ids=rel)
def test_examples_parse(path, tmp_path):
    for lang, line, code in blocks(path):
        syntax_check(path, lang, line, code, tmp_path)
