"""Print the third-party requirements of actionmesh distributions, one per line.

    python deploy/docker/requirements.py .                      # the whole platform
    python deploy/docker/requirements.py "providers/sdk[otel]"  # the SDK with an extra

Each argument is a project folder (with optional extras). Requirements on another
actionmesh distribution are followed into its folder (the members listed under
``[tool.actionmesh] distributions`` of the root pyproject.toml, where present), so
the image build installs every third-party dependency in a layer of its own, before
any source is copied. Standard library only: it runs on a bare python image.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?")
TARGET = re.compile(r"^(?P<path>[^\[]+)(?:\[(?P<extras>[^\]]*)\])?$")


def load(folder: Path) -> dict:
    return tomllib.loads((folder / "pyproject.toml").read_text())


def members() -> dict[str, Path]:
    """Distribution name -> folder, for every member whose pyproject.toml is present."""
    folders = [Path(".")]
    root = ROOT / "pyproject.toml"
    if root.exists():
        listed = tomllib.loads(root.read_text()).get("tool", {}).get("actionmesh", {})
        folders += [Path(p) for p in listed.get("distributions", [])]
    found = {}
    for folder in folders:
        if (ROOT / folder / "pyproject.toml").exists():
            found[load(ROOT / folder)["project"]["name"]] = ROOT / folder
    return found


def split_extras(raw: str | None) -> set[str]:
    return {e.strip() for e in (raw or "").split(",") if e.strip()}


def third_party(targets: list[str]) -> list[str]:
    local = members()
    seen: set[tuple[Path, frozenset[str]]] = set()
    out: list[str] = []
    queue = []
    for target in targets:
        match = TARGET.match(target)
        assert match, target
        queue.append((ROOT / match["path"], split_extras(match["extras"])))
    while queue:
        folder, extras = queue.pop(0)
        key = (folder.resolve(), frozenset(extras))
        if key in seen:
            continue
        seen.add(key)
        project = load(folder)["project"]
        requirements = list(project.get("dependencies", []))
        for extra in sorted(extras):
            requirements += project.get("optional-dependencies", {}).get(extra, [])
        for requirement in requirements:
            match = REQUIREMENT.match(requirement)
            assert match, requirement
            name = match[1]
            if name in local:
                queue.append((local[name], split_extras(match[2])))
            elif name.startswith("actionmesh"):
                raise SystemExit(f"{requirement}: no folder of this checkout provides it")
            elif requirement not in out:
                out.append(requirement)
    return out


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    print("\n".join(third_party(sys.argv[1:])))
