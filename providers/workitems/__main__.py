"""``python -m providers.workitems``: serve the work item provider (see --help)."""

from providers.sdk import serve
from providers.workitems import workitems


def main() -> None:
    serve(workitems)


if __name__ == "__main__":
    main()
