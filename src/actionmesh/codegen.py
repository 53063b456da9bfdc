"""Regenerate the committed Python code for the actionmesh.v1 contract.

The proto package equals the Python import path (``actionmesh.v1``), so the
generated modules import each other without rewriting. Run
``python -m actionmesh.codegen`` after editing anything under ``proto/``; the
test suite fails when the committed code differs from a fresh generation.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO_ROOT / "proto"
PACKAGE_DIR = Path("actionmesh") / "v1"
# The generated package ships in the SDK distribution (what every provider installs).
OUTPUT_ROOT = REPO_ROOT / "providers" / "sdk" / "src"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / PACKAGE_DIR).glob("*.proto"))


def generate(out_root: Path) -> list[Path]:
    """Generate code for every proto file into ``out_root/actionmesh/v1``."""
    well_known = str(resources.files("grpc_tools") / "_proto")
    bin_dir = Path(sys.executable).parent
    (out_root / PACKAGE_DIR).mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"--proto_path={PROTO_ROOT}",
        f"--proto_path={well_known}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
        f"--mypy_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        *(str(p.relative_to(PROTO_ROOT)) for p in proto_files()),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed; see the messages above")
    return sorted(
        p for p in (out_root / PACKAGE_DIR).iterdir() if p.name.endswith(GENERATED_SUFFIXES)
    )


def regenerate_in_place() -> None:
    target = OUTPUT_ROOT / PACKAGE_DIR
    for old in target.iterdir():
        if old.name.endswith(GENERATED_SUFFIXES):
            old.unlink()
    with tempfile.TemporaryDirectory() as tmp:
        for produced in generate(Path(tmp)):
            shutil.copyfile(produced, target / produced.name)
    print(f"regenerated {target.relative_to(REPO_ROOT)}")


def stale_files() -> list[str]:
    """Names of generated files whose committed content differs from a fresh run."""
    committed = OUTPUT_ROOT / PACKAGE_DIR
    with tempfile.TemporaryDirectory() as tmp:
        fresh = {p.name: p.read_bytes() for p in generate(Path(tmp))}
    existing = {
        p.name: p.read_bytes() for p in committed.iterdir() if p.name.endswith(GENERATED_SUFFIXES)
    }
    names = set(fresh) | set(existing)
    return sorted(n for n in names if fresh.get(n) != existing.get(n))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed code is stale")
    args = parser.parse_args()
    if args.check:
        stale = stale_files()
        if stale:
            sys.exit(
                f"generated code is stale: {', '.join(stale)}; run python -m actionmesh.codegen"
            )
        print("generated code is up to date")
        return
    regenerate_in_place()


if __name__ == "__main__":
    main()
