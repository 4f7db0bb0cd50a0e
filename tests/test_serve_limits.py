"""The server's guards, with the fake scheduler: request bodies are bounded (413, then the
server still answers), CORS is off unless origins are given, and the API key can come from
the environment."""
from __future__ import annotations

import json
import threading

import pytest
from fastapi.testclient import TestClient

from dllama_mpi.apps.serve import create_app
from fake_scheduler import FakeScheduler, FakeTokenizer

pytestmark = pytest.mark.timeout(60)
CTX = 256


@pytest.fixture
def scheduler():
    s = FakeScheduler(max_seq_len=CTX)
    t = threading.Thread(target=s.run, daemon=True)
    t.start()
    yield s
    s.close(cancel=True)
    t.join(10)


def _ok(c):
    r = c.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 3})
    assert r.status_code == 200, r.text
    return r


def test_a_body_over_the_limit_is_a_413_and_the_server_goes_on(scheduler):
    app = create_app(scheduler, FakeTokenizer(), "m", CTX, max_body_bytes=2000)
    with TestClient(app) as c:
        big = json.dumps({"model": "m", "prompt": "x" * 5000, "max_tokens": 3})
        r = c.post("/v1/completions", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

        def chunks():                      # no content-length: counted as it arrives
            for _ in range(10):
                yield b" " * 500
        r = c.post("/v1/completions", content=chunks(),
                   headers={"content-type": "application/json"})
        assert r.status_code == 413
        _ok(c)


def test_cors_is_off_unless_origins_are_given(scheduler):
    origin = {"Origin": "http://example.test"}
    with TestClient(create_app(scheduler, FakeTokenizer(), "m", CTX)) as c:
        assert "access-control-allow-origin" not in _ok(c).headers
        r = c.get("/v1/models", headers=origin)
        assert "access-control-allow-origin" not in r.headers
    app = create_app(scheduler, FakeTokenizer(), "m", CTX, cors_origins=("http://example.test",))
    with TestClient(app) as c:
        r = c.get("/v1/models", headers=origin)
        assert r.headers["access-control-allow-origin"] == "http://example.test"
        r = c.get("/v1/models", headers={"Origin": "http://elsewhere.test"})
        assert "access-control-allow-origin" not in r.headers
