"""QGIS styles that travel with the outputs: a categorized polygon style and a paletted raster style.

QGIS applies the default row of a GeoPackage's ``layer_styles`` table when it loads the layer
(the table QGIS itself writes with "Save style in database"), and a ``.qml`` file beside a
raster or a GeoParquet/FlatGeobuf file of the same name.
"""

from __future__ import annotations

import sqlite3
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable
from xml.sax.saxutils import escape, quoteattr

from geoseg.model.card import ClassInfo

STYLE_NAME = "geoseg classes"


def _rgba(color: str, alpha: int = 255) -> str:
    c = color.lstrip("#")
    r, g, b = int(c[0:2], 16), int(c[2:4], 16), int(c[4:6], 16)
    return f"{r},{g},{b},{alpha}"


def polygon_qml(classes: Iterable[ClassInfo], field: str = "class_id") -> str:
    """A categorized renderer on ``field``: one fill per class in the class's colour, labelled with its name."""
    classes = list(classes)
    cats = "\n".join(
        f'      <category render="true" symbol="{i}" value="{c.id}" type="integer" label={quoteattr(c.name)}/>'
        for i, c in enumerate(classes)
    )
    symbols = "\n".join(
        f'''      <symbol type="fill" name="{i}" alpha="1" clip_to_extent="1" force_rhr="0">
        <layer class="SimpleFill" enabled="1" locked="0" pass="0">
          <Option type="Map">
            <Option name="color" type="QString" value="{_rgba(c.color)}"/>
            <Option name="outline_color" type="QString" value="{_rgba(c.color)}"/>
            <Option name="outline_style" type="QString" value="solid"/>
            <Option name="outline_width" type="QString" value="0.1"/>
            <Option name="style" type="QString" value="solid"/>
          </Option>
        </layer>
      </symbol>'''
        for i, c in enumerate(classes)
    )
    return f'''<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>
<qgis version="3.34.0" styleCategories="Symbology">
  <renderer-v2 type="categorizedSymbol" attr={quoteattr(field)} forceraster="0" enableorderby="0" symbollevels="0">
    <categories>
{cats}
    </categories>
    <symbols>
{symbols}
    </symbols>
  </renderer-v2>
</qgis>
'''


def raster_qml(classes: Iterable[ClassInfo]) -> str:
    """A paletted renderer of band 1: each class id in its colour with its name; nodata (255) transparent."""
    entries = "\n".join(
        f'        <paletteEntry value="{c.id}" color="{c.color.lower()}" alpha="255" label={quoteattr(c.name)}/>'
        for c in classes
    )
    return f'''<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>
<qgis version="3.34.0" styleCategories="Symbology">
  <pipe>
    <rasterrenderer type="paletted" band="1" opacity="1" alphaBand="-1" nodataColor="">
      <colorPalette>
{entries}
      </colorPalette>
    </rasterrenderer>
  </pipe>
</qgis>
'''


def add_gpkg_style(path: str | Path, layer: str, qml: str) -> None:
    """The ``layer_styles`` table QGIS reads, with ``qml`` as the layer's default style, registered in gpkg_contents.

    QGIS finds a layer's default style by its table *and* geometry column name (``f_geometry_column``),
    so the row names the column the GeoPackage itself declares (GDAL writes ``geom``)."""
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    con = sqlite3.connect(str(path))
    try:
        found = con.execute("SELECT column_name FROM gpkg_geometry_columns WHERE table_name = ?", (layer,)).fetchone()
        geometry_column = found[0] if found else "geom"
        with con:
            con.execute(
                """CREATE TABLE IF NOT EXISTS layer_styles (
                    id INTEGER PRIMARY KEY AUTOINCREMENT, f_table_catalog TEXT(256), f_table_schema TEXT(256),
                    f_table_name TEXT(256), f_geometry_column TEXT(256), styleName TEXT(30), styleQML TEXT,
                    styleSLD TEXT, useAsDefault BOOLEAN, description TEXT, owner TEXT(30), ui TEXT(30),
                    update_time DATETIME DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')))"""
            )
            con.execute("DELETE FROM layer_styles WHERE f_table_name = ?", (layer,))
            con.execute(
                "INSERT INTO layer_styles (f_table_catalog, f_table_schema, f_table_name, f_geometry_column, styleName, "
                "styleQML, styleSLD, useAsDefault, description, owner, ui, update_time) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                ("", "", layer, geometry_column, STYLE_NAME, qml, "", 1, "class colours of the model card", "geoseg", "", now),
            )
            con.execute(
                "INSERT OR REPLACE INTO gpkg_contents (table_name, data_type, identifier, description, last_change) "
                "VALUES ('layer_styles', 'attributes', 'layer_styles', '', ?)",
                (now,),
            )
    finally:
        con.close()


def write_qml(path: str | Path, qml: str) -> Path:
    """``qml`` beside ``path`` (same name, .qml), which QGIS loads with the file."""
    from geoseg.io.storage import write_atomic

    out = Path(path).with_suffix(".qml")
    write_atomic(out, qml.encode())  # a temporary of its own: two writers of one stem (x.fgb, x.parquet) at once
    return out


__all__ = ["add_gpkg_style", "escape", "polygon_qml", "raster_qml", "write_qml"]
