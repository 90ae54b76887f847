"""``feature_stack`` with torch on a model's device: a network's companion on a GPU worker reads its features there.

The same features as `geoseg.methods.features` (bands, brightness, indices by name, expressions, local
mean and standard deviation over 5 x 5 pixels), computed from a float32 ``(bands, h, w)`` tensor with
NaN where a band has no value, bit for bit: every step is numpy's or scipy's, in the same order (a GPU's
IEEE + - * / round as a CPU's do); the local statistics with scipy's running sums along each axis
(scipy 1.17's order: a direct 5 x 5 sum rounds otherwise, and a flat window's standard deviation came
out 0 against scipy's 1.3e-5, where a tree may split). ``**`` is the exception: each library has its
own pow (within a float32 step).
"""

from __future__ import annotations

from typing import Any, Sequence

from geoseg.methods.features import INDICES, TEXTURE_RADIUS, Units, assemble, evaluate_expression, role_index


def _band(x: Any, roles: Sequence[str | None], role: str, units: Units = None) -> Any:
    i = role_index(roles, role)
    b = x[i]
    if units is not None and tuple(units[i]) != (1.0, 0.0):
        scale, offset = units[i]
        import torch

        b = b * torch.tensor(scale, dtype=torch.float32, device=b.device) + torch.tensor(offset, dtype=torch.float32, device=b.device)
    return b


def normalized_difference(a: Any, b: Any) -> Any:
    import torch

    s = a + b
    out = torch.where(s != 0, (a - b) / s, torch.zeros((), dtype=a.dtype, device=a.device)).clamp(-1.0, 1.0)
    return out.masked_fill(~(torch.isfinite(a) & torch.isfinite(b)), float("nan"))


def expression(x: Any, roles: Sequence[str | None], expr: str, units: Units = None) -> Any:
    import torch

    def number(value: float) -> Any:
        return torch.tensor(float(value), dtype=torch.float32, device=x.device)

    out = evaluate_expression(expr, roles, lambda r: _band(x, roles, r, units), number)
    out = out.to(torch.float32).expand(x.shape[1:]).clone()
    return out.masked_fill(~torch.isfinite(out), float("nan"))


def spectral_index(x: Any, roles: Sequence[str | None], name: str, units: Units = None) -> Any:
    key = name.strip()
    if key.lower().startswith("expr:"):
        return expression(x, roles, key[5:], units)
    a, b = INDICES[key.lower()]
    return normalized_difference(_band(x, roles, a, units), _band(x, roles, b, units))


def brightness(x: Any, scale: Sequence[float] | None = None) -> Any:
    """numpy's: the bands summed one after another in float32, divided by their count in float64."""
    import torch

    if scale is not None:
        x = x / torch.tensor(list(scale), dtype=torch.float32, device=x.device)[:, None, None]
    if x.shape[0] == 1:
        return x[0]
    missing = torch.isnan(x)
    filled = x.masked_fill(missing, 0.0)
    total = filled[0].clone()
    for b in filled[1:]:
        total += b
    count = (x.shape[0] - missing.sum(dim=0)).to(torch.float64)
    return (total.to(torch.float64) / count).to(torch.float32)


def _running_mean(p: Any, size: int, length: int) -> Any:
    """scipy.ndimage's uniform_filter1d (scipy 1.17) along the first axis of ``p`` (already padded by size - 1), in
    its order: the first window summed from 0.0, then each next sum by adding (entering - leaving), each sum divided
    by ``size``. The running sum is sequential, as scipy's (a parallel scan rounds otherwise): one step per line."""
    import torch

    sums = torch.empty((length, *p.shape[1:]), dtype=p.dtype, device=p.device)
    tmp = torch.zeros_like(p[0])
    for i in range(size):
        tmp = tmp + p[i]
    sums[0] = tmp
    step = p[size:size + length - 1] - p[:length - 1]
    for k in range(1, length):
        torch.add(sums[k - 1], step[k - 1], out=sums[k])
    return sums / size


def uniform_filter(x: Any, size: int) -> Any:
    """scipy.ndimage.uniform_filter(x[i], size, mode="constant") for each ``x[i]`` of a float64 (k, h, w) tensor,
    bit for bit: along the rows, then along the columns, as scipy's."""
    import torch

    r = size // 2
    pads = (r, size - r - 1)
    h, w = x.shape[1:]
    rows = _running_mean(torch.nn.functional.pad(x, (0, 0, *pads)).movedim(1, 0), size, h).movedim(0, 1)
    return _running_mean(torch.nn.functional.pad(rows, pads).movedim(2, 0), size, w).movedim(0, 2)


def local_stats(x: Any, radius: int = TEXTURE_RADIUS) -> tuple[Any, Any]:
    """Mean and standard deviation of the finite values in a (2r+1)² window (NaN where none), as numpy's."""
    import torch

    size = 2 * radius + 1
    ok = torch.isfinite(x)
    v = torch.where(ok, x, torch.zeros((), dtype=x.dtype, device=x.device)).to(torch.float64)
    n, s1, s2 = uniform_filter(torch.stack([ok.to(torch.float64), v, v * v]), size)  # the three sums in one pass
    mean = s1 / n
    std = torch.sqrt(torch.clamp(s2 / n - mean * mean, min=0.0))
    none = n < 0.5 / size**2
    return mean.masked_fill(none, float("nan")).to(torch.float32), std.masked_fill(none, float("nan")).to(torch.float32)


def feature_stack(x: Any, roles: Sequence[str | None], features: Sequence[str], scale: Sequence[float] | None = None,
                  units: Units = None) -> Any:
    """``(len(features), h, w)`` float32 tensor on ``x``'s device; NaN where a feature's inputs are missing."""
    import torch

    out = torch.empty((len(features), *x.shape[1:]), dtype=torch.float32, device=x.device)
    return assemble(features, out, lambda i: x[i], lambda: brightness(x, scale),
                    lambda name: spectral_index(x, roles, name, units), local_stats)
