"""Paths on local disk or Cloud Storage (``gs://bucket/path``), through one library.

Every path a command takes (``--workdir``, the soft-target cache, checkpoints, results)
goes through :func:`path`, an ``etils.epath.Path``: the same library Orbax and TFDS use,
so local paths behave as ``pathlib`` paths and ``gs://`` paths go to Cloud Storage
(through ``gcsfs``). What differs between the two is kept here:

* **atomic writes**: a local file is written beside its name and renamed into place; a
  Cloud Storage object only becomes visible once its upload has completed, so it is
  written directly (a rename there is a copy and a delete, not atomic);
* **appends**: objects cannot be appended to, so :class:`LineLog` keeps the lines and
  rewrites the object;
* **access checks**: :func:`check_access` turns a missing bucket, an unreachable endpoint
  or missing credentials into a ``UserError`` that names the path, before any work starts,
  instead of a retry loop deep inside a write.

The emulator used by the tests is addressed with ``STORAGE_EMULATOR_HOST`` (gcsfs) and
``TENSORSTORE_GCS_HTTP_URL`` (tensorstore), which the Cloud Storage clients read
themselves.
"""

from __future__ import annotations

import os
import uuid

from etils import epath

from distill_jax.errors import UserError

PathLike = str | os.PathLike | epath.Path
REMOTE_SCHEMES = ("gs",)  # what Cloud Storage-backed paths start with (``gs://``)
_PUBLIC_ENDPOINT = "https://storage.googleapis.com"
_CHECK_TIMEOUT_S = 20.0


def path(value: PathLike) -> epath.Path:
    """``value`` as an ``epath.Path`` (local paths stay as given, ``gs://`` goes to GCS)."""
    return value if isinstance(value, epath.Path) else epath.Path(os.fspath(value))


def scheme(value: PathLike) -> str | None:
    """``"gs"`` for a ``gs://`` path, None for a local one."""
    text = os.fspath(value)
    head, sep, _ = text.partition("://")
    return head if sep else None


def is_remote(value: PathLike) -> bool:
    """Whether ``value`` names object storage rather than a local file."""
    return scheme(value) in REMOTE_SCHEMES


def bucket_of(value: PathLike) -> str:
    """The bucket of a ``gs://bucket/...`` path."""
    return os.fspath(value).partition("://")[2].split("/", 1)[0]


def write_text_atomic(target: PathLike, text: str) -> None:
    """Writes ``text`` so that readers see the old content or the new, never a part."""
    target = path(target)
    if is_remote(target):
        target.write_text(text)  # an object appears only once its upload completes
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.write_text(text)
    os.replace(os.fspath(tmp), os.fspath(target))


def write_bytes_atomic(target: PathLike, data: bytes) -> None:
    """Binary twin of :func:`write_text_atomic`."""
    target = path(target)
    if is_remote(target):
        target.write_bytes(data)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.write_bytes(data)
    os.replace(os.fspath(tmp), os.fspath(target))


def makedirs(directory: PathLike) -> None:
    """Creates a local directory (and parents); Cloud Storage has no directories to make."""
    directory = path(directory)
    if not is_remote(directory):
        directory.mkdir(parents=True, exist_ok=True)


def rmtree(directory: PathLike) -> None:
    """Removes a directory tree (every object under a ``gs://`` prefix); no error if absent."""
    directory = path(directory)
    if directory.exists():
        directory.rmtree()


def list_files(directory: PathLike) -> list[str]:
    """Every file under ``directory`` (recursively), as paths relative to it, read fresh
    from storage (no cached listing: other processes and tensorstore write there too)."""
    directory = path(directory)
    if is_remote(directory):
        import fsspec

        fs = fsspec.filesystem(scheme(directory))
        root = os.fspath(directory).partition("://")[2].rstrip("/")
        fs.invalidate_cache()
        return [name[len(root) + 1 :] for name in fs.find(root) if name.startswith(root + "/")]
    root = os.fspath(directory)
    return [
        os.path.relpath(os.path.join(base, name), root)
        for base, _, names in os.walk(root)
        for name in names
    ]


class LineLog:
    """A text file that grows by lines (``metrics.jsonl``): appended to on local disk,
    rewritten whole on object storage (objects are immutable), so both keep every line."""

    def __init__(self, file: PathLike):
        self.path = path(file)
        self._remote = is_remote(self.path)
        self._lines: list[str] | None = None

    def _load(self) -> list[str]:
        if self._lines is None:
            self._lines = self.path.read_text().splitlines() if self.path.exists() else []
        return self._lines

    def lines(self) -> list[str]:
        """The non-empty lines written so far."""
        if self._remote:
            return [line for line in self._load() if line.strip()]
        if not self.path.exists():
            return []
        return [line for line in self.path.read_text().splitlines() if line.strip()]

    def append(self, line: str) -> None:
        if self._remote:
            self._load().append(line)
            self.path.write_text("".join(x + "\n" for x in self._lines))
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(os.fspath(self.path), "a") as f:
            f.write(line + "\n")

    def replace(self, lines: list[str]) -> None:
        """Replaces the content with ``lines`` (atomically)."""
        self._lines = list(lines) if self._remote else None
        write_text_atomic(self.path, "".join(x + "\n" for x in lines))


def require_local(value: PathLike, what: str, hint: str) -> epath.Path:
    """``value`` if it is a local path; a ``UserError`` naming ``what`` and ``hint`` if it is
    on object storage (for readers that can only open local files)."""
    if is_remote(value):
        raise UserError(
            f"{what} {os.fspath(value)} is on Cloud Storage, which it cannot be read from: {hint}"
        )
    return path(value)


def json_api_session(value: PathLike):
    """``(endpoint, requests session)`` for Cloud Storage's JSON API calls about the
    ``gs://`` path ``value``: the emulator named by ``STORAGE_EMULATOR_HOST``, else the
    public endpoint with the application-default credentials. Raises ``UserError`` naming
    the path when there is no bucket in it or no credentials."""
    import requests

    text, bucket = os.fspath(value), bucket_of(value)
    if not bucket:
        raise UserError(f"{text}: no bucket in the path (expected gs://BUCKET/PATH)")
    emulator = os.environ.get("STORAGE_EMULATOR_HOST")
    if emulator:
        return (emulator if "://" in emulator else f"http://{emulator}"), requests.Session()
    import google.auth
    from google.auth.exceptions import DefaultCredentialsError
    from google.auth.transport.requests import AuthorizedSession

    try:
        credentials, _ = google.auth.default(
            scopes=["https://www.googleapis.com/auth/devstorage.read_write"]
        )
    except DefaultCredentialsError:
        raise UserError(
            f"{text}: no Google Cloud credentials found (on a Cloud TPU VM or GCE the "
            "service account provides them; elsewhere run `gcloud auth "
            "application-default login` or set GOOGLE_APPLICATION_CREDENTIALS)"
        ) from None
    return _PUBLIC_ENDPOINT, AuthorizedSession(credentials)


def check_access(value: PathLike) -> None:
    """For a ``gs://`` path: checks that Cloud Storage is reachable, that credentials exist
    and that the bucket exists and can be listed; raises ``UserError`` naming the path
    otherwise. Local paths are not checked."""
    if not is_remote(value):
        return
    import requests

    text, bucket = os.fspath(value), bucket_of(value)
    endpoint, session = json_api_session(value)
    url = f"{endpoint.rstrip('/')}/storage/v1/b/{bucket}/o"
    try:
        response = session.get(url, params={"maxResults": 1}, timeout=_CHECK_TIMEOUT_S)
    except requests.RequestException as err:
        raise UserError(
            f"{text}: cannot reach Cloud Storage at {endpoint} "
            f"({type(err).__name__}); check the network (or "
            "STORAGE_EMULATOR_HOST)"
        ) from None
    except Exception as err:  # credential refresh failures (google.auth.exceptions)
        raise UserError(f"{text}: cannot authenticate to Cloud Storage: {err}") from None
    if response.status_code == 404:
        raise UserError(
            f"{text}: bucket gs://{bucket} does not exist (create it with "
            f"`gcloud storage buckets create gs://{bucket}`)"
        )
    if response.status_code in (401, 403):
        raise UserError(
            f"{text}: no permission to list gs://{bucket} (HTTP "
            f"{response.status_code}); the credentials need read/write access "
            "to its objects"
        )
    if not response.ok:
        raise UserError(
            f"{text}: Cloud Storage answered HTTP {response.status_code} for "
            f"gs://{bucket}: {response.text[:200]}"
        )


def tensorstore_kvstore(value: PathLike) -> dict | str:
    """The tensorstore key-value store spec of a directory (a ``gs://`` URL or a local
    ``file`` driver spec)."""
    text = os.fspath(value).rstrip("/") + "/"
    if is_remote(text):
        return text
    return {"driver": "file", "path": os.path.abspath(text) + "/"}
