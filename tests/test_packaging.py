"""The wheel carries everything the app reads at run time, not only what an editable install sees."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_ships_static_files_prompts_and_judge_template(tmp_path):
    src = tmp_path / "src"  # a copy, so the build's scratch dirs never land in the checkout
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", "odpo-data", "build", "*.egg-info",
                                                             "test-artifacts", "__pycache__"))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                          str(src), "-w", str(tmp_path / "dist")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    (wheel,) = (tmp_path / "dist").glob("odpo-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    static = {p.name for p in (ROOT / "static").iterdir() if p.suffix in (".css", ".js", ".svg")}
    assert static and {f"static/{n}" for n in static} <= names
    assert {"app/data/starter_prompts.jsonl", "trainer/judges/default_prompt.txt", "app/cli.py",
            "app/bench/sampling.py"} <= names
    assert not any(n.startswith("tests/") for n in names)
