#!/usr/bin/env bash
# Installs everything the tests need (idempotent), then runs lint, types and pytest.
# Usage: bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# Every distribution of the repository, editable (requirements.txt), then the test tools.
.venv/bin/python -m pip install -q -r requirements.txt
.venv/bin/python -m pip install -q -e '.[test]'

# buf (for `buf lint` of the contract) comes from npm; the lint test skips without it
# unless ACTIONMESH_REQUIRE_BUF is set, as CI does.
if [ ! -x .tools/node_modules/.bin/buf ] && command -v npm >/dev/null 2>&1; then
  npm install --prefix .tools --no-save --no-audit --no-fund --silent @bufbuild/buf@1.75.0
fi

.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
# The layers (pyproject.toml [tool.importlinter]): commands > services > runtime > sdk >
# rpc > contract; services do not import each other; the SDK needs no server library.
.venv/bin/lint-imports
.venv/bin/python -m actionmesh.codegen --check
.venv/bin/pytest -m "not faults" "$@"
# The scripted fault suite under load (issue 8): its own step, bounded (each test <= 90 s).
.venv/bin/pytest -m faults tests/test_faults.py
