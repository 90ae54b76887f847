"""A LightGBM model's trees as torch tensors: the per-pixel companion of a network, run on the network's GPU.

On a GPU worker the network segments hundreds of megapixels a second, and LightGBM's own predict runs
on the worker's CPU at ~0.1-0.2 Mpx/s per core for a companion of a few hundred trees: the trees, not
the network, would set the pace. `TorchForest` decides every split of every tree at once for a batch
of pixels, as LightGBM decides each split:

- a numerical split sends ``x <= threshold`` left; a value within 1e-35 of 0 counts as 0; a NaN goes the
  learned default way where the split's missing type is NaN, and counts as 0 otherwise; with missing type
  Zero, a 0 (and so a NaN) goes the default way;
- the features are float32 and LightGBM compares them in double: each threshold is stored as the
  largest float32 not above it, so ``x <= t32`` is ``double(x) <= threshold`` exactly;
- +-inf is read as +-1e300, and a threshold of 1e300 (all finite values left) is the largest float32;
- the raw score of a class is the sum of its trees' leaves (in float64), then softmax.

Categorical splits and linear trees are refused (geoseg's pixel models have neither).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from geoseg.errors import ModelError

ZERO_THRESHOLD = 1e-35  # LightGBM's kZeroThreshold
FLOAT32_MAX = float(np.finfo(np.float32).max)  # where +-1e300 (LightGBM's infinity) lands as the largest float32
_MISSING = {"None": 0, "Zero": 1, "NaN": 2}


def _down_to_float32(t: float) -> np.float32:
    """The largest float32 <= ``t``: for a float32 ``x``, ``x <= it`` exactly when ``float(x) <= t``."""
    with np.errstate(over="ignore"):  # a threshold beyond float32 (LightGBM writes 1e300 for "all left") is inf
        f = np.float32(t)
    return np.nextafter(f, np.float32(-np.inf)) if float(f) > t else f


class TorchForest:
    """LightGBM's multiclass ``predict`` (probabilities) with torch on ``device``; ``predict(X)`` as the booster's.

    Every split of every tree is decided at once for a batch of pixels (one gather, one compare); a leaf is
    reached where the decisions on its path are the ones it needs: with ``A[i, l]`` +1 where leaf ``l`` lies
    left of split ``i``, -1 where right, the decisions ``d`` (1 = left) give ``d @ A == lefts(l)`` for that
    leaf alone (hummingbird's GEMM strategy). All of it is exact: 0/1 decisions, small integer sums."""

    def __init__(self, booster: Any, device: Any = "cpu", batch_elements: int | None = None):
        import torch

        model = booster.dump_model()
        self.n_classes = int(model.get("num_class", 1))
        if self.n_classes < 2:
            raise ModelError("TorchForest runs multiclass models (geoseg's pixel models are)")
        trees = []
        for tree in model["tree_info"]:
            if tree.get("is_linear"):
                raise ModelError("a linear-tree LightGBM model cannot run as tensors")
            trees.append(_flatten(tree["tree_structure"]))
        if len(trees) % self.n_classes:
            raise ModelError(f"{len(trees)} trees for {self.n_classes} classes")
        n_t = len(trees)
        n_i = max(1, max(len(t[0]) for t in trees))
        n_l = max(len(t[1]) for t in trees)
        feat = np.zeros((n_t, n_i), np.int64)
        thr = np.full((n_t, n_i), np.inf, np.float32)
        default_left = np.zeros((n_t, n_i), bool)
        missing = np.zeros((n_t, n_i), np.uint8)
        paths = np.zeros((n_t, n_i, n_l), np.float32)
        lefts = np.full((n_t, n_l), -1.0, np.float32)  # padding leaves: never reached (a count is >= 0)
        values = np.zeros((n_t, n_l), np.float64)
        for t, (splits, leaves) in enumerate(trees):
            for i, (f, th, dl, mt) in enumerate(splits):
                feat[t, i], thr[t, i], default_left[t, i], missing[t, i] = f, th, dl, mt
            for l, (value, path) in enumerate(leaves):
                values[t, l] = value
                lefts[t, l] = sum(1 for _, left in path if left)
                for i, left in path:
                    paths[t, i, l] = 1.0 if left else -1.0
        dev = torch.device(device)
        self.device = dev
        self.feat = torch.from_numpy(feat.reshape(-1)).to(dev)
        self.thr = torch.from_numpy(thr.reshape(-1)).to(dev)
        self.default_left = torch.from_numpy(default_left.reshape(-1)).to(dev)
        self.missing = torch.from_numpy(missing.reshape(-1)).to(dev)
        self.paths = torch.from_numpy(paths).to(dev)
        self.lefts = torch.from_numpy(lefts).to(dev)
        self.values = torch.from_numpy(values).to(dev)
        self.shape = (n_t, n_i, n_l)
        if batch_elements is None:  # a batch's leaf counts, float32: 64 MB on a CPU, 256 MB on a GPU (beside the network)
            batch_elements = 1 << (26 if dev.type == "cuda" else 24)
        self.batch = max(1, batch_elements // (n_t * max(n_i, n_l)))

    def raw_scores(self, x: Any) -> Any:
        """(N, classes) float64 sums of the leaves of each class's trees, ``x`` (N, features) float32 on the device."""
        import torch

        n_t, n_i, n_l = self.shape
        v = x[:, self.feat].clamp(-FLOAT32_MAX, FLOAT32_MAX)  # (N, trees x splits); LightGBM reads +-inf as +-1e300
        nan = torch.isnan(v)
        zero = torch.zeros((), dtype=v.dtype, device=v.device)
        # LightGBM's predict passes a value within 1e-35 of 0 on as 0, and a NaN as 0 where the split has no NaN side
        v0 = torch.where((nan & (self.missing != 2)) | (v.abs() <= ZERO_THRESHOLD), zero, v)
        default = (nan & (self.missing == 2)) | ((self.missing == 1) & (v0 == 0))
        d = torch.where(default, self.default_left, v0 <= self.thr).to(self.paths.dtype)  # 1: left
        counts = torch.bmm(d.view(-1, n_t, n_i).transpose(0, 1), self.paths)  # (trees, N, leaves)
        leaf = (counts == self.lefts[:, None, :]).to(torch.uint8).argmax(dim=2)  # (trees, N): the one leaf reached
        values = torch.gather(self.values, 1, leaf)
        return values.T.reshape(x.shape[0], -1, self.n_classes).sum(dim=1)

    def probabilities(self, x: Any) -> Any:
        """(N, classes) float64 probabilities of ``x`` (N, features) float32 on the device, in batches."""
        import torch

        with torch.inference_mode(), torch.autocast(self.device.type, enabled=False):  # float32 / float64 as written
            out = torch.empty((x.shape[0], self.n_classes), dtype=torch.float64, device=self.device)
            for s in range(0, x.shape[0], self.batch):
                out[s:s + self.batch] = torch.softmax(self.raw_scores(x[s:s + self.batch]), dim=1)
            return out

    def predict(self, X: np.ndarray, num_threads: int = 0) -> np.ndarray:  # noqa: ARG002 (the booster's signature)
        """Class probabilities (N, classes) float64, as ``lightgbm.Booster.predict`` gives them."""
        import torch

        x = torch.from_numpy(np.ascontiguousarray(X, np.float32)).to(self.device)
        return self.probabilities(x).cpu().numpy()


def for_device(booster: Any, device: Any) -> Any:
    """What predicts with ``booster``'s trees where a model runs: on a CUDA device its trees as tensors there (with
    `geoseg.methods.pixel.predict_pixels`, the features too), elsewhere LightGBM's own predict (25-45x faster on a
    CPU than the tensors)."""
    return TorchForest(booster, device) if str(device).startswith("cuda") else booster


def _flatten(root: dict[str, Any]) -> tuple[list[tuple[int, np.float32, bool, int]], list[tuple[float, list[tuple[int, bool]]]]]:
    """A tree of LightGBM's dump as its splits (feature, threshold as float32, default left, missing type) and
    its leaves (value, the path: split index and whether the leaf lies left of it)."""
    splits: list[tuple[int, np.float32, bool, int]] = []
    leaves: list[tuple[float, list[tuple[int, bool]]]] = []
    stack: list[tuple[dict[str, Any], list[tuple[int, bool]]]] = [(root, [])]
    while stack:
        node, path = stack.pop()
        if "leaf_value" in node:
            leaves.append((float(node["leaf_value"]), path))
            continue
        if node.get("decision_type", "<=") != "<=":
            raise ModelError(f"a {node['decision_type']!r} split (categorical) cannot run as tensors")
        i = len(splits)
        splits.append((int(node["split_feature"]), _down_to_float32(float(node["threshold"])), bool(node["default_left"]),
                       _MISSING[node.get("missing_type", "None")]))
        stack.append((node["right_child"], path + [(i, False)]))
        stack.append((node["left_child"], path + [(i, True)]))
    return splits, leaves
