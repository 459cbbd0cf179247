"""Workdir and data paths that may be URLs: `gs://bucket/runs/x` on Cloud TPU VMs, any fsspec URL, or a local
path. URLs are kept as they are; every file access goes through `etils.epath` (GCS needs gcsfs or TensorFlow)."""

import os

from etils import epath


def is_url(path) -> bool:
    return "://" in os.fspath(path)


def resolve_workdir(workdir) -> str:
    """The workdir as a string: URLs (gs://...) unchanged, local paths made absolute."""
    path = os.fspath(workdir)
    return path if is_url(path) else os.path.abspath(path)


def workdir_path(workdir) -> epath.Path:
    return epath.Path(resolve_workdir(workdir))


def write_text_atomic(path: epath.Path, text: str) -> None:
    """Readers never see a half-written file: local files go through a temporary file and a rename; an object
    store (gs://) publishes an object only once its upload completes."""
    if is_url(path):
        path.write_text(text)
        return
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_text(text)
    tmp.replace(path)
