"""``python -m geoseg``: the same as the ``geoseg`` command."""

from geoseg.cli.main import cli

if __name__ == "__main__":
    cli()
