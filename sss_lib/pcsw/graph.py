"""3D connected components of every slice window, from one labelling of the whole stack.

A 3D component restricted to slices ``[a, b)`` is a connected set of 2D components (nodes) on
those slices, joined by edges between 2D components of adjacent slices that touch under the 3D
connectivity. So the stack is labelled once (2D components per slice, with their areas,
probability sums and centroids), the inter-slice edges are found once, and each window only
needs a small graph search over the nodes inside it. With 26-connectivity two voxels on one slice
touch when they are 8-neighbours, and voxels on adjacent slices touch when their in-plane offset
is at most one pixel on each axis; this is exactly ``scipy.ndimage.label`` with a 3x3x3 cube.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components


def _structures(connectivity: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """In-plane 2D structure and the in-plane offsets that join adjacent slices."""
    if connectivity == 6:
        return ndimage.generate_binary_structure(2, 1), [(0, 0)]
    offsets = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    if connectivity == 18:
        offsets = [(dy, dx) for dy, dx in offsets if abs(dy) + abs(dx) <= 1]
    return ndimage.generate_binary_structure(2, 2), offsets


@dataclasses.dataclass
class WindowComponent:
    """The largest 3D component of one window, with what the constraints need.

    Attributes:
        start, stop: the window's slices ``[start, stop)``.
        nodes: node ids (see :class:`SliceGraph`) of the component.
        continuity: component voxels / all foreground voxels in the window.
        voxels: component voxel count; ``mean_probability`` its mean probability.
        slices: slice indices the component covers (consecutive, increasing).
        areas: pixel count per slice in ``slices``; ``centroids``: ``(len, 2)`` ``(y, x)`` pixels.
        full_voxels: voxel count of the whole-stack 3D component that contains it.
        full_span: first and last slice of that whole-stack component.
    """

    start: int
    stop: int
    nodes: np.ndarray
    continuity: float
    voxels: int
    mean_probability: float
    slices: np.ndarray
    areas: np.ndarray
    centroids: np.ndarray
    full_voxels: int
    full_span: tuple[int, int]


class SliceGraph:
    """2D components of a binary ``(S, H, W)`` stack and their links between adjacent slices.

    Attributes:
        labels: ``(S, H, W)`` int array; node ``n`` is the pixels with ``labels == n + 1``.
        node_slice, area, sum_p, sum_y, sum_x: per node (ids sorted by slice).
        first_node: ``(S + 1,)``; nodes of slice ``s`` are ``first_node[s]:first_node[s + 1]``.
        edge_u, edge_v: node ids of each link, ``node_slice[edge_v] == node_slice[edge_u] + 1``,
            sorted by ``edge_u`` (hence by its slice).
    """

    def __init__(self, mask: np.ndarray, prob: np.ndarray, connectivity: int = 26) -> None:
        struct2d, offsets = _structures(connectivity)
        structure = np.zeros((3, 3, 3), bool)
        structure[1] = struct2d
        labels, n = ndimage.label(mask, structure=structure)
        s_idx, y_idx, x_idx = np.nonzero(labels)
        lab = labels[s_idx, y_idx, x_idx] - 1
        node_slice = np.zeros(n, np.int64)
        node_slice[lab] = s_idx
        if np.any(np.diff(node_slice) < 0):
            # Renumber so that node ids grow with the slice (scipy's raster-order labelling
            # already does; this keeps us independent of that detail).
            order = np.argsort(node_slice, kind="stable")
            rank = np.empty(n, np.int64)
            rank[order] = np.arange(n)
            labels = np.concatenate([[0], rank + 1]).astype(labels.dtype)[labels]
            lab = rank[lab]
            node_slice = node_slice[order]
        self.labels = labels
        self.shape = mask.shape
        self.node_slice = node_slice
        self.area = np.bincount(lab, minlength=n).astype(np.int64)
        self.sum_p = np.bincount(lab, weights=prob[s_idx, y_idx, x_idx], minlength=n)
        self.sum_y = np.bincount(lab, weights=y_idx, minlength=n)
        self.sum_x = np.bincount(lab, weights=x_idx, minlength=n)
        self.first_node = np.searchsorted(self.node_slice, np.arange(mask.shape[0] + 1))
        self.edge_u, self.edge_v = self._links(labels, s_idx, y_idx, x_idx, offsets, n)
        self.edge_slice = self.node_slice[self.edge_u]
        n_full, full = connected_components(self._adjacency(0, n, self.edge_u, self.edge_v), directed=False)
        self.full_comp = full
        self.full_voxels = np.bincount(full, weights=self.area, minlength=n_full).astype(np.int64)
        self.full_first = np.full(n_full, mask.shape[0], np.int64)
        self.full_last = np.full(n_full, -1, np.int64)
        np.minimum.at(self.full_first, full, self.node_slice)
        np.maximum.at(self.full_last, full, self.node_slice)

    @property
    def n_nodes(self) -> int:
        return int(self.area.size)

    def _links(self, labels: np.ndarray, s_idx: np.ndarray, y_idx: np.ndarray, x_idx: np.ndarray,
               offsets: list[tuple[int, int]], n: int) -> tuple[np.ndarray, np.ndarray]:
        n_s, h, w = labels.shape
        below = s_idx < n_s - 1
        s_idx, y_idx, x_idx = s_idx[below], y_idx[below], x_idx[below]
        lower = labels[s_idx, y_idx, x_idx].astype(np.int64) - 1
        keys = []
        for dy, dx in offsets:
            y, x = y_idx + dy, x_idx + dx
            inside = (y >= 0) & (y < h) & (x >= 0) & (x < w)
            upper = labels[s_idx[inside] + 1, y[inside], x[inside]].astype(np.int64) - 1
            hit = upper >= 0
            keys.append(lower[inside][hit] * n + upper[hit])
        key = np.unique(np.concatenate(keys)) if keys else np.zeros(0, np.int64)
        u, v = key // max(n, 1), key % max(n, 1)
        return u, v  # np.unique sorted the keys by u, hence by slice as node ids grow with it

    @staticmethod
    def _adjacency(lo: int, hi: int, u: np.ndarray, v: np.ndarray) -> csr_matrix:
        """Links ``u -> v`` (``u`` sorted) among nodes ``lo:hi`` as a CSR matrix, built directly:
        the generic sparse constructors cost more than the graph search on small windows."""
        m = hi - lo
        indptr = np.searchsorted(u - lo, np.arange(m + 1)).astype(np.int32)
        data = np.ones(u.size, np.float64)
        return csr_matrix((data, (v - lo).astype(np.int32), indptr), shape=(m, m))

    def window(self, start: int, stop: int) -> WindowComponent | None:
        """The largest 3D component of slices ``[start, stop)``, or None when they are empty."""
        lo, hi = int(self.first_node[start]), int(self.first_node[stop])
        if hi == lo:
            return None
        # Links whose lower node lies on slices start .. stop-2 have both ends inside the window.
        e_lo, e_hi = np.searchsorted(self.edge_slice, [start, stop - 1])
        u, v = self.edge_u[e_lo:e_hi], self.edge_v[e_lo:e_hi]
        n_comp, comp = connected_components(self._adjacency(lo, hi, u, v), directed=False)
        sizes = np.bincount(comp, weights=self.area[lo:hi], minlength=n_comp)
        best = int(np.argmax(sizes))
        nodes = lo + np.flatnonzero(comp == best)
        voxels = int(sizes[best])
        rel = self.node_slice[nodes] - start
        n_win = stop - start
        areas = np.bincount(rel, weights=self.area[nodes], minlength=n_win)
        cy = np.bincount(rel, weights=self.sum_y[nodes], minlength=n_win)
        cx = np.bincount(rel, weights=self.sum_x[nodes], minlength=n_win)
        present = np.flatnonzero(areas > 0)
        full = self.full_comp[nodes[0]]
        return WindowComponent(
            start=start,
            stop=stop,
            nodes=nodes,
            continuity=voxels / float(sizes.sum()),
            voxels=voxels,
            mean_probability=float(self.sum_p[nodes].sum() / voxels),
            slices=present + start,
            areas=areas[present].astype(np.int64),
            centroids=np.stack([cy[present], cx[present]], axis=1) / areas[present, None],
            full_voxels=int(self.full_voxels[full]),
            full_span=(int(self.full_first[full]), int(self.full_last[full])),
        )

    def node_window_key(self, start: int, stop: int) -> tuple[int, int]:
        """Windows with the same key hold the same nodes and links, hence the same result."""
        return int(self.first_node[start]), int(self.first_node[stop])

    def mask_of(self, nodes: np.ndarray, s: int) -> np.ndarray:
        """``(H, W)`` bool mask of the given nodes' pixels on slice ``s``."""
        on_slice = nodes[self.node_slice[nodes] == s]
        return np.isin(self.labels[s], on_slice + 1)
