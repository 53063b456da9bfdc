"""``python -m actionmesh.providers.escalation``: serve the escalation provider (see --help).

The support platform's URL comes from ``ACTIONMESH_ESCALATION_PLATFORM_URL``.
"""

from actionmesh.providers.escalation import escalation
from actionmesh.sdk import serve


def main() -> None:
    serve(escalation)


if __name__ == "__main__":
    main()
