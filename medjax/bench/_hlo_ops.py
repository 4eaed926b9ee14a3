"""Per-op cost of a compiled step, read from its optimized HLO text (``compiled.as_text()``).

``cost_analysis()`` gives one total per program; this splits a step by the top-level instructions
of its entry computation, so that two stacks' steps compare op by op (``bench peers --per-op``):

* FLOPs: the dots and convolutions inside each op (a fusion's called computations, recursively),
  2 x output elements x contraction; a convolution counts only the (output, window) pairs that
  land inside its input, as XLA's cost analysis does (the partitioner writes some dots as
  convolutions over a padded window). A Mosaic kernel (``tpu_custom_call``) counts the
  ``cost_estimate`` it declares; one that declares none counts 0 (``undeclared``), as it does in
  libtpu's own ``flops`` and ``optimal_seconds``.
* bytes: the op's operands and outputs in HBM as laid out (tiles padded; buffers libtpu put in
  VMEM, memory space ``S(1)``, count 0); a kernel's declared ``bytes_accessed``. Collectives
  (also those an async fusion wraps) are listed with the bytes they gather, and no time.
* seconds: libtpu's own per-op estimate where the op carries one (``estimated_cycles`` at the
  chip's clock), else libtpu's rates (``LIBTPU_RATES``): max of FLOPs, bytes and transcendentals
  over them, which is what libtpu charges a Mosaic kernel (one declaring no cost: 0 s).

These are estimates from the compiled text, not libtpu's cost model: ``bench peers`` prints their sums
beside the compiler's ``flops`` and ``optimal_seconds`` so the reader sees how far they cover
it. Pure Python, no jax: it reads the text the sides wrote.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field

DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4,
               "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
               "f8e4m3fn": 1, "f8e5m2": 1, "s4": 0.5, "u4": 0.5, "token": 0}
FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "partition-id",
        "replica-id", "after-all", "copy-done", "all-gather-done", "all-reduce-done",
        "collective-permute-done", "async-done", "send-done", "recv-done", "iota"}
COLLECTIVES = {"all-gather", "all-gather-start", "all-reduce", "all-reduce-start",
               "reduce-scatter", "all-to-all", "collective-permute", "collective-permute-start",
               "ragged-all-to-all"}
# libtpu 0.0.42.1 on v5p (2026-12-07): a Mosaic call declaring one cost at a time gave
# optimal_seconds 2538 us for 1e12 FLOPs, 1174 us for 2.76e9 bytes, 325.5 us for 1e9
# transcendentals, the largest term when several (no cost declared: 0 s); an elementwise fusion's
# optimal_seconds is its bytes / 2.35e12 too. Clock: 459e12 FLOP/s / (4 MXUs x 128 x 128 x 2 x 2
# cores) = 1.75 GHz; estimated_cycles at it summed to 98% of a 2-layer step's optimal_seconds.
LIBTPU_RATES = {"v5p": {"flops": 394e12, "bytes": 2.35e12, "transcendentals": 3.072e12,
                        "clock": 1.75e9}}
_ARRAY = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\](\{[^}]*\})?")


@dataclass
class Instr:
    name: str
    shape: str
    opcode: str
    operands: list
    attrs: str


@dataclass
class Op:
    """One top-level instruction of the entry computation and its estimated cost."""
    name: str
    opcode: str
    label: str                  # what it is, for grouping: kernel name, dot shapes, op kind
    flops: float = 0.0
    bytes: float = 0.0
    seconds: float = 0.0
    transcendentals: float = 0.0    # a Mosaic kernel's declared ones
    collective: bool = False
    collective_bytes: float = 0.0   # what the collectives in it gather / reduce / exchange
    undeclared: bool = False        # a Mosaic kernel without a cost estimate
    cycles: int = 0                 # libtpu's estimated_cycles for the op, where it gives one
    dots: list = field(default_factory=list)


def shape_bytes(shape: str, hbm_only: bool = False) -> float:
    """Bytes of an HLO shape (array or tuple) as laid out: dims padded to the layout's first tile
    (``T(8,128)``: a ``[T, 1]`` array takes 128x its elements). ``hbm_only``: arrays in another
    memory space (``S(1)``: VMEM, where libtpu prefetches) count 0."""
    total = 0.0
    for dtype, dims, layout in _ARRAY.findall(shape):
        n = [int(x) for x in dims.split(",") if x]
        m = re.match(r"\{([0-9,]*)(?::(.*))?\}", layout)
        if m and m.group(2):
            space = re.search(r"S\((\d+)\)", m.group(2))
            if hbm_only and space and space.group(1) != "0":
                continue
            tile = re.match(r"T\(([0-9,]+)\)", m.group(2))
            order = [int(x) for x in m.group(1).split(",") if x]      # minor to major
            if tile and order:
                for d, t in zip(order, reversed([int(x) for x in tile.group(1).split(",")])):
                    n[d] = -(-n[d] // t) * t
        total += DTYPE_BYTES.get(dtype, 4) * math.prod(n)
    return total


def _dims(shape: str) -> list[int]:
    m = _ARRAY.search(shape)
    return [int(x) for x in m.group(2).split(",") if x] if m else []


def _balanced(text: str, i: int) -> int:
    """Index just past the parenthesis/brace group opening at ``text[i]``."""
    depth = 0
    for j in range(i, len(text)):
        if text[j] in "({[":
            depth += 1
        elif text[j] in ")}]":
            depth -= 1
            if depth == 0:
                return j + 1
    return len(text)


def _split_top(text: str) -> list[str]:
    out, depth, start = [], 0, 0
    for j, ch in enumerate(text):
        if ch in "({[":
            depth += 1
        elif ch in ")}]":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(text[start:j])
            start = j + 1
    out.append(text[start:])
    return [s for s in out if s.strip()]


def parse_instr(line: str) -> Instr | None:
    m = re.match(r"\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*", line)
    if not m:
        return None
    i = m.end()
    end = _balanced(line, i) if line[i] == "(" else line.index(" ", i)
    shape = line[i:end]
    m2 = re.match(r"\s*([\w\-]+)\(", line[end:])
    if not m2:
        return None
    start = end + m2.end() - 1
    close = _balanced(line, start)
    operands = [re.findall(r"%([\w.\-]+)", o)[-1] for o in _split_top(line[start + 1:close - 1])
                if re.findall(r"%([\w.\-]+)", o)]
    return Instr(m.group(1), shape, m2.group(1), operands, line[close:])


def parse_module(text: str) -> tuple[dict, str]:
    """``({computation: {instr name: Instr}}, entry name)`` of an HLO module's text. An
    instruction may span lines (a kernel's backend config can hold newlines in a string)."""
    comps, entry, current, pending = {}, None, None, []

    def flush():
        if current is not None and pending:
            ins = parse_instr(" ".join(pending))
            if ins:
                current[ins.name] = ins
        pending.clear()
    for line in text.splitlines():
        if current is None:
            m = re.match(r"(ENTRY\s+)?%([\w.\-]+) .*\{$", line.rstrip())
            if m:
                current = comps.setdefault(m.group(2), {})
                entry = m.group(2) if m.group(1) else entry
            continue
        if line.rstrip() == "}":
            flush()
            current = None
        elif re.match(r"\s+(ROOT\s+)?%[\w.\-]+ = ", line):
            flush()
            pending.append(line)
        elif pending:                       # the rest of a multi-line instruction
            pending.append(line)
    return comps, entry


def _attr_dims(attrs: str, key: str) -> list[int]:
    m = re.search(key + r"=\{([0-9,]*)\}", attrs)
    return [int(x) for x in m.group(1).split(",") if x] if m else []


def dot_flops(ins: Instr, table: dict) -> tuple[float, str]:
    """FLOPs of a dot or convolution and a short description ``MxNxK``-like."""
    out = _dims(ins.shape)
    lhs = _dims(table[ins.operands[0]].shape) if ins.operands[0] in table else []
    rhs = _dims(table[ins.operands[1]].shape) if ins.operands[1] in table else []
    if ins.opcode == "dot":
        k = math.prod(lhs[d] for d in _attr_dims(ins.attrs, "lhs_contracting_dims") if d < len(lhs))
        return 2.0 * math.prod(out) * k, f"dot {lhs}x{rhs}->{out}"
    # convolution: dim_labels like 0bf1_1oi0->0b1f (digits = spatial dims, in order)
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", ins.attrs)
    if not labels or not lhs or not rhs:
        return 0.0, f"conv {out}"
    ll, rl, ol = labels.groups()
    window = re.search(r"window=\{([^}]*)\}", ins.attrs)
    win = dict(re.findall(r"(\w+)=([\w_x\-]+)", window.group(1))) if window else {}
    n_sp = sum(c.isdigit() for c in rl)
    size = [int(x) for x in win["size"].split("x")] if "size" in win else [1] * n_sp
    stride = [int(x) for x in win["stride"].split("x")] if "stride" in win else [1] * n_sp
    pad = [tuple(int(v) for v in p.split("_")) for p in win["pad"].split("x")] if "pad" in win \
        else [(0, 0)] * n_sp
    lhs_dil = [int(x) for x in win["lhs_dilate"].split("x")] if "lhs_dilate" in win else [1] * n_sp
    rhs_dil = [int(x) for x in win["rhs_dilate"].split("x")] if "rhs_dilate" in win else [1] * n_sp
    valid = 1
    for s in range(n_sp):       # (output, window) pairs inside the input, per spatial dim
        n_in = (lhs[ll.index(str(s))] - 1) * lhs_dil[s] + 1
        n_out = out[ol.index(str(s))]
        pairs = 0
        for k in range(size[s]):
            shift = k * rhs_dil[s] - pad[s][0]            # input index = o * stride + shift
            if lhs_dil[s] == 1:
                first = max(0, -(-(-shift) // stride[s]))
                last = min(n_out - 1, (n_in - 1 - shift) // stride[s])
                pairs += max(0, last - first + 1)
            else:
                pairs += sum(1 for o in range(n_out) if 0 <= o * stride[s] + shift < n_in
                             and (o * stride[s] + shift) % lhs_dil[s] == 0)
        valid *= pairs
    batch = out[ol.index("b")]
    feat_out = out[ol.index("f")]
    feat_in = rhs[rl.index("i")]
    return 2.0 * batch * feat_out * feat_in * valid, f"conv {lhs}x{rhs}->{out}"


def _called(ins: Instr) -> list[str]:
    names = re.findall(r"(?:calls|to_apply|body|condition|branch_computations|"
                       r"true_computation|false_computation)=\{?([^,}]+(?:,\s*%[\w.\-]+)*)\}?",
                       ins.attrs)
    return [n.strip().lstrip("%") for group in names for n in group.split(",")]


def _inner(comps: dict, name: str, seen: set) -> tuple[float, list, list]:
    """FLOPs, dot descriptions and collective instructions inside computation ``name``."""
    flops, dots, collectives = 0.0, [], []
    table = comps.get(name, {})
    for ins in table.values():
        if ins.opcode in ("dot", "convolution"):
            f, what = dot_flops(ins, table)
            flops += f
            dots.append(what)
        elif ins.opcode in COLLECTIVES:
            collectives.append(ins)
        for sub in _called(ins):
            if sub in comps and sub not in seen:
                f, d, c = _inner(comps, sub, seen | {sub})
                flops += f
                dots += d
                collectives += c
    return flops, dots, collectives


def _moved_bytes(ins: Instr) -> float:
    """Bytes a collective delivers: its output; the largest array of an async start's tuple
    (operand, result, ...) for one that returns a tuple."""
    return max((shape_bytes(m.group(0)) for m in _ARRAY.finditer(ins.shape)), default=0.0)


def _kernel_label(ins: Instr) -> str:
    name = re.sub(r"\.\d+$", "", ins.name)
    return "kernel " + re.sub(r"_block_.*$", "", name)      # splash names carry their config


def kernel_kind(label: str) -> str | None:
    """``fwd``, ``dq`` or ``dkv`` of an attention kernel's label (medjax's and splash's names)."""
    for kind, pattern in (("dkv", r"dkv|dkdv"), ("dq", r"_dq"), ("fwd", r"fwd")):
        if label.startswith("kernel") and re.search(pattern, label):
            return kind
    return None


def _label(ins: Instr, dots: list) -> str:
    if dots:
        return "matmul " + " + ".join(sorted({_short(d) for d in dots}))
    if ins.opcode == "fusion":
        return "fusion, no dot (elementwise, reduce, copy, ...)"
    return ins.opcode


def op_costs(text: str, rates: dict) -> list[Op]:
    """Every costed top-level instruction of the entry computation (see module doc); ``rates``
    as in ``LIBTPU_RATES``."""
    comps, entry = parse_module(text)
    table = comps[entry]
    ops = []
    for ins in table.values():
        if ins.opcode in FREE:
            continue
        op = Op(ins.name, ins.opcode, ins.opcode)
        operands = sum(shape_bytes(table[o].shape, hbm_only=True) for o in ins.operands if o in table)
        op.bytes = operands + shape_bytes(ins.shape, hbm_only=True)
        if ins.opcode == "custom-call" and "tpu_custom_call" in ins.attrs:
            op.label = _kernel_label(ins)
            cost = re.search(r'"cost_estimate":(\{[^}]*\})', ins.attrs)
            if cost:
                c = json.loads(cost.group(1))
                op.flops, op.bytes = float(c.get("flops", 0)), float(c.get("bytes_accessed", 0))
                op.transcendentals = float(c.get("transcendentals", 0))
            else:
                op.undeclared = True
                op.label += " (no cost declared)"
        elif ins.opcode == "copy-start":
            op.bytes = operands
            op.label = "copy-start (HBM<->VMEM prefetch)"
        else:
            nested = [ins] if ins.opcode in COLLECTIVES else []
            if ins.opcode in ("dot", "convolution"):
                op.flops, what = dot_flops(ins, table)
                op.dots = [what]
            for sub in _called(ins):
                f, d, c = _inner(comps, sub, {sub})
                op.flops += f
                op.dots += d
                nested += c
            op.collective_bytes = sum(_moved_bytes(c) for c in nested)
            if nested and not op.dots:          # a collective (maybe wrapped in an async fusion)
                op.collective = True
                op.bytes = 0.0
                op.label = "+".join(sorted({c.opcode.replace("-start", "") for c in nested}))
            else:                               # a dot may carry the next weight's all-gather
                op.label = _label(ins, op.dots)
        cycles = re.search(r'"estimated_cycles":"(\d+)"', ins.attrs)
        op.cycles = int(cycles.group(1)) if cycles else 0
        if op.collective or op.undeclared:      # libtpu charges an undeclared kernel 0 s too
            op.seconds = 0.0
        elif op.cycles and rates.get("clock"):
            op.seconds = op.cycles / rates["clock"]
        else:
            op.seconds = max(op.flops / rates["flops"], op.bytes / rates["bytes"],
                             op.transcendentals / rates["transcendentals"])
        ops.append(op)
    return ops


def _short(dot: str) -> str:
    """``conv [4096, 4096]x[4096, 11008]->...`` → ``4096x4096 . 4096x11008`` (dims of 1 dropped)."""
    parts = re.findall(r"\[([0-9, ]*)\]", dot)
    squeeze = lambda p: "x".join(x.strip() for x in p.split(",") if x.strip() not in ("", "1"))  # noqa: E731
    return f"{squeeze(parts[0])} . {squeeze(parts[1])}" if len(parts) >= 2 else dot


def group(ops: list[Op]) -> list[dict]:
    """Ops with the same label summed (``label, count, flops, bytes, seconds, collective_bytes``),
    by seconds, then FLOPs, then collective bytes, descending."""
    acc = {}
    for op in ops:
        g = acc.setdefault(op.label, {"label": op.label, "count": 0, "flops": 0.0, "bytes": 0.0,
                                      "seconds": 0.0, "collective_bytes": 0.0})
        g["count"] += 1
        for key in ("flops", "bytes", "seconds", "collective_bytes"):
            g[key] += getattr(op, key)
    return sorted(acc.values(), key=lambda g: (g["seconds"], g["flops"], g["collective_bytes"]),
                  reverse=True)


def totals(ops: list[Op]) -> dict:
    return {"ops": len(ops), "flops": sum(o.flops for o in ops), "bytes": sum(o.bytes for o in ops),
            "seconds": sum(o.seconds for o in ops),
            "collective_bytes": sum(o.collective_bytes for o in ops),
            "kernels": sum(o.label.startswith("kernel") for o in ops),
            "undeclared_kernels": sum(o.undeclared for o in ops)}


def impute_kernels(ops: list[Op], reference: list[Op], rates: dict) -> dict:
    """What ``ops``' undeclared attention kernels would add at ``reference``'s declared cost per
    kernel of the same kind (fwd, dq, dkv: the mean over the reference's kernels of that kind),
    in FLOPs and in libtpu's seconds for a Mosaic call. ``missing``: undeclared kernels with no
    reference of their kind (nothing added for them)."""
    declared = {}
    for op in reference:
        kind = kernel_kind(op.label)
        if kind and not op.undeclared:
            declared.setdefault(kind, []).append(op)
    out = {"flops": 0.0, "seconds": 0.0, "kernels": 0, "missing": 0}
    for op in ops:
        kind = kernel_kind(op.label)
        if not op.undeclared:
            continue
        if kind not in declared:
            out["missing"] += 1
            continue
        ref = declared[kind]
        out["flops"] += sum(r.flops for r in ref) / len(ref)
        out["seconds"] += sum(max(r.flops / rates["flops"], r.bytes / rates["bytes"],
                                  r.transcendentals / rates["transcendentals"]) for r in ref) / len(ref)
        out["kernels"] += 1
    return out


def top_table(sides: dict, n: int) -> str:
    """Markdown: each side's ``n`` costliest op groups and its kernels' groups, then its totals.
    ``sides`` = ``{side: {"groups": group(ops), "totals": totals(ops)}}``."""
    lines = ["| side | op (top-level instructions of the step, grouped) | count | TFLOP | GB (HBM) "
             "| ms | GB gathered |", "|---|---|---|---|---|---|---|"]
    for side, v in sides.items():
        top = [g for g in v["groups"] if g["seconds"] or g["flops"]][:n]
        for g in top + [g for g in v["groups"] if g["label"].startswith("kernel") and g not in top]:
            lines.append(f"| {side} | {g['label']} | {g['count']} | {g['flops'] / 1e12:.2f} | "
                         f"{g['bytes'] / 1e9:.2f} | {g['seconds'] * 1e3:.1f} | "
                         f"{g['collective_bytes'] / 1e9:.2f} |")
        t = v["totals"]
        lines.append(f"| {side} | all ops | {t['ops']} | {t['flops'] / 1e12:.2f} | "
                     f"{t['bytes'] / 1e9:.2f} | {t['seconds'] * 1e3:.1f} | "
                     f"{t['collective_bytes'] / 1e9:.2f} |")
    return "\n".join(lines)
