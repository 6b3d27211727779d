"""A missing optional package is one line naming the pip install that brings it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from deploy_support import train_tiny_run
from imgcls.cli import main
from imgcls.extras import MissingExtraError


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tiny_run(tmp_path_factory.mktemp("extras"))[0]


@pytest.mark.parametrize("hidden, argv, extra", [
    ("fastapi", ["serve", "{run}"], "serve"),
    ("uvicorn", ["serve", "{run}"], "serve"),
    ("onnx", ["export", "{run}"], "export"),
    ("onnxruntime", ["predict", "{run}", "{run}", "--out", "{run}/x.csv", "--engine", "onnx"], "export"),
])
def test_a_missing_extra_names_its_install_command(run: Path, monkeypatch, capsys, hidden, argv, extra) -> None:
    monkeypatch.setitem(sys.modules, hidden, None)  # importing it now raises ImportError
    code = main([a.format(run=run) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == MissingExtraError.exit_code
    assert len(err.splitlines()) == 1 and f"pip install 'imgcls[{extra}]'" in err and repr(hidden) in err
