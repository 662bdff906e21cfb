"""The flat layout's module paths still import, each as the module it moved
to, with a FutureWarning that names the new path."""
import importlib
import json
import subprocess
import sys

import pytest

from lookwhen.moved import MOVED

# A fresh interpreter: an old name imported once stays in sys.modules and
# would not warn again.
IMPORT_EACH_OLD_PATH = """
import importlib, json, sys, warnings
from lookwhen.moved import MOVED
report = {}
for old, new_name in sorted(MOVED.items()):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    new = importlib.import_module(new_name)
    report[old] = {"same": module is new, "spec": new.__spec__.name,
                   "warnings": [str(w.message) for w in caught if w.category is FutureWarning]}
json.dump(report, sys.stdout)
"""


def test_old_paths_give_the_moved_modules():
    result = subprocess.run([sys.executable, "-c", IMPORT_EACH_OLD_PATH], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert sorted(report) == sorted(MOVED)
    for old, new_name in MOVED.items():
        assert report[old] == {"same": True, "spec": new_name,
                               "warnings": [f"{old} moved to {new_name}: import it from there"]}, old


def test_unknown_names_still_fail():
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("lookwhen.no_such_module")
