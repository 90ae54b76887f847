"""``python -m geoseg``: the same as the ``geoseg`` command."""

from geoseg.cli.main import main

if __name__ == "__main__":
    main()
