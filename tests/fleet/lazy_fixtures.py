"""tests/lazy's real-tool layer fixtures, made usable by the multi-host tests.

pytest only shows a conftest's fixtures to tests below its directory, and
tests/lazy is not a package (its modules import `writers` as a top-level
module), so tests/fleet cannot import its conftest by name. This module
loads that conftest from its file under a name of its own and re-exports
its fixture functions; a fleet test module imports them, which is how
pytest picks up fixtures defined elsewhere.

The re-exported fixtures are registered a second time (here), so a run of
the whole suite converts the layers with ctr-remote once for tests/lazy and
once for tests/fleet (a few seconds) instead of sharing one session cache.
Nothing in tests/lazy is changed.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

LAZY_TESTS = Path(__file__).resolve().parents[1] / "lazy"


def _load_lazy_conftest() -> ModuleType:
    # tests/lazy's modules import each other as top-level modules (`writers`,
    # `test_lazy_agent`), as pytest's rootdir-less import mode arranges for them.
    # Appended, not prepended: nothing already importable is shadowed.
    if str(LAZY_TESTS) not in sys.path:
        sys.path.append(str(LAZY_TESTS))
    name = "fleet_lazy_conftest"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, LAZY_TESTS / "conftest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


_lazy = _load_lazy_conftest()

# Fixtures (import these names into a test module to use them there).
source_layout = _lazy.source_layout
lazy_containerd = _lazy.lazy_containerd
ctr_remote_layers = _lazy.ctr_remote_layers
expected_files = _lazy.expected_files

__all__ = ["LAZY_TESTS", "ctr_remote_layers", "expected_files", "lazy_containerd",
           "source_layout"]
