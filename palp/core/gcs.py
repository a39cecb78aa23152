"""gs:// URIs and the Google Cloud Storage client: the half of ``palp.core.storage`` that talks to GCS.

The client is the real ``google-cloud-storage`` one, imported only when a gs:// URI is used (an
image without it still reads and writes local paths). Credentials come from the environment
(Application Default Credentials; ``STORAGE_EMULATOR_HOST`` selects an emulator with anonymous
credentials) and are never logged. Transient failures (connection refused or reset, 429, 5xx)
are retried with exponential backoff (``with_retries``).

``StorageError`` (a storage operation that failed; the message says which and why) lives here
because the retry wrapper raises it; every caller imports it, and this module's other names,
from here.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

GS = "gs://"
log = logging.getLogger("palp.core.storage")  # retries log where they always have
T = TypeVar("T")


class StorageError(RuntimeError):
    """A storage location that cannot be read or written; the message names it."""


def is_gcs(uri: str | os.PathLike) -> bool:
    return str(uri).startswith(GS)


def split_gcs(uri: str) -> tuple[str, str]:
    """``gs://bucket/a/b`` -> ("bucket", "a/b")."""
    if not is_gcs(uri):
        raise StorageError(f"{uri!r} is not a gs:// URI")
    bucket, _, prefix = uri[len(GS) :].partition("/")
    if not bucket:
        raise StorageError(f"{uri!r} names no bucket; write gs://BUCKET/PATH")
    return bucket, prefix


# -- retries -------------------------------------------------------------------------------

def _transient_errors() -> tuple[type[BaseException], ...]:
    errors: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError)
    try:  # the GCS client's errors, where it is installed (local paths need neither)
        import requests
        from google.api_core import exceptions as gexc
    except ImportError:
        return errors
    return errors + (
        requests.exceptions.ConnectionError, requests.exceptions.Timeout,
        requests.exceptions.ChunkedEncodingError, gexc.TooManyRequests, gexc.InternalServerError,
        gexc.BadGateway, gexc.ServiceUnavailable, gexc.GatewayTimeout,
    )


def _exhausted_errors() -> tuple[type[BaseException], ...]:
    """The GCS client's own "gave up retrying" error: retrying it again would only wait longer."""
    try:
        from google.api_core.exceptions import RetryError
    except ImportError:
        return ()
    return (RetryError,)


def retry_policy():
    """The client's retry policy with a deadline of PALP_STORAGE_DEADLINE seconds (default 120)
    per call, so an outage ends in a StorageError instead of the client's own long wait."""
    from google.cloud.storage.retry import DEFAULT_RETRY

    return DEFAULT_RETRY.with_timeout(float(os.environ.get("PALP_STORAGE_DEADLINE", "120")))


def with_retries(fn: Callable[..., T]) -> Callable[..., T]:
    """Retry ``fn`` on transient errors: PALP_STORAGE_RETRIES attempts (default 8), backoff
    0.25 s doubling to 8 s with jitter. Permanent errors (404, 403, bad URIs) raise at once.
    A StorageError from here names the operation and its URI."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        attempts = int(os.environ.get("PALP_STORAGE_RETRIES", "8"))
        transient, exhausted = _transient_errors(), _exhausted_errors()
        what = f"{fn.__name__} {args[0]}" if args else fn.__name__
        for attempt in range(1, attempts + 1):
            try:
                return fn(*args, **kwargs)
            except exhausted as e:
                raise StorageError(f"{what}: storage unreachable, the client gave up retrying: {e}") from e
            except transient as e:
                if attempt == attempts:
                    raise StorageError(f"{what}: still failing after {attempts} attempts: {type(e).__name__}: {e}") from e
                delay = min(8.0, 0.25 * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)
                log.warning("%s: transient %s, retry %d/%d in %.1fs", fn.__name__, type(e).__name__, attempt, attempts - 1, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    return wrapper


# -- the client ----------------------------------------------------------------------------

@functools.lru_cache(maxsize=4)
def _client(emulator: str | None, project: str | None):
    from google.cloud import storage

    if emulator:
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(project=project or "palp", credentials=AnonymousCredentials())
    from google.auth.exceptions import DefaultCredentialsError

    try:
        return storage.Client(project=project)
    except DefaultCredentialsError:
        raise StorageError("gs:// needs Google Cloud credentials and none were found: run `gcloud auth "
                           "application-default login`, or set GOOGLE_APPLICATION_CREDENTIALS to a service account's "
                           "key file (on GKE and Vertex the node's service account is used)") from None


def gcs_client():
    """A storage client for the current environment (cached per emulator host and project)."""
    return _client(os.environ.get("STORAGE_EMULATOR_HOST"), os.environ.get("GOOGLE_CLOUD_PROJECT"))


def blob(uri: str):
    """The client's handle on one object."""
    bucket, name = split_gcs(uri)
    if not name:
        raise StorageError(f"{uri!r} names a bucket, not an object")
    return gcs_client().bucket(bucket).blob(name)


def not_found(uri: str, e: Exception) -> StorageError:
    return StorageError(f"{uri} does not exist ({type(e).__name__})")


@with_retries
def object_generations(uri: str) -> dict[str, int]:
    """Every object under a gs:// prefix (relative name -> generation), hidden names skipped.

    A generation changes whenever an object is replaced, so this identifies the exact
    contents without reading them."""
    bucket, prefix = split_gcs(str(uri))
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    blobs = gcs_client().list_blobs(bucket, prefix=prefix, retry=retry_policy())
    found = {b.name[len(prefix) :]: int(b.generation) for b in blobs if not b.name.endswith("/")}
    return {n: g for n, g in sorted(found.items()) if not any(part.startswith(".") for part in Path(n).parts)}


def signed_url(uri: str, expiration, *, method: str = "GET") -> str:
    """A V4 signed URL for one object.

    Signs with the environment's credentials: a service-account key signs locally; credentials
    from a metadata server (Vertex AI, GKE, GCE) sign through IAM ``signBlob`` with their
    access token (the service account needs roles/iam.serviceAccountTokenCreator on itself).
    ``GOOGLE_APPLICATION_CREDENTIALS`` naming a service-account key file takes precedence.
    """
    handle = blob(uri)
    credentials = None
    key_file = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
    if key_file:
        from google.oauth2 import service_account

        credentials = service_account.Credentials.from_service_account_file(key_file)
    try:
        return handle.generate_signed_url(version="v4", expiration=expiration, method=method, credentials=credentials)
    except AttributeError:  # credentials without a private key: sign through IAM
        import google.auth.transport.requests

        creds = handle.client._credentials
        email = getattr(creds, "service_account_email", None)
        if not email:
            raise StorageError(
                "signed URLs need service-account credentials: set GOOGLE_APPLICATION_CREDENTIALS to a key file, "
                "or run as a service account (Vertex AI, GKE, GCE)"
            ) from None
        creds.refresh(google.auth.transport.requests.Request())
        return handle.generate_signed_url(version="v4", expiration=expiration, method=method,
                                          service_account_email=email, access_token=creds.token)
