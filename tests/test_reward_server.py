"""Issue 10, section 5: the reward server (serve.start_server) under abuse: bad Content-Length, slow-loris,
too many connections, lone surrogates, deep nesting, other methods. A fake model keeps it fast: these tests are
about HTTP, the scoring itself is tested in test_evaluation.py."""
import http.client
import json
import socket
import threading
import time
import types
from urllib.parse import urlparse

import pytest

from serve import start_server


class FakeModel:
    max_len, likelihood = 64, False

    def pieces(self, prompt, answer, max_len=None, cuts=None):  # RewardModel.pieces' signature
        return [0], list(range(len(answer) % 50))

    def text_tokens(self, text, max_len=None):
        return list(range(len(text) % 50 + 1)), None

    def sequence_rewards(self, sequences, batch_size=32, padding_side="right", answer_starts=None):
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


@pytest.mark.slow
@pytest.mark.parametrize("length,status", [("-1", 400), ("abc", 400), ("1_000", 400), ("+5", 400), (None, 411)])
def test_bad_content_length_is_answered_without_reading_the_body(serve, length, status):
    address = serve(idle_timeout=60)  # if the server waited for the body, recv below would wait 30 s and fail
    head = b"POST /score HTTP/1.1\r\nHost: x\r\n" + (b"Content-Length: " + length.encode() + b"\r\n" if length else b"")
    got, body, _ = raw_request(address, head + b"\r\n" + b'{"prompt": "p", "response": "r"')  # body never ends
    assert got == status and "error" in body


@pytest.mark.slow
def test_chunked_bodies_are_refused(serve):
    address = serve(idle_timeout=60)
    got, body, _ = raw_request(address, b"POST /score HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n")
    assert got == 411


@pytest.mark.slow
def test_an_oversized_body_is_refused_before_reading(serve):
    address = serve(idle_timeout=60, max_body=1000)
    got, body, _ = raw_request(address, b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 50000000\r\n\r\n{")
    assert got == 413


@pytest.mark.slow
def test_a_half_sent_request_is_dropped_after_the_idle_timeout(serve):
    address = serve(idle_timeout=0.3)
    s = raw_request(address, b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Len", read=False)
    assert s.recv(100) == b""  # the server closed it (recv would time out after 30 s otherwise)
    s.close()
    s = raw_request(address, b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"pro", read=False)
    assert s.recv(100) == b""  # a body that stops half-way too
    s.close()
    assert post(address, {"prompt": "p", "response": "abc"})[:2] == (200, {"rewards": [4.0]})


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.parametrize("raw", [b'{"prompt": "p", "response": "\\ud800"}', b'{"query": ["\\udfff x"]}',
                                 b"[" * 200_000 + b"]" * 200_000,
                                 b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", b"\xff\xfe{}"])
def test_unencodable_or_deeply_nested_json_gets_a_400(serve, raw):
    address = serve()
    status, body, _ = post(address, raw)
    assert status == 400 and "error" in body
    assert post(address, {"prompt": "p", "response": "ab"})[:2] == (200, {"rewards": [3.0]})  # still serving


@pytest.mark.slow
@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH", "OPTIONS", "FOO"])
def test_other_methods_get_a_json_405(serve, method):
    address = serve()
    status, body, r = post(address, {"prompt": "p", "response": "r"}, method=method)
    assert status == 405 and "not allowed" in body["error"] and r.getheader("Allow") == "GET, POST"
    assert r.getheader("Content-Type") == "application/json"


@pytest.mark.slow
def test_a_malformed_request_line_gets_json(serve):
    address = serve()
    status, body, _ = raw_request(address, b"GET / x HTTP/1.1\r\n\r\n")
    assert status == 400 and "error" in body


@pytest.mark.slow
@pytest.mark.parametrize("line", [b"HELLO\r\n\r\n", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
                                  b"GET\r\n\r\n", b"POST /score\r\n\r\n"])
def test_a_garbage_request_line_gets_an_http_error_with_a_status_line(serve, line):
    address = serve()
    s = socket.create_connection(address, timeout=30)
    s.sendall(line)
    response = b""
    while chunk := s.recv(65536):
        response += chunk
    s.close()
    assert response.startswith(b"HTTP/1.") and int(response.split()[1]) == 400  # used to be a bare JSON body
    assert "error" in json.loads(response.partition(b"\r\n\r\n")[2])


@pytest.mark.slow
@pytest.mark.parametrize("lengths", [(b"5", b"5"), (b"2", b"40")])
def test_two_content_length_headers_are_refused(serve, lengths):
    address = serve(idle_timeout=60)
    head = b"POST /score HTTP/1.1\r\nHost: x\r\n" + b"".join(b"Content-Length: " + n + b"\r\n" for n in lengths)
    status, body, _ = raw_request(address, head + b'\r\n{"prompt": "p", "response": "r"}')
    assert status == 400 and "more than one Content-Length" in body["error"]  # used to take the first


@pytest.mark.slow
def test_the_listen_backlog_holds_as_many_connections_as_are_served(serve):
    """Connections that arrive while the server is busy wait in the backlog; with the default 5 the rest had
    their SYNs dropped (a 1 s retry, and resets under load). The server here never accepts: all must still connect."""
    from serve import RewardServer
    server = RewardServer(("127.0.0.1", 0), types.SimpleNamespace(model=FakeModel()), 8, 1 << 20, 64, 5.0, 32, 5.0)
    try:
        clients = [socket.create_connection(server.server_address, timeout=10) for _ in range(32)]
        for c in clients:
            c.close()
    finally:
        server.server_close()


@pytest.mark.slow
def test_header_drippers_cannot_starve_a_normal_client_beyond_the_head_deadline(serve):
    """64 connections drip their headers a byte at a time (one byte per connection every `drip` seconds, far
    inside the idle timeout), taking every connection slot. Each is cut off at the head deadline, so a normal
    client is served (after 503s while the slots are taken) before a single dripper could have sent its whole head
    -- which it would otherwise do after len(head) drips, holding its slot all along."""
    head_timeout, drip, slots = 0.5, 0.05, 64
    address = serve(idle_timeout=10, head_timeout=head_timeout, max_connections=slots)
    head = b"POST /score HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 400 + b"\r\n"  # 400 drips: 20 s
    drippers = [socket.create_connection(address, timeout=30) for _ in range(slots)]
    sent, cut = [0] * slots, [False] * slots
    stop = threading.Event()

    def drip_all():
        while not stop.is_set() and not all(cut):
            for k, s in enumerate(drippers):
                if not cut[k] and sent[k] < len(head):
                    try:
                        s.sendall(head[sent[k]:sent[k] + 1])
                        sent[k] += 1
                    except OSError:  # the server closed it
                        cut[k] = True
            time.sleep(drip)
    dripping = threading.Thread(target=drip_all, daemon=True)
    dripping.start()
    statuses = []
    try:
        while max(sent) < len(head):  # the bound: before any dripper could have finished its head
            status = raw_request(address, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")[0]
            statuses.append(status)
            if status == 200 and 503 in statuses:  # the drippers held every slot, then lost them
                break
            time.sleep(drip)
        stop.set()
        dripping.join()
        assert statuses[-1] == 200 and 503 in statuses, f"starved: {statuses} while the drippers dripped"
        assert max(sent) < len(head)
        assert all(closed_by_server(s) for s in drippers)  # cut off at the deadline, not served
    finally:
        stop.set()
        for s in drippers:
            s.close()


def closed_by_server(s):
    try:
        return s.recv(100) == b""
    except ConnectionResetError:
        return True
