"""Read collectives out of compiled HLO text: which devices each all-gather / all-to-all groups.

Replica groups are printed explicitly (``replica_groups={{0,4},{1,5}}``), as an iota
(``replica_groups=[4,2]<=[2,4]T(1,0)``: ``arange(8).reshape(2, 4).transpose(1, 0).reshape(4, 2)``),
or over the compiler's own mesh (``replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_0'}``: the
ids ``arange(8).reshape(2, 4)``, a group varying ``axis_0``; with ``device_ids=([2,4]T(1,0))`` the
mesh's positions hold ``arange(8).reshape(2, 4).transpose(1, 0)`` in row-major order).
The ids are positions in the program's device assignment, i.e. flat indices into the mesh's
device array, so a mesh axis coordinate of id ``i`` is ``np.unravel_index(i, mesh_shape)``.
"""
from __future__ import annotations

import math
import re

import numpy as np

_EXPLICIT = re.compile(r"replica_groups=\{((?:\{[\d,]*\},?)*)\}")
_MESH = re.compile(r"replica_groups=mesh\[([^\]]*)\]"
                   r"(?:,\s*device_ids=\(\[([\d,]+)\](?:T\(([\d,]+)\))?\))?\s*\{([^}]*)\}")
_IOTA = re.compile(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?")


def replica_groups(line: str) -> list[list[int]]:
    m = _EXPLICIT.search(line)
    if m:
        return [[int(x) for x in g.split(",") if x] for g in re.findall(r"\{([\d,]*)\}", m.group(1))]
    m = _MESH.search(line)
    if m:   # the compiler's own mesh: axes name=size; a group varies the listed axes
        axes = [(name.strip("'"), int(size)) for name, size in
                (a.split("=") for a in m.group(1).split(","))]
        listed = [name.strip(" '") for name in m.group(4).split(",") if name.strip()]
        ids = np.arange(math.prod(size for _, size in axes))
        if m.group(2):      # device_ids=([dims]T(perm)): the devices at the mesh's positions
            dims = [int(d) for d in m.group(2).split(",")]
            ids = ids.reshape(dims)
            if m.group(3):
                ids = ids.transpose([int(p) for p in m.group(3).split(",")])
        ids = ids.reshape([size for _, size in axes])
        names = [name for name, _ in axes]
        ids = np.moveaxis(ids, [names.index(n) for n in listed], range(-len(listed), 0))
        return ids.reshape(-1, math.prod(ids.shape[ids.ndim - len(listed):])).tolist()
    m = _IOTA.search(line)
    if m:
        groups, size = int(m.group(1)), int(m.group(2))
        dims = [int(d) for d in m.group(3).split(",")]
        ids = np.arange(math.prod(dims)).reshape(dims)
        if m.group(4):
            ids = ids.transpose([int(p) for p in m.group(4).split(",")])
        return ids.reshape(groups, size).tolist()
    raise ValueError(f"no replica_groups in: {line[:300]}")


def collectives(hlo_text: str, op: str) -> list[str]:
    """Lines of instructions ``op`` (e.g. ``all-gather``, ``all-to-all``), async starts included."""
    pattern = re.compile(rf"\s{re.escape(op)}(-start)?\(")
    return [line for line in hlo_text.splitlines() if pattern.search(line)]


def groups_spanning(hlo_text: str, op: str, mesh_shape: tuple, axis: int) -> list[str]:
    """The ``op`` instructions with a replica group holding devices at different coordinates
    of mesh axis ``axis`` (a group that spans that axis)."""
    bad = []
    for line in collectives(hlo_text, op):
        for group in replica_groups(line):
            coords = {np.unravel_index(i, mesh_shape)[axis] for i in group}
            if len(coords) > 1:
                bad.append(line.strip()[:300])
                break
    return bad
