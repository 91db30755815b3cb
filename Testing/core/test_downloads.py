"""Verified downloads against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import os
import socket
import threading

import pytest

from DiffSegCore.errors import ModelError
from DiffSegCore.models.downloads import ChecksumError, DownloadError, check_url, download_file, fetch_bytes
from Testing.core.local_http import FileServer

PAYLOAD = os.urandom(300_000)
SHA = hashlib.sha256(PAYLOAD).hexdigest()
FAST = {"retries": 0, "backoff": 0.0}


@pytest.fixture
def server():
    with FileServer() as srv:
        srv.files["/model.zip"] = PAYLOAD
        yield srv


def leftovers(folder) -> list[str]:
    """Files a download left behind, ignoring its lock file."""
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock"))


def test_download_succeeds_and_reports_progress(server, tmp_path):
    seen = []
    dest = download_file(
        server.url("/model.zip"), tmp_path / "m.zip", SHA, len(PAYLOAD), progress=lambda d, t: seen.append((d, t))
    )
    assert dest.read_bytes() == PAYLOAD
    assert seen[-1] == (len(PAYLOAD), len(PAYLOAD))
    assert leftovers(tmp_path) == ["m.zip"]
    # A second call finds the verified file and does not fetch again.
    download_file(server.url("/model.zip"), dest, SHA, len(PAYLOAD), progress=lambda d, t: None)
    assert len(server.gets("/model.zip")) == 1


def test_resume_after_connection_drops_halfway(server, tmp_path):
    half = len(PAYLOAD) // 2
    server.drop_after["/model.zip"] = half
    dest = download_file(server.url("/model.zip"), tmp_path / "m.zip", SHA, len(PAYLOAD), retries=2, backoff=0.0)
    first, second = server.gets("/model.zip")
    assert "Range" not in first
    resumed_at = int(second["Range"].removeprefix("bytes=").removesuffix("-"))
    assert 0 < resumed_at <= half  # a read cut short by the drop loses at most one chunk
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == SHA


def test_resume_in_a_later_call_after_giving_up(server, tmp_path):
    half = len(PAYLOAD) // 3
    server.drop_after["/model.zip"] = half
    with pytest.raises(DownloadError, match=r"closed after|broke"):
        download_file(server.url("/model.zip"), tmp_path / "m.zip", SHA, len(PAYLOAD), **FAST)
    assert not (tmp_path / "m.zip").exists()
    [partial] = leftovers(tmp_path)
    kept = (tmp_path / partial).stat().st_size
    assert partial.endswith(".part") and 0 < kept <= half
    dest = download_file(server.url("/model.zip"), tmp_path / "m.zip", SHA, len(PAYLOAD), **FAST)
    assert server.gets("/model.zip")[-1]["Range"] == f"bytes={kept}-"
    assert dest.read_bytes() == PAYLOAD
    assert leftovers(tmp_path) == ["m.zip"]


def test_checksum_mismatch_leaves_nothing(server, tmp_path):
    wrong = hashlib.sha256(b"another file").hexdigest()
    with pytest.raises(ChecksumError, match="does not match the registry") as caught:
        download_file(server.url("/model.zip"), tmp_path / "m.zip", wrong, len(PAYLOAD), **FAST)
    assert isinstance(caught.value, ModelError)
    assert "\n" not in str(caught.value)
    assert leftovers(tmp_path) == []


def test_size_mismatch_is_refused(server, tmp_path):
    with pytest.raises(ChecksumError):
        download_file(server.url("/model.zip"), tmp_path / "m.zip", SHA, len(PAYLOAD) + 1, **FAST)
    assert leftovers(tmp_path) == []


def test_404_gives_a_clear_error_without_retrying(server, tmp_path):
    with pytest.raises(DownloadError, match=r"not found \(HTTP 404\).*registry entry is out of date"):
        download_file(server.url("/missing.zip"), tmp_path / "m.zip", SHA, retries=3, backoff=0.0)
    assert len(server.gets("/missing.zip")) == 1
    assert leftovers(tmp_path) == []


def test_stalled_server_times_out(server, tmp_path):
    server.stall = 5.0
    with pytest.raises(DownloadError, match=r"sent no data for 0.3 s \(timeout\)"):
        download_file(server.url("/model.zip"), tmp_path / "m.zip", SHA, timeout=(2.0, 0.3), **FAST)


def test_offline_host_gives_a_clear_error(tmp_path):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(DownloadError, match=r"cannot reach 127.0.0.1; are you offline\?.*gave up after 2 attempts"):
        download_file(f"http://127.0.0.1:{port}/m.zip", tmp_path / "m.zip", SHA, retries=1, backoff=0.0)


def test_broken_proxy_is_named(server, tmp_path, monkeypatch):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{port}")
    with pytest.raises(DownloadError, match="proxy"):
        download_file(server.url("/model.zip"), tmp_path / "m.zip", SHA, **FAST)


@pytest.mark.parametrize(
    "url", ["http://example.org/m.zip", "ftp://127.0.0.1/m.zip", "file:///tmp/m.zip", "https:///m.zip"]
)
def test_insecure_or_unknown_urls_are_refused(url):
    with pytest.raises(DownloadError):
        check_url(url)


def test_https_and_local_http_are_accepted():
    for url in ("https://example.org/m.zip", "http://localhost:8000/m.zip", "http://127.0.0.1/m.zip"):
        check_url(url)


def test_concurrent_downloads_leave_one_good_copy(server, tmp_path):
    server.chunk_delay = 0.002  # ~75 chunks: both threads are in flight at the same time
    results, errors = [], []

    def fetch():
        try:
            results.append(download_file(server.url("/model.zip"), tmp_path / "m.zip", SHA, len(PAYLOAD), **FAST))
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=fetch) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(results) == 3 and len(set(results)) == 1
    assert results[0].read_bytes() == PAYLOAD
    assert len(server.gets("/model.zip")) == 1  # the others waited, then found the verified file
    assert leftovers(tmp_path) == ["m.zip"]


def test_fetch_bytes_reads_small_files(server):
    server.files["/models.json"] = b'{"models": []}'
    assert fetch_bytes(server.url("/models.json"), limit=100) == b'{"models": []}'
    with pytest.raises(DownloadError, match="HTTP 404"):
        fetch_bytes(server.url("/nothing.json"), limit=100)


@pytest.mark.parametrize("hide_length", [False, True], ids=["content-length", "no-length"])
def test_a_server_sending_more_than_the_registry_size_is_stopped(server, tmp_path, hide_length):
    # A hostile or broken server sends 8 MiB for a 300 kB entry: refused on its Content-Length, or
    # cut off at the registry's size while streaming; nothing stays on disk either way.
    server.files["/big.zip"] = os.urandom(8 << 20)
    server.hide_length = hide_length
    with pytest.raises(ChecksumError, match="sends more than the 300000 bytes the registry gives") as caught:
        download_file(server.url("/big.zip"), tmp_path / "m.zip", SHA, len(PAYLOAD), **FAST)
    assert "\n" not in str(caught.value)
    assert leftovers(tmp_path) == []


def test_redirects_are_followed_only_to_https_or_this_machine(server, tmp_path):
    server.redirects["/hop"] = server.url("/model.zip")
    assert download_file(server.url("/hop"), tmp_path / "m.zip", SHA, len(PAYLOAD), **FAST).read_bytes() == PAYLOAD
    # A downgrade to plain http elsewhere, or to another scheme, is refused before any connection is made.
    server.redirects["/down"] = "http://example.org/model.zip"
    with pytest.raises(DownloadError, match=r"refusing plain-http download from example\.org \(redirected from"):
        download_file(server.url("/down"), tmp_path / "d.zip", SHA, len(PAYLOAD), **FAST)
    server.redirects["/ftp"] = "ftp://example.org/model.zip"
    with pytest.raises(DownloadError, match="only https:// URLs are supported"):
        fetch_bytes(server.url("/ftp"), limit=100)
    server.redirects["/loop"] = "/loop"
    with pytest.raises(DownloadError, match="redirects more than 5 times"):
        fetch_bytes(server.url("/loop"), limit=100)
    assert len(server.gets("/loop")) == 6
    assert sorted(leftovers(tmp_path)) == ["m.zip"]


def test_fetch_bytes_stops_at_its_limit(server):
    server.files["/huge.json"] = b"[" * 5000
    with pytest.raises(DownloadError, match="sent more than 1000 bytes"):
        fetch_bytes(server.url("/huge.json"), limit=1000)
