"""Test support: a Cloud Storage emulator on a free loopback port (gcp-storage-emulator,
in memory), and the environment that points gcsfs / etils.epath, tensorstore and Orbax at
it. Nothing leaves 127.0.0.1."""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager

BUCKET = "distill-test"

# gcsfs reads this when it is imported: no bucket-layout API calls (the emulator lacks it).
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client_env(url: str) -> dict[str, str]:
    """What the Cloud Storage clients read to talk to the emulator at ``url``."""
    return {
        "STORAGE_EMULATOR_HOST": url,  # gcsfs (etils.epath, Orbax's metadata)
        "TENSORSTORE_GCS_HTTP_URL": url,  # tensorstore (Orbax's arrays, the soft-target cache)
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "x",  # tensorstore: no credential lookup
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # gcsfs: no bucket-layout API calls
        # If anything looked for GCE credentials, it would ask a closed loopback port.
        "GCE_METADATA_HOST": "127.0.0.1:9",
        "GCE_METADATA_IP": "127.0.0.1:9",
        "NO_GCE_CHECK": "True",
    }


class Emulator:
    """A running emulator: ``url``, ``env`` (for subprocesses) and its default bucket."""

    def __init__(self, server, port: int):
        self.server, self.port = server, port
        self.url = f"http://127.0.0.1:{port}"
        self.env = client_env(self.url)
        self.bucket = BUCKET

    def gs(self, *parts: str) -> str:
        return "gs://" + "/".join((self.bucket,) + parts)


_PATCHED = False


def _send_generations() -> None:
    """Makes the emulator's object reads carry ``x-goog-generation``, as Cloud Storage's do.

    tensorstore conditions the byte-range reads of a sharded zarr chunk on the generation
    of the shard index it read first; without the header it has no generation to give."""
    global _PATCHED
    if _PATCHED:
        return
    from gcp_storage_emulator import server
    from gcp_storage_emulator.handlers import objects

    def with_generation(handler):
        def handle(request, response, storage, *args, **kwargs):
            handler(request, response, storage, *args, **kwargs)
            try:
                obj = storage.get_file_obj(
                    request.params["bucket_name"], request.params["object_id"]
                )
            except Exception:  # not found: the handler has answered already
                return
            response["x-goog-generation"] = str(obj["generation"])
            response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))

        return handle

    for _, methods in server.HANDLERS:
        for method, handler in list(methods.items()):
            if handler in (objects.download, objects.get):
                methods[method] = with_generation(handler)
    _PATCHED = True


_PRECONDITIONS_PATCHED = False


def _check_generation_preconditions() -> None:
    """Makes the emulator honour ``ifGenerationMatch`` on uploads (``uploadType=media``,
    the object named in the query) and deletes, answering 412 as Cloud Storage does when
    the object's generation differs ("0": the object must not exist). The run lock's
    ``gs://`` lease (distill_jax/runlock.py) relies on it."""
    global _PRECONDITIONS_PATCHED
    if _PRECONDITIONS_PATCHED:
        return
    import threading
    from http import HTTPStatus

    from gcp_storage_emulator import server
    from gcp_storage_emulator.handlers import objects

    lock = threading.Lock()  # check and write as one step

    def conditional(handler, object_of):
        def handle(request, response, storage, *args, **kwargs):
            wanted = request.query.get("ifGenerationMatch")
            if not wanted:
                return handler(request, response, storage, *args, **kwargs)
            with lock:
                try:
                    current = str(
                        storage.get_file_obj(request.params["bucket_name"], object_of(request))[
                            "generation"
                        ]
                    )
                except Exception:  # absent
                    current = "0"
                if current != str(wanted[0]):
                    response.status = HTTPStatus.PRECONDITION_FAILED
                    response.json({"error": {"code": 412, "message": "conditionNotMet"}})
                    return
                return handler(request, response, storage, *args, **kwargs)

        return handle

    def upload_name(request):
        return request.query["name"][0]

    def path_name(request):
        return request.params["object_id"]

    for _, methods in server.HANDLERS:
        for method, handler in list(methods.items()):
            if handler is objects.insert:
                methods[method] = conditional(handler, upload_name)
            elif handler is objects.delete:
                methods[method] = conditional(handler, path_name)
    _PRECONDITIONS_PATCHED = True


@contextmanager
def running(bucket: str = BUCKET):
    """Starts an in-memory emulator with ``bucket``; sets the client environment of this
    process while it runs."""
    import logging

    from gcp_storage_emulator.server import create_server

    logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)
    _send_generations()
    _check_generation_preconditions()
    port = free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
    server.start()
    emulator = Emulator(server, port)
    saved = {k: os.environ.get(k) for k in emulator.env}
    os.environ.update(emulator.env)
    try:
        yield emulator
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
