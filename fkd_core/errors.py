"""Exceptions fkd raises on purpose, and the one rule that says which failures are worth a retry."""

from __future__ import annotations

import errno


class FkdError(Exception):
    """Base class of every error fkd raises on purpose."""


class ImageError(FkdError):
    """An image could not be read or decoded; the message is the reason recorded for it."""


class RowError(FkdError):
    """A CSV row is invalid; the message names the row and the reason."""


class UserError(FkdError):
    """Something the user gave cannot work: a missing path, model or bucket, a bad config.

    Retrying cannot heal it, so it is never retried; the CLI prints its message as one line and exits 2. The
    message names what is wrong and where.
    """


class CheckpointError(UserError):
    """A checkpoint is missing, unsafe or does not match its config."""


class UnavailableDetector(UserError):
    """A detector was asked for whose package is not installed (``pip install 'fkd[yunet]'``)."""


class SourceNotFound(UserError, FileNotFoundError):
    """The images, CSV or prefix a run should read does not exist."""


class BucketNotFound(UserError, FileNotFoundError):
    """An object-store bucket does not exist (fkd never creates one)."""


class AccessDenied(UserError, PermissionError):
    """The store refused the credentials fkd was given for a location."""


CREDENTIAL_HINT = (
    "check the store's credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_PROFILE, "
    "or the instance role) and its endpoint (AWS_ENDPOINT_URL)"
)


class OutputNotWritable(UserError, OSError):
    """A local output cannot take what fkd writes: a full disk, a read-only or foreign file system. Nothing a retry
    heals; the message names the file and the errno."""


# What a local write answers when the place itself is the problem (not the data, not a passing fault).
_OUTPUT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def output_error(e: OSError, path: str) -> OSError:
    """``e`` from writing ``path``, as :class:`OutputNotWritable` where the place cannot take the write."""
    if e.errno not in _OUTPUT_ERRNOS or isinstance(e, UserError):
        return e
    return OutputNotWritable(f"cannot write {path}: {e.strerror or type(e).__name__} (errno {e.errno})")


class RunConflict(UserError):
    """A run id cannot be resumed as asked (another model or detector settings than it started with)."""


# Error codes object stores (S3 and its look-alikes) answer when they are busy or briefly broken.
_TRANSIENT_CODES = {
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottled",
    "RequestThrottledException",
    "TooManyRequestsException",
    "ProvisionedThroughputExceededException",
    "RequestLimitExceeded",
    "SlowDown",
    "RequestTimeout",
    "RequestTimeoutException",
    "PriorRequestNotComplete",
    "InternalError",
    "InternalFailure",
    "ServiceUnavailable",
    "ServiceUnavailableException",
    "BandwidthLimitExceeded",
}
_TRANSIENT_ERRNOS = {
    errno.ECONNRESET,
    errno.ECONNREFUSED,
    errno.ECONNABORTED,
    errno.ETIMEDOUT,
    errno.EPIPE,
    errno.EAGAIN,
    errno.EHOSTUNREACH,
    errno.ENETUNREACH,
    errno.ENETDOWN,
}
# Exception class names (any module) that mean the connection, not the request, failed.
_TRANSIENT_NAMES = {
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ConnectionClosedError",
    "ProxyConnectionError",
    "ResponseStreamingError",
    "IncompleteReadError",
    "ServerDisconnectedError",
    "ClientConnectionError",
    "ClientConnectorError",
    "ClientOSError",
    "ClientPayloadError",
    "ServerTimeoutError",
    "ConnectTimeout",
    "ReadTimeout",
    "RemoteProtocolError",
}


def is_transient(exc: BaseException) -> bool:
    """True if ``exc`` (or an exception it was raised from) is one that a later attempt may not meet.

    Transient: connection failures and timeouts, throttling, and 5xx answers from a store. Everything else (a
    missing file or bucket, a denied request, a bad config, a bug) fails the same way every time and is not.
    """
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, UserError | FileNotFoundError | PermissionError | NotADirectoryError | IsADirectoryError):
            return False
        if isinstance(e, ConnectionError | TimeoutError):
            return True
        if type(e).__name__ in _TRANSIENT_NAMES:
            return True
        if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
            return True
        response = getattr(e, "response", None)  # botocore ClientError
        if isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code", ""))
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            if code in _TRANSIENT_CODES or (isinstance(status, int) and 500 <= status < 600) or status == 429:
                return True
        status = getattr(e, "status", None)  # aiohttp ClientResponseError
        if isinstance(status, int) and (500 <= status < 600 or status == 429):
            return True
        e = e.__cause__ or e.__context__
    return False
