"""`geoseg info`: what a raster or a model directory holds."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command(short_help="Summarise rasters or a model directory.")
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def info(paths, as_json):
    """Summarise PATHS: rasters (grid, bands, nodata) or a model directory (card)."""
    from geoseg.io.sources import open_stack
    from geoseg.model.store import check_model_dir

    out = []
    for p in paths:
        if Path(p).is_dir() and (Path(p) / "model.json").exists():
            card = check_model_dir(p)
            out.append({"model": p, "arch": card.arch, "encoder": card.encoder, "depth": card.encoder_depth,
                        "bands": [b.description or b.name for b in card.bands],
                        "classes": {c.id: c.name for c in card.classes}, "stride": card.stride,
                        "receptive_field": card.receptive_field, "default_halo": card.default_halo,
                        "tile_size": card.tile_size, "metrics": (card.training or {}).get("metrics")})
            continue
        stack = open_stack([p])
        g = stack.grid
        out.append({"raster": p, "crs": g.crs.to_wkt() if g.crs.epsg is None else f"EPSG:{g.crs.epsg}",
                    "shape": list(g.shape), "transform": list(g.affine)[:6], "block_shape": list(stack.block_shape),
                    "bands": [{"band": b.band, "description": b.description, "dtype": b.dtype, "nodata": b.nodata}
                              for b in stack.bands]})
    if as_json:
        click.echo(json.dumps(out, indent=2, default=str))
        return
    for item in out:
        for k, v in item.items():
            click.echo(f"{k:>16}: {v}")
        click.echo("")
