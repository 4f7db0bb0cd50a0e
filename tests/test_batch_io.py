"""batch's files without a model: format detection, lazy reading with per-line errors, the
output records, the resume scan (torn last line, duplicates, files that are not ours), the
append-only writer and the final rewrite in input order."""
import json
import os

import pytest

from dllama_mpi.apps import batch_io as bio
from dllama_mpi.apps import batch_records as rec
from dllama_mpi.apps.batch_requests import RequestError
from dllama_mpi.errors import DllamaError


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def _openai(cid, url="/v1/completions", **body):
    return json.dumps({"custom_id": cid, "method": "POST", "url": url,
                       "body": body or {"prompt": "x"}})


@pytest.mark.parametrize("first,fmt", [
    (_openai("a"), "openai"),
    ('{"custom_id": "a", "body": ', "openai"),          # malformed, still the OpenAI format
    ('{"prompt": "hi"}', "jsonl"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "jsonl"),
    ('{"prompt": "broken', "jsonl"),
    ("Tell me a story", "text"),
])
def test_detect_format(tmp_path, first, fmt):
    assert bio.detect_format(_write(tmp_path / "in", ["", "  ", first, "other"])) == fmt


def test_detect_format_empty_and_missing(tmp_path):
    with pytest.raises(DllamaError, match="holds no requests"):
        bio.detect_format(_write(tmp_path / "in", ["", " "]))
    with pytest.raises(DllamaError, match="cannot read"):
        bio.detect_format(str(tmp_path / "nope"))


def test_openai_lines_and_their_errors(tmp_path):
    path = _write(tmp_path / "in", [
        _openai("a"),
        "",
        "not json",
        "[1, 2]",
        json.dumps({"method": "POST", "url": "/v1/completions", "body": {}}),
        json.dumps({"custom_id": "e", "method": "GET", "url": "/v1/completions", "body": {}}),
        json.dumps({"custom_id": "f", "url": "/v1/embeddings", "body": {}}),
        json.dumps({"custom_id": "g", "url": "/v1/completions", "body": "text"}),
        _openai("h", "/v1/chat/completions", messages=[{"role": "user", "content": "q"}]),
    ])
    items = list(bio.read_items(path, "openai"))
    assert [i.line for i in items] == [1, 3, 4, 5, 6, 7, 8, 9]
    assert [i.index for i in items] == list(range(8))
    assert [i.custom_id for i in items] == ["a", "line-3", "line-4", "line-5", "e", "f", "g", "h"]
    codes = [i.error.code if i.error else None for i in items]
    assert codes == [None, "invalid_json", "invalid_request", "invalid_request",
                     "invalid_method", "invalid_url", "invalid_request", None]
    assert items[0].url == "/v1/completions" and items[0].body == {"prompt": "x"}
    assert items[-1].url == "/v1/chat/completions"
    assert "line 3" in items[1].error.message


def test_simple_jsonl_lines(tmp_path):
    path = _write(tmp_path / "in", [
        '{"prompt": "p", "id": "x1", "max_tokens": 3}',
        '{"messages": [{"role": "user", "content": "m"}], "id": 7}',
        '{"prompt": "q"}',
        '{"prompt": "a", "temprature": 1}',
        '{"prompt": "a", "max_tokens": 0}',
        '{"prompt": 5}',
        '{"prompt": "a", "messages": []}',
    ])
    items = list(bio.read_items(path, "jsonl"))
    assert [i.custom_id for i in items] == ["x1", "7", "line-3", "line-4", "line-5", "line-6",
                                            "line-7"]
    assert items[0].url == "/v1/completions" and items[0].body == {"prompt": "p", "max_tokens": 3}
    assert items[1].url == "/v1/chat/completions"
    assert items[2].body == {"prompt": "q"}
    assert "unknown keys temprature" in items[3].error.message
    assert "max_tokens" in items[4].error.message
    assert "non-empty string" in items[5].error.message
    assert "exactly one" in items[6].error.message
    chat = list(bio.read_items(path, "jsonl", chat=True))
    assert chat[2].url == "/v1/chat/completions"
    assert chat[2].body == {"messages": [{"role": "user", "content": "q"}]}


def test_text_lines_and_bad_utf8(tmp_path):
    path = tmp_path / "in"
    path.write_bytes(b"first prompt\r\n\nsecond {not json}\n\xff\xfe bad\nlast")
    items = list(bio.read_items(str(path), "text"))
    assert [(i.line, i.custom_id) for i in items] == [(1, "line-1"), (3, "line-3"),
                                                      (4, "line-4"), (5, "line-5")]
    assert items[0].body == {"prompt": "first prompt"}
    assert items[1].body == {"prompt": "second {not json}"}
    assert items[2].error.code == "invalid_encoding"
    assert items[3].body == {"prompt": "last"}
    assert bio.count_requests(str(path)) == 4


def _records(tmp_path, name="out.jsonl"):
    path = str(tmp_path / name)
    w = rec.RecordWriter(path, fsync_seconds=0)
    w.write(rec.ok_record("a", {"choices": [], "text": 'quote " and ,"error": inside'}))
    w.write(rec.error_record("b", RequestError("invalid_json", "bad")))
    w.write(rec.error_record("a", RequestError(rec.DUPLICATE, "dup")))
    w.write(rec.ok_record('we"ird\\id', {"x": 1}))
    w.close()
    return path


def test_records_shape_and_scan(tmp_path):
    path = _records(tmp_path)
    lines = [json.loads(line) for line in open(path)]
    assert [list(r) for r in lines] == [["id", "custom_id", "response", "error"]] * 4
    assert lines[0]["response"]["status_code"] == 200 and lines[0]["error"] is None
    assert lines[0]["id"].startswith("batch_req_")
    assert lines[0]["response"]["request_id"].startswith("req_")
    assert lines[1]["response"]["status_code"] == 400
    assert lines[1]["error"] == {"code": "invalid_json", "message": "bad"}
    assert lines[1]["response"]["body"]["error"]["message"] == "bad"
    done = rec.scan_records(path)
    assert done.main == {"a", "b", 'we"ird\\id'} and done.dups == {"a": 1}
    assert done.records == 4 and done.dropped == 0
    assert done.has("a", 0) and done.has("a", 1) and not done.has("a", 2)
    assert not done.has("c", 0)


def test_scan_drops_a_torn_last_line(tmp_path):
    path = _records(tmp_path)
    whole = open(path, "rb").read()
    with open(path, "ab") as f:
        f.write(rec.encode_record(rec.ok_record("c", {"x": 2}))[:25])
    done = rec.scan_records(path)
    assert "c" not in done.main and done.dropped == 25 and done.records == 4
    assert open(path, "rb").read() == whole                      # cut back to the last record
    assert rec.scan_records(str(tmp_path / "absent")).records == 0


@pytest.mark.parametrize("content", [b"previous results\n", b'{"id": 1}\n',
                                     b"not ours and no newline"])
def test_scan_refuses_a_file_that_is_not_ours(tmp_path, content):
    path = tmp_path / "out.jsonl"
    path.write_bytes(content)
    with pytest.raises(DllamaError, match="not a batch output"):
        rec.scan_records(str(path))
    assert path.read_bytes() == content


def test_scan_refuses_a_broken_middle_line(tmp_path):
    path = _records(tmp_path)
    data = open(path, "rb").read().split(b"\n")
    data[1] = data[1][:20]
    open(path, "wb").write(b"\n".join(data))
    with pytest.raises(DllamaError, match="line 2"):
        rec.scan_records(path)


def test_writer_fsyncs_on_a_timer(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd))
    w = rec.RecordWriter(str(tmp_path / "o"), fsync_seconds=3600)
    w.write(rec.ok_record("a", {}))
    assert synced == []
    w.close()
    assert len(synced) == 1
    w = rec.RecordWriter(str(tmp_path / "o"), fsync_seconds=0)
    w.write(rec.ok_record("b", {}))
    assert len(synced) == 2
    w.close()


def test_reorder_in_input_order(tmp_path):
    path = _records(tmp_path)
    before = open(path).read().splitlines()
    rec.reorder(path, [('we"ird\\id', 0), ("b", 0), ("a", 0), ("a", 1), ("zz", 0)])
    after = open(path).read().splitlines()
    assert after == [before[3], before[1], before[0], before[2]]
    assert sorted(os.listdir(tmp_path)) == ["out.jsonl"]


def test_resume_scan_of_100k_lines_is_fast(tmp_path):
    import time
    path = str(tmp_path / "big.jsonl")
    body = {"id": "cmpl-x", "object": "text_completion", "choices": [
        {"index": 0, "text": "word " * 100, "logprobs": None, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 100, "total_tokens": 110}}
    with open(path, "wb") as f:
        for i in range(100_000):
            f.write(rec.encode_record(rec.ok_record(f"request-{i}", body)))
    t = time.perf_counter()
    done = rec.scan_records(path)
    seconds = time.perf_counter() - t
    assert done.records == 100_000 and len(done.main) == 100_000
    assert seconds < 5.0, seconds      # the target is < 1 s (bench/bench_batch.py); generous here
    # for a shared, loaded CI machine


def test_one_writer_per_output(tmp_path):
    """The writer locks its file: a second batch on the same output (another process) is
    refused instead of appending beside the first."""
    import subprocess
    import sys
    path = str(tmp_path / "out.jsonl")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\n"
         "from dllama_mpi.apps.batch_records import RecordWriter\n"
         f"w = RecordWriter({path!r})\nprint('locked', flush=True)\ntime.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(DllamaError, match="being written by another batch"):
            rec.RecordWriter(path)
    finally:
        holder.kill()
        holder.wait()
    rec.RecordWriter(path).close()                       # free again once it is gone


def test_a_created_file_never_written_is_removed(tmp_path):
    path = tmp_path / "out.jsonl"
    rec.RecordWriter(str(path)).close()
    assert not path.exists()
    path.write_text("")
    rec.RecordWriter(str(path)).close()                  # it existed before: kept
    assert path.exists()


def test_progress_lines_and_bar():
    import io
    from dllama_mpi.apps.batch import Progress

    out = io.StringIO()                                   # not a terminal: plain lines
    p = Progress(10, every=0, quiet=False, stream=out)
    p.skip()
    p.record(True, 40)
    p.record(False, 0)
    p.tick()
    p.close()
    line = out.getvalue()
    assert line.startswith("batch: 3/10 requests (1 failed), ") and "tok/s" in line
    assert "ETA" in line and line.count("\n") == 1

    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty = Tty()
    p = Progress(4, every=0, quiet=False, stream=tty)     # a terminal: a tqdm bar
    assert p.bar is not None
    p.record(True, 10)
    p.tick()
    p.close()
    assert "1/4" in tty.getvalue() and "requests (" not in tty.getvalue()
    quiet = io.StringIO()
    p = Progress(4, every=0, quiet=True, stream=quiet)
    p.record(True, 1)
    p.tick()
    assert quiet.getvalue() == ""
