"""The README's model table is the registry's: regenerate it and compare."""
import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load_table_script():
    spec = importlib.util.spec_from_file_location("model_table", ROOT / "scripts" / "model_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_readme_model_table_matches_the_registry():
    readme = (ROOT / "README.md").read_text()
    start = readme.index("<!-- model-table:start -->") + len("<!-- model-table:start -->")
    end = readme.index("<!-- model-table:end -->")
    shown_rows = [line for line in readme[start:end].strip().splitlines()[2:]]
    assert shown_rows == list(_load_table_script().table_rows())


def test_readme_states_the_two_fresh_machine_commands():
    readme = (ROOT / "README.md").read_text()
    assert "bash scripts/main.sh" in readme and "bash scripts/test.sh" in readme
    assert "scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
