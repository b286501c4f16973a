"""The download helper against a local HTTP server: verification, interrupted transfers, the cache."""
import hashlib
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from download import DownloadError, download



BODY = b"exactly these bytes\n" * 100
BIG = bytes(range(256)) * 5000  # 1.28 MB: large enough for a progress line


class Handler(BaseHTTPRequestHandler):
    """Serves server.routes[path] = (body, Content-Length sent); a length above len(body) means the
    server sends less than it announced and then closes the connection."""

    def do_GET(self):
        self.server.requests.append(self.path)
        if self.path not in self.server.routes:
            self.send_error(404)
            return
        body, length = self.server.routes[self.path]
        self.send_response(200)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # a proxy set in the environment must not catch these
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.requests = []
    httpd.routes = {"/file.txt": (BODY, len(BODY)), "/big.bin": (BIG, len(BIG)),
                    "/cut.txt": (BODY[:500], len(BODY))}
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def files_in(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_download_verifies_and_caches(server, tmp_path):
    path = download(f"{server.url}/file.txt", "sub/file.txt", sha256=sha256(BODY), cache=tmp_path)
    assert path == tmp_path / "sub" / "file.txt" and path.read_bytes() == BODY
    assert files_in(tmp_path) == ["sub/file.txt"]  # no temporary file left beside it


def test_cached_file_is_reused_without_a_request(server, tmp_path):
    for _ in range(3):
        download(f"{server.url}/file.txt", "file.txt", sha256=sha256(BODY), cache=tmp_path)
    download(f"{server.url}/file.txt", "file.txt", cache=tmp_path)  # no hash known: it exists, so it was verified
    assert server.requests == ["/file.txt"]


def test_corrupt_cached_file_is_fetched_again(server, tmp_path):
    (tmp_path / "file.txt").write_bytes(b"corrupt")
    path = download(f"{server.url}/file.txt", "file.txt", sha256=sha256(BODY), cache=tmp_path)
    assert path.read_bytes() == BODY and server.requests == ["/file.txt"]


def test_hash_mismatch_leaves_no_file(server, tmp_path):
    with pytest.raises(DownloadError, match="sha256") as error:
        download(f"{server.url}/file.txt", "file.txt", sha256="0" * 64, cache=tmp_path)
    assert files_in(tmp_path) == []
    assert str(tmp_path / "file.txt") in str(error.value)


def test_size_mismatch_leaves_no_file(server, tmp_path):
    with pytest.raises(DownloadError, match=f"expected {len(BODY) + 1}"):
        download(f"{server.url}/file.txt", "file.txt", size=len(BODY) + 1, cache=tmp_path)
    assert files_in(tmp_path) == []


def test_interrupted_transfer_leaves_no_finished_looking_file(server, tmp_path):
    with pytest.raises(DownloadError, match="cut off|ended after"):
        download(f"{server.url}/cut.txt", "cut.txt", cache=tmp_path)
    assert files_in(tmp_path) == []


def test_http_error(server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404"):
        download(f"{server.url}/missing.txt", "missing.txt", cache=tmp_path)
    assert files_in(tmp_path) == []


def test_no_connection_gives_one_clear_sentence(tmp_path):
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/file.txt"
    with pytest.raises(DownloadError) as error:
        download(url, "file.txt", cache=tmp_path)
    message = str(error.value)
    assert url in message and str(tmp_path / "file.txt") in message and "by hand" in message
    assert "\n" not in message
    assert files_in(tmp_path) == []


def test_large_download_shows_progress(server, tmp_path, capsys):
    path = download(f"{server.url}/big.bin", "big.bin", sha256=sha256(BIG), cache=tmp_path)
    assert path.read_bytes() == BIG
    assert "downloading big.bin" in capsys.readouterr().err
