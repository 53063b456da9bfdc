"""The committed generated code matches the contract, and the contract passes buf lint."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from actionmesh import codegen

REPO = Path(__file__).resolve().parent.parent


def test_committed_generated_code_is_up_to_date() -> None:
    assert codegen.proto_files(), "no proto files found"
    assert codegen.stale_files() == [], "run: python -m actionmesh.codegen"


def buf_binary() -> str | None:
    local = REPO / ".tools" / "node_modules" / ".bin" / "buf"
    return str(local) if local.exists() else shutil.which("buf")


def test_buf_lint_passes() -> None:
    buf = buf_binary()
    if buf is None:
        if os.environ.get("ACTIONMESH_REQUIRE_BUF"):
            pytest.fail("buf is required here (ACTIONMESH_REQUIRE_BUF) but not installed")
        pytest.skip("buf not installed (npm install --prefix .tools @bufbuild/buf)")
    result = subprocess.run([buf, "lint"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
