"""Build hook: ships the top-level ``templates/``, ``initramfs/`` and ``images/`` folders inside
the wheel as ``sidusctl/_data/<name>`` (where :func:`sidusctl.core.paths.data_dir` looks in an
installed package). Everything else is declared in pyproject.toml.

The folders are copied into setuptools' build directory (``build/lib``), never into the source
tree, so a build leaves nothing new under ``sidusctl/``. File modes are kept (the initramfs
scripts are executable; the wheel records the mode and pip restores the executable bit). An
editable install (``pip install -e .``) copies nothing: the checkout's own folders are used.
The sdist carries the folders through MANIFEST.in, so a wheel built from it is the same.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
DATA_DIRS = ("templates", "initramfs", "images")
SKIP = ("__pycache__",)


class BuildPyWithData(build_py):
    """``build_py`` plus a copy of :data:`DATA_DIRS` to ``<build_lib>/sidusctl/_data/``."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return
        for name in DATA_DIRS:
            src = HERE / name
            if not src.is_dir():
                raise FileNotFoundError(f"{src}: missing (an incomplete sdist or checkout?)")
            self._copy_data(src, Path(self.build_lib) / "sidusctl" / "_data" / name)

    def _copy_data(self, src: Path, dest: Path) -> None:
        for path in sorted(src.rglob("*")):
            rel = path.relative_to(src)
            if any(part in SKIP for part in rel.parts) or path.suffix in (".pyc", ".pyo"):
                continue
            if path.is_symlink():
                raise ValueError(f"{path}: symlinks are not shipped; use a real file")
            if path.is_file():
                self.mkpath(str((dest / rel).parent))
                self.copy_file(str(path), str(dest / rel), preserve_mode=True)


setup(cmdclass={"build_py": BuildPyWithData})
