"""tools/NAME.py as a module, for the tests of the tools (they are scripts, not a package)."""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

TOOLS = Path(__file__).resolve().parent.parent / "tools"


def load_tool(name: str) -> ModuleType:
    """tools/NAME.py, loaded once and registered in sys.modules under a name of its own, where
    its dataclasses look their module up."""
    module = f"umvd_live_tools_{name}"
    if module in sys.modules:
        return sys.modules[module]
    spec = importlib.util.spec_from_file_location(module, TOOLS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    tool = importlib.util.module_from_spec(spec)
    sys.modules[module] = tool
    spec.loader.exec_module(tool)
    return tool
