"""README examples run: every ```python block of README.md executes without error."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_examples() -> None:
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index: int, tmp_path, monkeypatch, request) -> None:
    code = BLOCKS[index]
    if "load_model" in code:
        request.getfixturevalue("smollm2")  # skips with a reason when the GGUF is absent
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"README.md python block {index}", "exec"), {"__name__": "readme_example"})
