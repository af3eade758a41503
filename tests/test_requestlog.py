import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

# The JSONL request log: whole lines, safe from any thread, never failing a request.

import json
import os
import re
import stat
import threading
from datetime import datetime, timedelta, timezone

from hypothesis import given, strategies as st

from requestlog import RequestLog, rfc3339, utc_timestamp


def read_records(path) -> list[dict]:
    data = path.read_bytes()
    assert data.endswith(b"\n")
    return [json.loads(line) for line in data.split(b"\n")[:-1]]


def test_creates_missing_folder_and_writes_one_line_per_record(tmp_path):
    path = tmp_path / "new" / "deeper" / "log.jsonl"
    log = RequestLog(str(path))
    log.write({"id": 1, "status": "done"})
    log.write({"id": 2, "status": "cancelled"})
    log.close()
    assert read_records(path) == [{"id": 1, "status": "done"}, {"id": 2, "status": "cancelled"}]
    assert (log.written, log.errors) == (2, 0)


def test_awkward_text_survives_the_round_trip(tmp_path):
    path = tmp_path / "log.jsonl"
    texts = ["line one\nline two\r\n", 'say "hi" \\ ok', "😀 👍🏽 世界你好", "\ud800 lone surrogate",
             "\u2028\x00"]
    log = RequestLog(str(path))
    for t in texts:
        log.write({"prompt": t, "response": t})
    log.close()
    records = read_records(path)
    assert [r["prompt"] for r in records] == texts
    assert [r["response"] for r in records] == texts


def test_concurrent_writers_produce_whole_lines(tmp_path):
    path = tmp_path / "log.jsonl"
    log = RequestLog(str(path))

    def writer(t: int) -> None:
        for i in range(200):
            log.write({"thread": t, "i": i, "text": f"{t}-{i}\n" * 20})

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    log.close()
    records = read_records(path)
    assert len(records) == 1600
    assert {(r["thread"], r["i"]) for r in records} == {(t, i) for t in range(8) for i in range(200)}
    assert all(r["text"] == f"{r['thread']}-{r['i']}\n" * 20 for r in records)


def test_unwritable_path_counts_errors_and_never_raises(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    log = RequestLog(str(blocker / "logs" / "log.jsonl"))  # mkdir under a file fails, even as root
    for i in range(5):
        assert log.write({"id": i}) is None
    log.close()
    assert (log.errors, log.written) == (5, 0)
    assert blocker.read_text() == "not a folder"


def test_log_file_is_private_to_its_owner(tmp_path):
    path = tmp_path / "log.jsonl"
    log = RequestLog(str(path))
    log.write({"id": 1})
    log.close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_no_path_means_no_log(tmp_path):
    log = RequestLog(None)
    log.write({"id": 1})
    log.close()
    assert (log.written, log.errors) == (0, 0)


def test_utc_timestamp_is_iso8601_utc_with_z():
    ts = utc_timestamp()
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z", ts)
    parsed = datetime.fromisoformat(ts.replace("Z", "+00:00"))
    assert parsed.utcoffset() == timedelta(0)


@given(st.lists(st.integers(min_value=0, max_value=4_102_444_800 * 10 ** 9), min_size=1, max_size=8))
def test_rfc3339_matches_datetimes_formatting_at_any_instants_in_any_order(instants_ns):
    # The formatted second is kept between calls: instants out of order, across second
    # boundaries, must each still get their own.
    for ns in instants_ns:
        at = datetime.fromtimestamp(ns // 10 ** 9, timezone.utc).replace(microsecond=ns // 1000 % 10 ** 6)
        assert rfc3339(ns, "auto") == at.isoformat(timespec="microseconds").replace("+00:00", "Z")
        assert rfc3339(ns) == at.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _written(log: RequestLog, n: int) -> None:
    """Wait for the log's thread to have handled n lines (written or failed)."""
    import time

    deadline = time.monotonic() + 30
    while log.written + log.errors < n:
        assert time.monotonic() < deadline, "the log thread never got to the line"
        time.sleep(0.001)


def test_a_log_whose_folder_is_deleted_is_recreated_not_written_into_the_void(tmp_path):
    """The file stayed open after `rm -rf logs`: every later line went to the deleted
    file, lost, with no error counted or said."""
    import shutil

    path = tmp_path / "logs" / "log.jsonl"
    log = RequestLog(str(path))
    log.write({"id": 1})
    _written(log, 1)
    shutil.rmtree(tmp_path / "logs")
    log.write({"id": 2})
    log.close()
    assert read_records(path) == [{"id": 2}]
    assert (log.written, log.errors) == (2, 0)


def test_a_log_moved_away_is_reopened_at_its_path(tmp_path):
    """logrotate's default (move, then a new file): later lines go to the path again."""
    path = tmp_path / "log.jsonl"
    log = RequestLog(str(path))
    log.write({"id": 1})
    _written(log, 1)
    os.replace(path, tmp_path / "log.jsonl.old")
    log.write({"id": 2})
    log.close()
    assert read_records(tmp_path / "log.jsonl.old") == [{"id": 1}]
    assert read_records(path) == [{"id": 2}]


def test_a_full_disk_costs_no_file_descriptor_per_line(tmp_path):
    """Every failed write left its descriptor open and opened another for the next line:
    on a full disk the server ran out of descriptors (and of connections) request by request."""
    path = tmp_path / "log.jsonl"
    path.symlink_to("/dev/full")  # every write fails with ENOSPC
    log = RequestLog(str(path))
    log.write({"id": 0})
    _written(log, 1)
    before = len(os.listdir("/proc/self/fd"))
    for i in range(1, 51):
        log.write({"id": i})
    _written(log, 51)
    after = len(os.listdir("/proc/self/fd"))
    log.close()
    assert (log.written, log.errors) == (0, 51)
    assert after <= before
