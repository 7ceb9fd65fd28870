"""Shared pytest fixtures: the reference architectures of tests/architectures.py, exported
to ONNX once per session instead of shipped as files.

torch is a test-only dependency; without it the tests that use these fixtures are
skipped and the rest of the suite runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest

__all__ = ["arch_path", "architectures"]

logger = logging.getLogger(__name__)


@pytest.fixture(scope="session")
def arch_path(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """A factory `name -> path of the exported .onnx`, exporting each architecture once.

    Exports are lazy, so running one test exports only the model it needs.
    """
    pytest.importorskip("torch")
    from tests import architectures as arch

    folder = tmp_path_factory.mktemp("architectures")
    paths: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in paths:
            paths[name] = arch.export(name, folder / f"{name}.onnx")
        return paths[name]

    return get


@pytest.fixture(scope="session")
def architectures(arch_path: Callable[[str], Path]) -> dict[str, Path]:
    """Every reference architecture, exported: name -> path."""
    from tests.architectures import ARCHITECTURES

    return {name: arch_path(name) for name in ARCHITECTURES}
