"""Issue 10, section 5: the reward server (serve.start_server) under abuse: bad Content-Length, slow-loris,
too many connections, lone surrogates, deep nesting, other methods. A fake model keeps it fast: these tests are
about HTTP, the scoring itself is tested in test_evaluation.py."""
import http.client
import json
import socket
import time
from urllib.parse import urlparse

import pytest

from serve import start_server


class FakeModel:
    max_len = 64

    def tokens(self, prompt, answer, max_len=None, cuts=None):  # RewardModel.tokens' signature
        return list(range(len(answer) % 50 + 1))

    def sequence_rewards(self, sequences, batch_size=32, padding_side="right"):
        return [float(len(s)) for s in sequences]


@pytest.fixture
def serve():
    stops = []

    def start(**kw):
        url, stop = start_server(FakeModel(), port=0, **{"max_body": 1 << 20, **kw})
        stops.append(stop)
        u = urlparse(url)
        return u.hostname, u.port
    yield start
    for stop in stops:
        stop()


def raw_request(address, data, read=True):
    """Send bytes, return (status, json body, closed-by-server) -- never waits for more than 30 s."""
    s = socket.create_connection(address, timeout=30)
    s.sendall(data)
    if not read:
        return s
    response = b""
    try:
        while b"\r\n\r\n" not in response or len(response.split(b"\r\n\r\n", 1)[1]) < _length(response):
            chunk = s.recv(65536)
            if not chunk:
                break
            response += chunk
    finally:
        s.close()
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body), head


def _length(response):
    for line in response.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def post(address, body, method="POST", path="/score"):
    conn = http.client.HTTPConnection(*address, timeout=30)
    conn.request(method, path, body=json.dumps(body) if not isinstance(body, (bytes, str)) else body,
                 headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, (json.loads(data) if data else None), r


@pytest.mark.parametrize("length,status", [("-1", 400), ("abc", 400), ("1_000", 400), ("+5", 400), (None, 411)])
def test_bad_content_length_is_answered_without_reading_the_body(serve, length, status):
    address = serve(idle_timeout=60)  # if the server waited for the body, recv below would wait 30 s and fail
    head = b"POST /score HTTP/1.1\r\nHost: x\r\n" + (b"Content-Length: " + length.encode() + b"\r\n" if length else b"")
    got, body, _ = raw_request(address, head + b"\r\n" + b'{"prompt": "p", "response": "r"')  # body never ends
    assert got == status and "error" in body


def test_chunked_bodies_are_refused(serve):
    address = serve(idle_timeout=60)
    got, body, _ = raw_request(address, b"POST /score HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n")
    assert got == 411


def test_an_oversized_body_is_refused_before_reading(serve):
    address = serve(idle_timeout=60, max_body=1000)
    got, body, _ = raw_request(address, b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 50000000\r\n\r\n{")
    assert got == 413


def test_a_half_sent_request_is_dropped_after_the_idle_timeout(serve):
    address = serve(idle_timeout=0.3)
    s = raw_request(address, b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Len", read=False)
    assert s.recv(100) == b""  # the server closed it (recv would time out after 30 s otherwise)
    s.close()
    s = raw_request(address, b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"pro", read=False)
    assert s.recv(100) == b""  # a body that stops half-way too
    s.close()
    assert post(address, {"prompt": "p", "response": "abc"})[:2] == (200, {"rewards": [4.0]})


def test_connection_threads_are_bounded(serve):
    address = serve(idle_timeout=60, max_connections=2)
    idle = [raw_request(address, b"GET /hea", read=False) for _ in range(2)]
    deadline = time.time() + 30
    status = None
    while time.time() < deadline:  # until both idle connections hold their slots
        status, body, head = raw_request(address, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        if status == 503:
            break
        time.sleep(0.05)
    assert status == 503 and "too many connections" in body["error"]
    for s in idle:
        s.close()
    while time.time() < deadline:  # their slots come back once they are gone
        status, body, _ = raw_request(address, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        if status == 200:
            break
        time.sleep(0.05)
    assert status == 200


@pytest.mark.parametrize("raw", [b'{"prompt": "p", "response": "\\ud800"}', b'{"query": ["\\udfff x"]}',
                                 b"[" * 200_000 + b"]" * 200_000,
                                 b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", b"\xff\xfe{}"])
def test_unencodable_or_deeply_nested_json_gets_a_400(serve, raw):
    address = serve()
    status, body, _ = post(address, raw)
    assert status == 400 and "error" in body
    assert post(address, {"prompt": "p", "response": "ab"})[:2] == (200, {"rewards": [3.0]})  # still serving


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH", "OPTIONS", "FOO"])
def test_other_methods_get_a_json_405(serve, method):
    address = serve()
    status, body, r = post(address, {"prompt": "p", "response": "r"}, method=method)
    assert status == 405 and "not allowed" in body["error"] and r.getheader("Allow") == "GET, POST"
    assert r.getheader("Content-Type") == "application/json"


def test_a_malformed_request_line_gets_json(serve):
    address = serve()
    status, body, _ = raw_request(address, b"GET / x HTTP/1.1\r\n\r\n")
    assert status == 400 and "error" in body
