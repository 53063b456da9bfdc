"""``python -m actionmesh.providers.records``: serve the records provider (see --help)."""

from actionmesh.providers.records import records
from actionmesh.sdk import serve


def main() -> None:
    serve(records)


if __name__ == "__main__":
    main()
