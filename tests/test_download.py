"""The download helper against a local HTTP server: verification, interrupted transfers, the cache."""
import hashlib
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import download as D
from download import DownloadError, download, download_set



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


def test_every_missing_file_of_a_set_is_named_in_one_message(server, tmp_path):
    """Offline, a learner who places the one file a message names should not then learn of the next."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    offline = f"http://127.0.0.1:{port}"
    files = [(f"{offline}/encoder.json", "gpt2/encoder.json", {"cache": tmp_path}),
             (f"{offline}/vocab.bpe", "gpt2/vocab.bpe", {"cache": tmp_path})]
    with pytest.raises(DownloadError) as error:
        download_set("GPT-2's BPE files", files)
    message = str(error.value)
    assert message.startswith("could not download GPT-2's BPE files (no connection to the server)")
    for url, relpath, _ in files:
        assert f"{url} as {tmp_path / relpath}" in message
    assert "\n" not in message and files_in(tmp_path) == []
    # with one of them in place, only the other is named
    (tmp_path / "gpt2/encoder.json").write_text("{}")
    with pytest.raises(DownloadError) as error:
        download_set("GPT-2's BPE files", files)
    assert "vocab.bpe" in str(error.value) and "encoder.json" not in str(error.value)


def test_fetch_all_names_gpt2s_two_files_when_both_are_missing(monkeypatch, tmp_path):
    monkeypatch.setenv("LLM_CACHE_DIR", str(tmp_path))

    def no_network(*args, **kwargs):
        raise D.requests.ConnectionError("offline")
    monkeypatch.setattr(D.requests, "get", no_network)
    with pytest.raises(DownloadError) as error:
        D.fetch_all("GPT-2's BPE files", "gpt2/encoder.json", "gpt2/vocab.bpe")
    assert str(tmp_path / "gpt2/encoder.json") in str(error.value) and str(tmp_path / "gpt2/vocab.bpe") in str(error.value)


def test_the_tiny_presets_mistral_tokenizer_comes_from_an_ungated_source(monkeypatch, tmp_path):
    """No Hub account for mistral-tiny & co: the same bytes (checked by sha256) from mistral-common's
    public repository, into the cache path of the Hub's file, with no token sent."""
    monkeypatch.setenv("LLM_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    calls = []
    monkeypatch.setattr(D, "download", lambda url, relpath, **options: calls.append((url, relpath, options)))
    D.fetch("hf/mistralai/Mistral-7B-v0.1/tokenizer.model")
    (url, relpath, options), = calls
    assert url.startswith("https://raw.githubusercontent.com/mistralai/mistral-common/") and not options["headers"]
    assert options["sha256"] == "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055"


def test_large_download_shows_progress(server, tmp_path, capsys):
    path = download(f"{server.url}/big.bin", "big.bin", sha256=sha256(BIG), cache=tmp_path)
    assert path.read_bytes() == BIG
    assert "downloading big.bin" in capsys.readouterr().err
