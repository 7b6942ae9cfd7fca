"""Import the example scripts under `examples/` (files, not package modules) in tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(relative: str, name: str | None = None) -> ModuleType:
    """Execute `examples/<relative>` as a module (registered in `sys.modules` under `name`, default a name derived
    from the path, since dataclasses look their module up while the file executes)."""
    path = EXAMPLES / relative
    name = name or "example_" + relative.removesuffix(".py").replace("/", "_")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
