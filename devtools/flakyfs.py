"""A local file system that fails one write on demand: the rehearsal's full or flaky disk.

fsspec protocol ``flaky`` (registered through the ``fsspec.specs`` and
``universal_pathlib.implementations`` entry points in pyproject.toml, so every Ray worker of an
installed checkout finds it and unpickles its paths): ``flaky:///abs/folder`` is the local
folder ``/abs/folder``. While the file named by the ``fail_flag`` storage option exists, the next
file written removes it and raises ``OSError``, as a full disk would; everything else passes
through. A build pointed at ``--output flaky:///...`` (with ``storage_options: {fail_flag: ...}``
in its recipe) writes through datakit's object-store path: whole files, one call each.
"""

from __future__ import annotations

import os

from fsspec.implementations.local import LocalFileSystem
from upath.core import UPath


class FlakyFileSystem(LocalFileSystem):
    protocol = ("flaky",)
    root_marker = "/"

    def __init__(self, fail_flag: str | None = None, **kwargs):
        super().__init__(**{"auto_mkdir": True, **kwargs})
        self.fail_flag = fail_flag

    @classmethod
    def _strip_protocol(cls, path):
        path = os.fspath(path)
        if path.startswith("flaky://"):
            path = path[len("flaky://") :]
        return super()._strip_protocol(path)

    def unstrip_protocol(self, name: str) -> str:
        return f"flaky://{self._strip_protocol(name)}"

    def _fail_once(self, path: str) -> None:
        if not self.fail_flag:
            return
        try:
            os.remove(self.fail_flag)
        except FileNotFoundError:
            return
        raise OSError(f"{path}: write failed (injected by devtools.flakyfs)")

    def pipe_file(self, path, value, **kwargs):
        self._fail_once(path)
        return super().pipe_file(path, value, **kwargs)

    def put_file(self, lpath, rpath, **kwargs):
        self._fail_once(rpath)
        return super().put_file(lpath, rpath, **kwargs)


class FlakyPath(UPath):
    """universal_pathlib's path class for ``flaky://`` (its generic fallback does not unpickle)."""

    __slots__ = ()
