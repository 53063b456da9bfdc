"""``python -m actionmesh.providers.workitems``: serve the work item provider (see --help)."""

from actionmesh.providers.workitems import workitems
from actionmesh.sdk import serve


def main() -> None:
    serve(workitems)


if __name__ == "__main__":
    main()
