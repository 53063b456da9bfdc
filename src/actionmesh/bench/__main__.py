"""python -m actionmesh.bench: the benchmark (same options as ``actionmesh bench``)."""

from actionmesh.bench import main

if __name__ == "__main__":
    main()
