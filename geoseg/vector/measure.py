"""Areas and perimeters true on the ellipsoid, for polygons in any CRS.

Projected polygons are densified (so an edge that is straight on the map is followed closely
on the ground), taken to longitude/latitude on the CRS's own datum, and measured with
GeographicLib (pyproj.Geod) on that datum's ellipsoid. Planar areas in a projected CRS are off
by the projection's scale: +22% for EPSG:3857 at 24°N, -0.08% on a UTM central meridian.

In a geographic CRS a pixel's top and bottom edges follow parallels, which are not geodesics (a
geodesic between two corners bulges poleward: -13% of the area of a region 60° wide at 60-70°N
if its rows were taken for geodesics). Areas there are planar areas in the ellipsoid's
Lambert cylindrical equal-area projection, where parallels and meridians are straight lines
(exact for every edge along them, other edges densified to 0.01°); perimeters are geodesic
lengths of the edges densified to 0.01° (a parallel's arc within 1e-9).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import shapely
from pyproj import CRS, Geod, Transformer

# Edges longer than this many metres are split before projecting to lon/lat.
DENSIFY_M = 1000.0
# Edges longer than this many degrees are split in a geographic CRS.
DENSIFY_DEG = 0.01
# Polygons narrower than this (bounding-box diagonal, metres) in a conformal projection are measured
# by the projection's scale at their centroid (pyproj's factors), not edge by edge.
SMALL_M = 2000.0


def to_pyproj(crs: Any) -> CRS | None:
    if crs is None:
        return None
    if isinstance(crs, CRS):
        return crs
    from geoseg.errors import InputError

    try:
        return CRS.from_user_input(crs.to_wkt() if hasattr(crs, "to_wkt") else crs)
    except Exception as exc:  # pyproj raises CRSError, odc and rasterio their own types
        raise InputError(f"CRS {crs!r} is not understood: {exc}") from None


class Measurer:
    """Ellipsoidal area (m²) and perimeter (m, every ring: holes included) of polygons in ``crs``;
    NaN where the CRS has no datum."""

    def __init__(self, crs: Any) -> None:
        self.crs = to_pyproj(crs)
        self.geod: Geod | None = None
        self.transformer: Transformer | None = None
        self.to_degrees = 1.0
        self.densify: float | None = None
        self._fast_ok: bool | None = None
        if self.crs is None or not (self.crs.is_geographic or self.crs.is_projected):
            return
        self.geod = self.crs.get_geod()
        if self.crs.is_geographic:
            # rasterio's x is longitude (GIS axis order); degrees from the CRS's angular unit
            self.to_degrees = self.crs.axis_info[0].unit_conversion_factor / (math.pi / 180.0)
            e = self.crs.ellipsoid
            # equal-area on this ellipsoid; +over: longitudes past ±180 (a scene across the antimeridian) are not wrapped
            cea = CRS.from_proj4(f"+proj=cea +lon_0=0 +lat_ts=0 +a={e.semi_major_metre!r} +b={e.semi_minor_metre!r} +over +units=m")
            lonlat = CRS.from_proj4(f"+proj=longlat +a={e.semi_major_metre!r} +b={e.semi_minor_metre!r} +over")
            self._equal_area = Transformer.from_crs(lonlat, cea, always_xy=True)
        else:
            geographic = self.crs.geodetic_crs
            self.transformer = Transformer.from_crs(self.crs, geographic, always_xy=True)
            # to Greenwich degrees, which GeographicLib and PROJ's factors take: the base CRS may count in grads from
            # Paris (NTF, EPSG:27572: every area was 10% too large, read as degrees)
            self._unit = geographic.axis_info[0].unit_conversion_factor / (math.pi / 180.0)
            pm = geographic.prime_meridian
            self._pm = pm.longitude * pm.unit_conversion_factor / (math.pi / 180.0)
            from pyproj import Proj

            self._proj = Proj(self.crs)
            self.densify = DENSIFY_M / self.crs.axis_info[0].unit_conversion_factor

    def __call__(self, geoms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = len(geoms)
        if self.geod is None or n == 0:
            return np.full(n, np.nan), np.full(n, np.nan)
        if self.transformer is None:
            return self._geodesic(geoms)
        # Small polygons in a conformal projection (UTM, Lambert conformal...): the planar measures
        # over the projection's scale at the polygon, which varies by less than 2e-5 across a
        # polygon 2 km wide (checked against the geodesic measures once per CRS). Larger
        # polygons, other projections and CRSs that fail the check go the long way.
        area, perim = np.full(n, np.nan), np.full(n, np.nan)
        bounds = shapely.bounds(geoms)
        unit = self.crs.axis_info[0].unit_conversion_factor
        diag = np.hypot(bounds[:, 2] - bounds[:, 0], bounds[:, 3] - bounds[:, 1]) * unit
        small = diag < SMALL_M
        if small.any():
            centre = shapely.get_coordinates(shapely.centroid(geoms[small]))
            lon, lat = self._lonlat(centre)
            try:
                f = self._proj.get_factors(lon, lat)
            except Exception:  # a projection PROJ gives no factors for: every polygon the long way
                return self._geodesic(geoms)
            conformal = np.abs(np.asarray(f.angular_distortion)) < 1e-4  # PROJ differentiates numerically
            k_par, k_mer = np.asarray(f.parallel_scale), np.asarray(f.meridional_scale)
            fast = conformal & np.isfinite(k_par) & np.isclose(k_par, k_mer, rtol=1e-6)
            idx = np.flatnonzero(small)[fast]
            scale = k_par[fast] / unit  # map units per ground metre
            area[idx] = shapely.area(geoms[idx]) / scale**2
            perim[idx] = shapely.length(geoms[idx]) / scale
            if len(idx) and not self._fast_checked(geoms[idx[:3]], area[idx[:3]], perim[idx[:3]]):
                area[idx] = np.nan  # the factors do not describe this CRS on the ellipsoid: the long way
        rest = np.flatnonzero(np.isnan(area))
        if len(rest):
            area[rest], perim[rest] = self._geodesic(geoms[rest])
        return area, perim

    def _lonlat(self, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Map coordinates (n, 2) to longitude and latitude in degrees from Greenwich, on the CRS's own datum."""
        assert self.transformer is not None
        lon, lat = self.transformer.transform(xy[:, 0], xy[:, 1])
        return np.asarray(lon) * self._unit + self._pm, np.asarray(lat) * self._unit

    def _fast_checked(self, geoms: np.ndarray, area: np.ndarray, perim: np.ndarray) -> bool:
        """Whether the scale factors give the ellipsoidal measures in this CRS, checked once on a few
        polygons: EPSG:3857, say, applies spherical Mercator to ellipsoidal coordinates, so PROJ's
        (spherical) factors are off by 0.5% at 24°N there."""
        if self._fast_ok is None:
            exact_area, exact_perim = self._geodesic(geoms)
            self._fast_ok = bool(np.allclose(area, exact_area, rtol=2e-5) and np.allclose(perim, exact_perim, rtol=2e-5))
        return self._fast_ok

    def _geodesic(self, geoms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = len(geoms)
        if self.transformer is not None:
            geoms = shapely.segmentize(geoms, self.densify)
            geoms = shapely.transform(geoms, lambda xy: np.column_stack(self._lonlat(xy)))
        else:
            # degrees; latitudes held to the poles (a global grid's pixels centred on ±90 reach 0.125° past them,
            # where GeographicLib gives NaN: the part past a pole holds no ground)
            k = self.to_degrees
            geoms = shapely.transform(geoms, lambda xy: np.column_stack([xy[:, 0] * k, np.clip(xy[:, 1] * k, -90.0, 90.0)]))
            geoms = shapely.segmentize(geoms, DENSIFY_DEG)
        # every ring as lon/lat arrays, measured by GeographicLib: exterior areas minus holes' areas;
        # the perimeter counts every ring, holes too (as GIS packages do)
        rings, owner = shapely.get_rings(shapely.get_parts(geoms), return_index=True)
        part_of = shapely.get_parts(geoms, return_index=True)[1]
        first = np.r_[True, owner[1:] != owner[:-1]]  # the first ring of each part is its exterior
        area, perim = np.zeros(n), np.zeros(n)
        for ring, part, is_exterior in zip(rings, owner, first):
            xy = shapely.get_coordinates(ring)
            a, p = self.geod.polygon_area_perimeter(xy[:-1, 0], xy[:-1, 1])
            i = part_of[part]
            area[i] += abs(a) if is_exterior else -abs(a)
            perim[i] += p
        if self.transformer is None:  # geographic: rows follow parallels, not geodesics
            ea = self._equal_area
            area = shapely.area(shapely.transform(geoms, lambda xy: np.column_stack(ea.transform(xy[:, 0], xy[:, 1]))))
        return area, perim
