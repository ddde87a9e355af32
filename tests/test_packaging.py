"""The wheel carries everything the app reads at run time, under one import name: `odpo`."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"odpo": "odpo", "odpo.app": "app", "odpo.trainer": "trainer", "odpo.db": "db", "odpo.static": "static",
           "odpo.bench": "bench"}
pytestmark = pytest.mark.xdist_group("wheel")  # one wheel build, on one worker


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory) -> set[str]:
    tmp_path = tmp_path_factory.mktemp("wheel")
    src = tmp_path / "src"  # a copy, so the build's scratch dirs never land in the checkout
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv*", ".git", "odpo-data", "build", "*.egg-info",
                                                             "test-artifacts", "__pycache__"))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                          str(src), "-w", str(tmp_path / "dist")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    (wheel,) = (tmp_path / "dist").glob("odpo-*.whl")
    return set(zipfile.ZipFile(wheel).namelist())


def test_wheel_ships_static_files_prompts_and_judge_template(wheel_names):
    static = {p.name for p in (ROOT / "static").iterdir() if p.suffix in (".css", ".js", ".svg")}
    assert static and {f"odpo/static/{n}" for n in static} <= wheel_names
    assert {"odpo/app/data/starter_prompts.jsonl", "odpo/trainer/judges/default_prompt.txt",
            "odpo/__init__.py", "odpo/__main__.py"} <= wheel_names
    assert any(n.startswith("odpo/app/cli") for n in wheel_names)


def test_wheel_has_odpo_as_its_only_top_level_name(wheel_names):
    tops = {n.split("/", 1)[0] for n in wheel_names}
    dist_info = {t for t in tops if t.endswith(".dist-info")}
    assert tops - dist_info == {"odpo"}
    assert len(dist_info) == 1


def test_every_package_folder_is_listed_in_pyproject():
    """A new subpackage folder that pyproject does not list would be missing from the wheel."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["package-dir"] == FOLDERS
    listed = set(config["packages"])
    found = set()
    for name, folder in FOLDERS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((name, *rel)))
    assert listed == found
