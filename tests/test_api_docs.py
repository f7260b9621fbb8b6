"""docs/api.md lists every public name with its arguments, and stays in step with the code."""
import importlib
import inspect
import re
import runpy
from pathlib import Path

import cifarpress

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "api.md"
render = runpy.run_path(str(ROOT / "scripts" / "api_docs.py"))["render"]


def sections() -> dict[str, str]:
    """heading name -> its text, from the committed page."""
    parts = re.split(r"^## (?:class )?`([A-Za-z_]+)`\n", PAGE.read_text(), flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def test_every_public_name_is_documented_with_its_arguments():
    documented = sections()
    missing = [name for name in cifarpress.__all__ if name not in documented]
    assert not missing, f"docs/api.md lacks {missing}; run python scripts/api_docs.py"
    for name in cifarpress.__all__:
        obj = getattr(importlib.import_module(cifarpress._EXPORTS[name]), name)
        if inspect.isfunction(obj):
            for param in inspect.signature(obj).parameters:
                assert re.search(rf"\b{param}\b", documented[name]), f"{name}: argument {param} undocumented"
        elif hasattr(obj, "model_fields"):
            for field in obj.model_fields:
                assert f"`{field}:" in documented[name], f"{name}: field {field} undocumented"


def test_every_documented_name_imports_from_the_package():
    for name in sections():
        assert name in cifarpress.__all__ and getattr(cifarpress, name) is not None


def test_the_page_is_what_the_docstrings_say():
    assert PAGE.read_text() == render(), "docs/api.md is out of date; run python scripts/api_docs.py"
