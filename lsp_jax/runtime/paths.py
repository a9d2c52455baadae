"""Run folders that are local directories or object-store URIs (gs://, s3://, az://, hf://).

Local paths go through the os module exactly as before; remote ones through `etils.epath`,
whose backend for these schemes is fsspec (gcsfs for gs://) or, when TensorFlow is
installed, tf.io.gfile. Object stores have no folders, no append and no atomic rename, but
writing one object is atomic: callers rewrite whole objects instead of appending.
"""

import contextlib
import importlib
import importlib.util
import os
import posixpath
import re
import shutil
import tempfile

from lsp_jax.errors import UserError

# Scheme -> (fsspec protocol epath asks for, the pip package that implements it).
REMOTE_BACKENDS = {
    "gs": ("gcs", "gcsfs"),
    "s3": ("s3", "s3fs"),
    "az": ("az", "adlfs"),
    "hf": ("hf", "huggingface_hub"),
}
# Scheme -> (module, pip package) needed besides: orbax's CheckpointManager asks the GCS
# client whether a gs:// bucket has a hierarchical namespace.
EXTRA_MODULES = {"gs": (("google.cloud.storage", "google-cloud-storage"),)}
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


def scheme(path) -> str | None:
    """'gs' for 'gs://bucket/run', None for a local path."""
    match = _SCHEME.match(os.fspath(path))
    return match.group(1) if match else None


def is_remote(path) -> bool:
    """Whether `path` is a URI (scheme://...) rather than a local path."""
    return scheme(path) is not None


def join(path, *parts) -> str:
    """os.path.join for local paths; '/'-joined for URIs."""
    path = os.fspath(path)
    return posixpath.join(path, *parts) if is_remote(path) else os.path.join(path, *parts)


def normalize(path) -> str:
    """Absolute local path, or the URI without trailing slashes."""
    path = os.fspath(path)
    if is_remote(path):
        head, _, rest = path.partition("://")
        return f"{head}://{rest.rstrip('/')}"
    return os.path.abspath(path)


def dirname(path) -> str:
    path = os.fspath(path)
    return posixpath.dirname(path) if is_remote(path) else os.path.dirname(path)


def basename(path) -> str:
    path = os.fspath(path)
    return posixpath.basename(path) if is_remote(path) else os.path.basename(path)


def check_backend(path) -> None:
    """Raises UserError if `path` is a URI whose storage packages are not installed."""
    name = scheme(path)
    if name is None:
        return
    if name not in REMOTE_BACKENDS:
        supported = ", ".join(f"{s}://" for s in REMOTE_BACKENDS)
        raise UserError(
            f"{path}: unsupported storage scheme {name}://. Use {supported} or a local path."
        )
    protocol, package = REMOTE_BACKENDS[name]
    missing = [] if _epath_uses_tensorflow() or _has_fsspec(protocol) else [package]
    missing += [p for module, p in EXTRA_MODULES.get(name, ()) if not _importable(module)]
    if missing:
        noun = "package" if len(missing) == 1 else "packages"
        raise UserError(
            f"{path} is on {name}:// storage, which needs the {noun} {' and '.join(missing)}: "
            f"pip install {' '.join(missing)}"
        )


def _has_fsspec(protocol: str) -> bool:
    import fsspec

    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError:
        return False
    return True


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def _epath_uses_tensorflow() -> bool:
    """Mirrors etils.epath: tf.io.gfile serves URIs when TensorFlow is importable,
    unless EPATH_USE_TF is set to false."""
    if os.environ.get("EPATH_USE_TF", "").lower() in ("false", "no", "f", "0"):
        return False
    return importlib.util.find_spec("tensorflow") is not None


def epath(path):
    """etils.epath.Path for `path`, after checking its backend is installed."""
    from etils import epath as epath_lib

    check_backend(path)
    return epath_lib.Path(os.fspath(path))


def makedirs(path) -> None:
    """Creates a local folder (and parents). For a URI only checks the backend: object
    stores have no folders, and creating one through gcsfs could create a bucket."""
    if is_remote(path):
        check_backend(path)
    else:
        os.makedirs(path, exist_ok=True)


def exists(path) -> bool:
    return epath(path).exists() if is_remote(path) else os.path.exists(path)


def isfile(path) -> bool:
    return epath(path).is_file() if is_remote(path) else os.path.isfile(path)


def read_bytes(path) -> bytes:
    if is_remote(path):
        return epath(path).read_bytes()
    with open(path, "rb") as f:
        return f.read()


def read_text(path) -> str:
    return read_bytes(path).decode("utf-8")


def write_bytes(path, data: bytes) -> None:
    """Writes a whole file atomically: locally a temporary file renamed over `path`;
    remotely one object write (atomic on GCS and S3)."""
    if is_remote(path):
        epath(path).write_bytes(data)
        return
    tmp = os.fspath(path) + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_text(path, text: str) -> None:
    """write_bytes of the UTF-8 text."""
    write_bytes(path, text.encode("utf-8"))


def upload(local_file, path) -> None:
    """Copies a local file to `path` (a URI or a local path), replacing it."""
    if is_remote(path):
        with open(local_file, "rb") as src, epath(path).open("wb") as dst:
            shutil.copyfileobj(src, dst)
    else:
        shutil.copyfile(local_file, path)


def upload_tree(local_dir, path) -> list[str]:
    """Copies every file under `local_dir` to the same relative place under `path`;
    returns the destination paths."""
    written = []
    for root, _, files in os.walk(local_dir):
        rel = os.path.relpath(root, local_dir)
        parts = [] if rel == os.curdir else rel.split(os.sep)
        if not is_remote(path):
            os.makedirs(os.path.join(path, *parts), exist_ok=True)
        for name in sorted(files):
            dst = join(path, *parts, name)
            upload(os.path.join(root, name), dst)
            written.append(dst)
    return written


@contextlib.contextmanager
def staging_dir(path):
    """Yields a local folder to write into: `path` itself when local; for a URI an empty
    folder of the same name inside a temporary folder (which also holds any sibling the
    writer makes), whose files are uploaded under `path` when the block ends without an
    exception. The temporary folder is deleted either way."""
    if not is_remote(path):
        yield os.fspath(path)
        return
    check_backend(path)
    with tempfile.TemporaryDirectory(prefix="lsp_jax_staging_") as scratch:
        local = os.path.join(scratch, basename(normalize(path)) or "staged")
        os.mkdir(local)
        yield local
        upload_tree(local, path)
