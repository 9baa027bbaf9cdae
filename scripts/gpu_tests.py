"""Run tests/test_gpu.py: with pytest where it is installed, else by calling each ``test_*`` directly.

The GPU machine has no pytest (and nothing can be installed there), so without it this installs a
minimal stand-in module named ``pytest`` (decorators that do nothing, ``skip``, ``raises``, ``approx``)
so that tests/conftest.py and tests/test_attach.py, whose helpers the GPU tests reuse, import; then it
runs every ``test_*`` function of tests/test_gpu.py in order, catching failures. The tests take no
fixtures or parameters for that reason.

    python3 scripts/gpu_tests.py [--json PATH] [--no-pytest]

Exit status 0 when every test passed (or was skipped), 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import sys
import time
import traceback
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class _Skipped(Exception):
    pass


def _stub_pytest() -> types.ModuleType:
    """Just enough of pytest for the test modules to import and for the GPU tests to run."""
    mod = types.ModuleType("pytest")

    class _Mark:
        def __init__(self, name: str = "") -> None:
            self.name = name

        def __getattr__(self, name: str) -> _Mark:
            return _Mark(name)

        def __call__(self, *args, **kwargs):
            if len(args) == 1 and callable(args[0]) and not kwargs:
                return args[0]  # @pytest.mark.slow
            return lambda fn: fn  # @pytest.mark.parametrize(...), skipif(...): decorate nothing

    def fixture(*args, **kwargs):
        if len(args) == 1 and callable(args[0]) and not kwargs:
            return args[0]
        return lambda fn: fn

    def skip(reason: str = "", **_: object):
        raise _Skipped(reason)

    @contextlib.contextmanager
    def raises(exc, match=None):
        import re

        try:
            yield
        except exc as err:
            if match is not None and not re.search(match, str(err)):
                raise AssertionError(f"{exc.__name__} raised, but {match!r} not in {err!r}") from err
            return
        raise AssertionError(f"DID NOT RAISE {exc}")

    def approx(expected, rel=1e-6, tol=1e-12):
        class _Approx:
            def __eq__(self, other):
                return abs(other - expected) <= max(rel * abs(expected), tol)

        return _Approx()

    mod.mark = _Mark()
    mod.fixture = fixture
    mod.skip = skip
    mod.raises = raises
    mod.approx = approx
    mod.warns = lambda *a, **k: contextlib.nullcontext()
    mod.importorskip = lambda name, *a, **k: importlib.import_module(name)
    mod.__stub__ = True
    return mod


def run_without_pytest(json_path: str | None) -> int:
    sys.modules["pytest"] = _stub_pytest()
    sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]
    module = importlib.import_module("test_gpu")
    results = []
    if module.DEVICE is None:
        print("SKIP tests/test_gpu.py: no CUDA (set SPARSE_CLT_GPU_TEST_DEVICE=cpu to run on the CPU)")
    tests = [(name, fn) for name, fn in vars(module).items() if name.startswith("test_") and callable(fn)]
    for name, fn in tests:
        if module.DEVICE is None:
            results.append({"test": name, "outcome": "skipped", "seconds": 0.0})
            continue
        start = time.perf_counter()
        try:
            fn()
            outcome, detail = "passed", ""
        except _Skipped as exc:
            outcome, detail = "skipped", str(exc)
        except Exception:
            outcome, detail = "failed", traceback.format_exc()
        seconds = time.perf_counter() - start
        results.append({"test": name, "outcome": outcome, "seconds": round(seconds, 2), "detail": detail[-3000:]})
        print(f"{outcome.upper():7s} {name} ({seconds:.1f} s)", flush=True)
        if detail:
            print(detail, flush=True)
        _write(json_path, module.DEVICE, results)  # after every test: a run cut short keeps what it did
    counts = _write(json_path, module.DEVICE, results)
    print(f"test_gpu.py on {module.DEVICE} without pytest: " + ", ".join(f"{n} {o}" for o, n in counts.items()))
    return 1 if counts["failed"] else 0


def _write(json_path: str | None, device: str | None, results: list[dict]) -> dict[str, int]:
    counts = {o: sum(r["outcome"] == o for r in results) for o in ("passed", "failed", "skipped")}
    if json_path:
        Path(json_path).write_text(json.dumps({"runner": "direct (no pytest)", "device": device,
                                               "counts": counts, "results": results}, indent=2))
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None, help="write the outcome of every test here")
    parser.add_argument("--no-pytest", action="store_true", help="use the direct runner even if pytest is installed")
    args = parser.parse_args(argv)
    if not args.no_pytest:
        try:
            import pytest
        except ImportError:
            print("pytest is not installed: running the test functions directly", flush=True)
        else:
            rc = int(pytest.main(["-q", "-rA", "-p", "no:cacheprovider", str(ROOT / "tests" / "test_gpu.py")]))
            if args.json:
                Path(args.json).write_text(json.dumps({"runner": "pytest", "exit_status": rc}, indent=2))
            return 0 if rc in (0, 5) else 1
    return run_without_pytest(args.json)


if __name__ == "__main__":
    sys.exit(main())
