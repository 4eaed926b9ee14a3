"""Dot FLOPs of a compiled HLO module with loop bodies multiplied by their trip counts.

``compiled.cost_analysis()`` counts a ``while`` body once whatever its trip count; this walks
``compiled.as_text()`` instead: every ``dot`` (inside fusions too) costs 2·|out|·|contracted|,
and a computation reached as a ``while`` body is multiplied by ``trips(while_line, inner)``
(``inner``: the ``while`` lines nested anywhere inside that body).
"""
import math
import re

_HEADER = re.compile(r"^(ENTRY )?%([\w.\-]+) \((.*)\) -> .*\{$")
_PARAM = re.compile(r"([\w.\-]+): \w+\[([\d,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = [\w]+\[([\d,]*)\]\S* ([\w\-]+)\((.*?)\)(.*)$")
_CALL = re.compile(r"(calls|to_apply|body|condition)=%([\w.\-]+)")


def _dims(s):
    return [int(d) for d in s.split(",") if d]


def dot_flops(hlo_text: str, trips) -> tuple[int, int]:
    """``(flops, while_loops_with_dots)``; ``trips(line, inner)`` gives a while's trip count."""
    comps, entry, cur = {}, None, None
    for line in hlo_text.splitlines():
        m = _HEADER.match(line)
        if m:
            cur = m.group(2)
            entry = cur if m.group(1) else entry
            comps[cur] = {"shapes": {n: _dims(d) for n, d in _PARAM.findall(m.group(3))},
                          "lines": []}
        elif line.startswith("}"):
            cur = None
        elif cur:
            comps[cur]["lines"].append(line)
    memo, loops, inner_memo = {}, [0], {}

    def inner_whiles(name):
        if name not in inner_memo:
            found = []
            for ln in comps[name]["lines"]:
                if " while(" in ln:
                    found.append(ln)
                for _, c in _CALL.findall(ln):
                    found += inner_whiles(c)
            inner_memo[name] = found
        return inner_memo[name]

    def flops(name):
        if name in memo:
            return memo[name]
        comp, total = comps[name], 0
        for line in comp["lines"]:
            m = _INSTR.match(line)                       # array-typed results (not tuples)
            if m:
                out, op, operands, rest = m.group(1), m.group(3), m.group(4), m.group(5)
                comp["shapes"][out] = _dims(m.group(2))
            if m and op == "dot":
                lhs = comp["shapes"][operands.split(",")[0].strip().lstrip("%")]
                contract = _dims(re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest).group(1))
                total += 2 * math.prod(comp["shapes"][out]) * math.prod(lhs[d] for d in contract)
            for kind, callee in _CALL.findall(line):
                inner = flops(callee)
                if kind == "body" and inner:
                    loops[0] += 1
                    inner *= trips(line, inner_whiles(callee))
                total += inner
        memo[name] = total
        return total

    return flops(entry), loops[0]
