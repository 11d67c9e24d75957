"""The sdist holds what building fastmsc from it needs (the C++/CUDA sources, setup.py, the package and its data)
and no build output. Building a wheel from it takes minutes and is left to the CI (.ci/run, wheel stage).

The sdist is built through setuptools' PEP 517 hook without isolation, which is what
``python -m build --sdist --no-isolation`` calls, so the test needs no build frontend.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUILD_SDIST = "import sys\nfrom setuptools import build_meta\nprint(build_meta.build_sdist(sys.argv[1]))\n"
TOP_LEVEL = {"setup.py", "pyproject.toml", "README.md", "MANIFEST.in", "PKG-INFO"}
FORBIDDEN_PARTS = {"__pycache__", ".venv", "venv", "build", "dist", ".git", ".pytest_cache"}


@pytest.fixture(scope="module")
def sdist_names(tmp_path_factory) -> set[str]:
    """The sdist's file names, relative to its top folder."""
    if not (REPO / "setup.py").is_file():
        pytest.skip("not a source checkout (setup.py absent): nothing to build an sdist from")
    out = tmp_path_factory.mktemp("sdist")
    result = subprocess.run([sys.executable, "-c", BUILD_SDIST, str(out)], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, f"building the sdist failed:\n{result.stderr}"
    archive = out / result.stdout.strip().splitlines()[-1]
    with tarfile.open(archive) as tar:
        members = [m.name for m in tar.getmembers() if m.isfile()]
    top = {name.split("/", 1)[0] for name in members}
    assert top == {archive.name.removesuffix(".tar.gz")}, top
    return {name.split("/", 1)[1] for name in members}


def test_sdist_has_build_files_and_sources(sdist_names):
    missing = TOP_LEVEL - sdist_names
    assert not missing, f"missing from the sdist: {sorted(missing)}"
    csrc = {f"csrc/{p.name}" for p in (REPO / "csrc").iterdir() if p.suffix in (".h", ".cpp", ".cu")}
    assert csrc and csrc <= sdist_names, f"missing from the sdist: {sorted(csrc - sdist_names)}"


def test_sdist_has_the_package(sdist_names):
    package = {p.relative_to(REPO).as_posix() for p in (REPO / "fastmsc").rglob("*.py")
               if "__pycache__" not in p.parts}
    package.add("fastmsc/dispatch_table.json")
    assert "fastmsc/__init__.py" in package
    assert package <= sdist_names, f"missing from the sdist: {sorted(package - sdist_names)}"


def test_sdist_has_no_build_output(sdist_names):
    bad = sorted(name for name in sdist_names
                 if name.endswith((".so", ".pyd", ".pyc", ".o", ".whl")) or name.endswith("_build_info.json")
                 or FORBIDDEN_PARTS & set(Path(name).parts))
    assert not bad, f"build output in the sdist: {bad}"
