"""Start-up cost: the command line's help and a conversion that only moves bytes import no
torch (seconds on a small machine), and what they write is the bytes transformers saved."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .conftest import load_all, same_bytes

RUN_WITHOUT_TORCH = """
import sys
from moekit.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exit:
    code = exit.code
print("torch imported" if "torch" in sys.modules else "no torch", code)
"""


def run_cli(*args: object) -> str:
    """The last line the command printed: whether torch was imported, and its exit code."""
    done = subprocess.run([sys.executable, "-c", RUN_WITHOUT_TORCH, *map(str, args)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("command", ["convert", "inspect", "upcycle", "verify"])
def test_help_imports_no_torch(command):
    assert run_cli(command, "--help") == "no torch 0"


@pytest.mark.parametrize("layout", ["nemo", "transformers", "vllm"])
def test_converting_files_that_only_move_bytes_imports_no_torch(family_checkpoints, tmp_path,
                                                                layout):
    """HF -> a grouped layout (transposed for nemo) -> HF, each a separate process without
    torch; the round trip gives back the bytes transformers saved."""
    src = family_checkpoints["qwen3_moe"]
    grouped, back = tmp_path / layout, tmp_path / "back"
    assert run_cli("convert", src, grouped, "--to", layout, "--max-shard-size", "60KB") == \
        "no torch 0"
    assert run_cli("convert", grouped, back, "--to", "hf") == "no torch 0"
    original, restored = load_all(src), load_all(back)
    assert original.keys() == restored.keys()
    assert all(same_bytes(original[k], restored[k]) for k in original)


def test_a_dry_run_over_a_dcp_checkpoint_imports_no_torch(family_checkpoints, tmp_path):
    """--overwrite checks that the folder it would replace holds a DCP checkpoint (its
    .metadata names DCP's Metadata) without torch."""
    from moekit import convert

    src = family_checkpoints["qwen3_moe"]
    convert(src, tmp_path / "dcp", to="nemo", format="dcp")
    assert run_cli("convert", src, tmp_path / "dcp", "--to", "transformers", "--overwrite",
                   "--dry-run") == "no torch 0"
