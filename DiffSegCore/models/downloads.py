"""Verified downloads: streaming with progress, timeouts, retries, HTTP Range resume, sha256, atomic rename.

requests does the HTTP; what it lacks (resume of a partial file, retry of a stream that broke
halfway, checksum before the file enters the cache, one writer per file, the https rule at every
redirect, a cap on what a server may send) is written here.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urljoin, urlparse

import requests
from filelock import FileLock
from tqdm import tqdm
from urllib3.exceptions import ReadTimeoutError

from DiffSegCore import __version__
from DiffSegCore.errors import ModelError

ByteProgress = Callable[[int, int | None], None]
"""Called with (bytes on disk, expected total or None) as a download advances."""

LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
# A read cut short by a dropped connection loses its whole chunk, so keep chunks small.
CHUNK_BYTES = 1 << 16
DEFAULT_TIMEOUT = (10.0, 60.0)  # seconds to connect, seconds of silence while reading
RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
MAX_REDIRECTS = 5
HEADERS = {
    "User-Agent": f"DiffSeg/{__version__}",
    # Byte offsets for Range must count the stored bytes, so never let the server compress.
    "Accept-Encoding": "identity",
}


class DownloadError(ModelError):
    """A model file could not be fetched (network, proxy, server)."""


class ChecksumError(DownloadError):
    """A fetched file is not the one the registry describes (sha256 or size differ)."""


class _Retry(Exception):
    """A failure worth another attempt; carries the message to show if attempts run out."""


def check_url(url: str, redirected_from: str | None = None) -> None:
    """Refuse anything but https, except plain http to this machine (local test servers)."""
    parts = urlparse(url)
    if parts.scheme == "https" and parts.hostname:
        return
    if parts.scheme == "http" and parts.hostname in LOCAL_HOSTS:
        return
    via = f" (redirected from {redirected_from})" if redirected_from else ""
    if parts.scheme == "http":
        raise DownloadError(
            f"refusing plain-http download from {parts.hostname}{via}: it cannot be trusted; "
            "ask the registry maintainer for an https:// URL"
        )
    raise DownloadError(f"cannot download '{url[:200]}'{via}: only https:// URLs are supported")


def _get(url: str, headers: dict[str, str], timeout: tuple[float, float]) -> requests.Response:
    """A streaming GET that follows redirects itself, so that every hop obeys check_url.

    requests would follow a redirect from https to plain http (or to anything else) on its own.
    """
    first = url
    for _ in range(MAX_REDIRECTS + 1):
        check_url(url, None if url == first else first)
        response = requests.get(url, headers=headers, stream=True, timeout=timeout, allow_redirects=False)
        if not response.is_redirect:
            return response
        response.close()
        url = urljoin(url, response.headers["Location"])
    raise DownloadError(f"{first} redirects more than {MAX_REDIRECTS} times; tell the registry maintainer")


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(CHUNK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_bytes(url: str, limit: int, timeout: tuple[float, float] = DEFAULT_TIMEOUT) -> bytes:
    """A small file (e.g. a registry) in memory, at most `limit` bytes; same URL rules and errors as downloads."""
    host = urlparse(url).hostname
    try:
        with _get(url, HEADERS, timeout) as response:
            _check_status(response, url)
            body = bytearray()
            for chunk in response.iter_content(CHUNK_BYTES):
                body += chunk
                if len(body) > limit:
                    raise DownloadError(f"{url} sent more than {limit} bytes, too much for its kind of file; nothing was kept")
            return bytes(body)
    except requests.RequestException as exc:
        raise DownloadError(_describe(exc, host, timeout)) from None
    except _Retry as exc:
        raise DownloadError(str(exc)) from None


def download_file(
    url: str,
    dest: str | Path,
    sha256: str,
    size: int | None = None,
    *,
    progress: ByteProgress | None = None,
    timeout: tuple[float, float] = DEFAULT_TIMEOUT,
    retries: int = 4,
    backoff: float = 1.0,
) -> Path:
    """Fetch `url` to `dest` and return `dest`, which then has exactly the given sha256.

    Bytes land in a `.part` file named after the expected checksum, so an interrupted download
    resumes with an HTTP Range request (in this call's retries or a later call) and never mixes
    with another file's bytes. The file is checked, then renamed into place; on a mismatch the
    partial file is deleted. A lock beside `dest` lets only one process fetch it at a time;
    the others wait, then find the finished file. `progress` defaults to a tqdm bar on stderr.
    """
    check_url(url)
    dest = Path(dest)
    sha256 = sha256.lower()
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(f"{dest.name}.{sha256[:16]}.part")
    with FileLock(dest.with_name(dest.name + ".lock")):
        if dest.exists():
            if sha256_file(dest) == sha256:
                return dest
            dest.unlink()
        bar = None
        if progress is None:
            bar = tqdm(total=size, unit="B", unit_scale=True, desc=dest.name, leave=False, disable=None)
            progress = _bar_callback(bar)
        try:
            _fetch_with_retries(url, part, size, progress, timeout, retries, backoff)
        finally:
            if bar is not None:
                bar.close()
        _verify(part, url, sha256, size)
        os.replace(part, dest)
    return dest


def _bar_callback(bar: tqdm) -> ByteProgress:
    def update(done: int, total: int | None) -> None:
        if total is not None and bar.total != total:
            bar.total = total
        bar.update(done - bar.n)

    return update


def _fetch_with_retries(url, part, size, progress, timeout, retries, backoff) -> None:
    host = urlparse(url).hostname
    for attempt in range(retries + 1):
        try:
            _fetch(url, part, size, progress, timeout)
            return
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
            if isinstance(exc, (requests.exceptions.ProxyError, requests.exceptions.SSLError)):
                raise DownloadError(_describe(exc, host, timeout)) from None
            message = _describe(exc, host, timeout)
        except requests.RequestException as exc:
            raise DownloadError(_describe(exc, host, timeout)) from None
        except _Retry as exc:
            message = str(exc)
        if attempt < retries:
            time.sleep(backoff * 2**attempt)
    raise DownloadError(f"{message} (gave up after {retries + 1} attempts; run the command again to resume)")


def _fetch(url: str, part: Path, size: int | None, progress: ByteProgress, timeout: tuple[float, float]) -> None:
    """One request: continue `part` from its current length, or start it over."""
    have = part.stat().st_size if part.exists() else 0
    if size is not None and have > size:
        part.unlink()
        have = 0
    if size is not None and have == size:
        return
    headers = dict(HEADERS, Range=f"bytes={have}-") if have else HEADERS
    with _get(url, headers, timeout) as response:
        if response.status_code == 416 and have:
            # The server says there is nothing past our end: either complete or not this file.
            total = _content_range(response.headers.get("Content-Range", ""))[2]
            if total == have:
                return
            part.unlink()
            raise _Retry(f"the partial download of {url} did not match the server's file; starting over")
        _check_status(response, url)
        if response.status_code != 206:
            have = 0  # the server ignored Range and sends the whole file
        elif _content_range(response.headers.get("Content-Range", ""))[0] != have:
            part.unlink()
            raise _Retry(f"the server answered another byte range than asked for {url}; starting over")
        length = response.headers.get("Content-Length")
        total = have + int(length) if length and length.isdigit() else size
        if size is not None and total is not None and total > size:
            _oversized(part, url, size)
        progress(have, total)
        with open(part, "ab" if have else "wb") as out:
            for chunk in response.iter_content(CHUNK_BYTES):
                if size is not None and have + len(chunk) > size:
                    out.close()
                    _oversized(part, url, size)
                out.write(chunk)
                have += len(chunk)
                progress(have, total)
    if total is not None and have < total:
        raise _Retry(f"the connection to {urlparse(url).hostname} closed after {have} of {total} bytes")


def _oversized(part: Path, url: str, size: int) -> None:
    """Stop a server sending more than the registry's size before it fills the disk."""
    part.unlink(missing_ok=True)
    raise ChecksumError(
        f"{url} sends more than the {size} bytes the registry gives for it; the download was stopped and "
        "nothing was kept, tell the registry maintainer"
    )


def _content_range(value: str) -> tuple[int | None, int | None, int | None]:
    """(start, end, total) from 'bytes a-b/n' or 'bytes */n'; None where absent."""
    match = re.fullmatch(r"bytes (?:(\d+)-(\d+)|\*)/(\d+|\*)", value.strip())
    if not match:
        return None, None, None
    return tuple(int(g) if g and g.isdigit() else None for g in match.groups())  # type: ignore[return-value]


def _check_status(response: requests.Response, url: str) -> None:
    code = response.status_code
    if code < 400:
        return
    if code in (404, 410):
        raise DownloadError(
            f"{url} was not found (HTTP {code}); the registry entry is out of date, tell its maintainer"
        )
    if code in (401, 403):
        raise DownloadError(f"access to {url} was denied (HTTP {code}); the file is not public or needs a login")
    if code == 407:
        raise DownloadError(
            f"the proxy asks for authentication (HTTP 407) for {url}; put credentials in HTTPS_PROXY or ask IT"
        )
    if code in RETRYABLE_STATUS:
        raise _Retry(f"the server answered HTTP {code} for {url}")
    raise DownloadError(f"the server answered HTTP {code} {response.reason} for {url}")


def _describe(exc: requests.RequestException, host: str | None, timeout: tuple[float, float]) -> str:
    """One line saying what went wrong in the user's terms, not urllib3's."""
    if isinstance(exc, requests.exceptions.ProxyError):
        return (
            f"the proxy refused or could not reach {host}; check the HTTPS_PROXY / HTTP_PROXY / NO_PROXY "
            "environment variables"
        )
    if isinstance(exc, requests.exceptions.SSLError):
        return (
            f"the TLS certificate of {host} could not be verified; behind an inspecting proxy, point "
            "REQUESTS_CA_BUNDLE at your organisation's certificate bundle"
        )
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return f"connecting to {host} timed out after {timeout[0]:g} s; are you offline or behind a proxy?"
    # A stall in the middle of a body reaches us as a ConnectionError wrapping urllib3's timeout.
    if isinstance(exc, requests.exceptions.ReadTimeout) or (exc.args and isinstance(exc.args[0], ReadTimeoutError)):
        return f"{host} sent no data for {timeout[1]:g} s (timeout); the server is stalled or the network is down"
    if isinstance(exc, requests.exceptions.ChunkedEncodingError):
        return f"the connection to {host} broke during the transfer"
    if isinstance(exc, requests.ConnectionError):
        return f"cannot reach {host}; are you offline? (check the network, or a proxy in HTTPS_PROXY)"
    return f"download from {host} failed: {exc}"


def _verify(part: Path, url: str, sha256: str, size: int | None) -> None:
    actual_size = part.stat().st_size
    actual = sha256_file(part)
    if actual == sha256 and (size is None or actual_size == size):
        return
    part.unlink()
    raise ChecksumError(
        f"the file from {url} does not match the registry (sha256 {actual[:12]}…, {actual_size} bytes; "
        f"expected {sha256[:12]}…{'' if size is None else f', {size} bytes'}); it was deleted, tell the "
        "registry maintainer"
    )
