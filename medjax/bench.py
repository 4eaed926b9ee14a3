"""``python -m medjax.bench NAME [options]``: run the benchmark module ``medjax.benchmarks.NAME``.

Every module in ``medjax/benchmarks/`` that defines ``main(argv) -> int`` is a benchmark;
``python -m medjax.bench NAME --help`` shows its options. With no name, every benchmark runs with
its defaults, one after the other.
"""
from __future__ import annotations

import importlib
import pkgutil
import sys

import medjax.benchmarks


def available() -> list[str]:
    """Benchmark names: the modules of ``medjax.benchmarks``."""
    return sorted(m.name for m in pkgutil.iter_modules(medjax.benchmarks.__path__)
                  if not m.name.startswith("_"))


def _usage() -> str:
    return ("usage: python -m medjax.bench {" + ",".join(available()) + "} [options]\n"
            "       python -m medjax.bench NAME --help   (options of one benchmark)\n"
            "       python -m medjax.bench               (run every benchmark with defaults)")


def run(name: str, argv: list[str]) -> int:
    if name not in available():
        print(f"medjax.bench: unknown benchmark {name!r}; available: {', '.join(available())}",
              file=sys.stderr)
        return 2
    module = importlib.import_module(f"medjax.benchmarks.{name}")
    if not callable(getattr(module, "main", None)):
        print(f"medjax.bench: medjax/benchmarks/{name}.py defines no main(argv)", file=sys.stderr)
        return 2
    return int(module.main(argv) or 0)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv:
        return run(argv[0], argv[1:])
    status = 0
    for name in available():
        print(f"== medjax.bench {name}", flush=True)
        status = max(status, run(name, []))
    return status


if __name__ == "__main__":
    sys.exit(main())
