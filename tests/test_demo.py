"""``moekit demo``: the README's first command, end to end, and where its optional
dependency, transformers, is missing."""

from __future__ import annotations

import os
import subprocess
import sys


def test_demo_without_transformers_says_what_to_install(tmp_path):
    """A ``transformers`` package that cannot be imported, found first on the path."""
    shadow = tmp_path / "shadow" / "transformers"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError(\"No module named 'transformers'\")\n")
    path = os.pathsep.join(filter(None, [str(shadow.parent), os.environ.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-m", "moekit.cli", "demo", "--out",
                           str(tmp_path / "out")], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": path}, timeout=120)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith("moekit: error: moekit demo builds its samples with "
                                  "transformers")
    assert "pip install 'moekit[demo]'" in done.stderr
    assert not (tmp_path / "out").exists()


def test_demo_passes_every_check_on_both_sample_families(tmp_path):
    """The demo converts a per-expert and a grouped-on-disk family across every layout and
    back, and upcycles; every check it prints passes and it exits 0."""
    done = subprocess.run([sys.executable, "-m", "moekit.cli", "demo", "--out",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.rstrip().splitlines()[-1].startswith("all checks passed")
    assert "FAIL" not in done.stdout
    for family in ("qwen3_moe (per-expert", "llama4_text (experts grouped on disk"):
        assert family in done.stdout
    assert done.stdout.count("bytes identical") == 6
