"""``python -m providers.records``: serve the records provider (see --help)."""

from providers.records import records
from providers.sdk import serve


def main() -> None:
    serve(records)


if __name__ == "__main__":
    main()
