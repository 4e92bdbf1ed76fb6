"""Every test module has a file name of its own across tests/ and its folders (tests/gpu/): pytest
imports them by base name without packages, and two of one name stop the whole run at collection
("import file mismatch"), on CI and on every machine."""

from collections import Counter
from pathlib import Path


def test_test_modules_have_unique_names():
    names = Counter(p.name for p in Path(__file__).resolve().parent.rglob("test_*.py"))
    assert [name for name, count in names.items() if count > 1] == []
