"""The console filter (pipeline/console.py) leaves out a known-harmless Ray line together with
its traceback even when the two arrive in different pieces: a pipe read while Ray is still
writing, or two batches of lines forwarded from one worker. (A traceback that slipped through
that way is how a full disk once printed one after its one-line error.)"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from pipeline.console import UsefulLines, filter_worker_lines

REPO = Path(__file__).resolve().parents[1]
HARMLESS = ('2026-12-07 12:28:19,130\tERROR streaming_executor_state.py:747 -- An exception was raised from a task '
            'of operator "Write". Dataset execution will now abort.')
TRACEBACK = ["Traceback (most recent call last):", '  File "write.py", line 3, in write',
             "    f.write(data)", "", "During handling of the above exception, another exception occurred:", "",
             "ray.exceptions.RayTaskError(OSError): ray::Write() (pid=9568, ip=192.0.2.2)",
             "OSError: [Errno 28] No space left on device"]
ERROR = "error: no space left on the device: free some space and run the same command again"


def test_a_harmless_line_and_its_traceback_are_left_out_and_the_job_s_error_kept():
    assert UsefulLines()(["config: ...", HARMLESS, *TRACEBACK, ERROR]) == ["config: ...", ERROR]


def test_a_traceback_that_comes_in_a_later_piece_is_still_left_out():
    useful = UsefulLines()
    assert useful(["config: ...", HARMLESS]) == ["config: ..."]
    assert useful(TRACEBACK[:3]) == []
    assert useful(TRACEBACK[3:] + [ERROR]) == [ERROR]
    # Once a line that is no part of a traceback came, an indented line is the job's own again.
    assert useful(["  indented, after the error"]) == ["  indented, after the error"]


def test_a_traceback_that_is_not_after_a_harmless_line_is_kept():
    assert UsefulLines()(["config: ...", *TRACEBACK]) == ["config: ...", *TRACEBACK]


def test_the_stderr_filter_leaves_out_a_traceback_written_after_a_pause():
    """A real file descriptor 2 in a child process: Ray's line, a pause long enough for the pump
    to read it alone, then its traceback in a second write, then the job's error."""
    traceback = "\n".join(TRACEBACK) + "\n"
    cut = traceback.index("line 3")  # a read may also end mid-line
    child = textwrap.dedent(f"""
        import os, sys, time
        from pipeline.console import filtered_stderr
        with filtered_stderr():
            for piece in {[HARMLESS + chr(10), traceback[:cut], traceback[cut:]]!r}:
                os.write(2, piece.encode())
                time.sleep(0.5)
            print({ERROR!r}, file=sys.stderr)
    """)
    done = subprocess.run([sys.executable, "-c", child], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ERROR + "\n"


def test_forwarded_worker_lines_keep_one_filter_per_worker(monkeypatch):
    from ray._private import ray_logging
    from ray._private import worker as ray_worker

    printed: list[dict] = []
    dispatcher = ray_logging.WorkerStandardStreamDispatcher()
    dispatcher.add_handler("ray_print_logs", printed.append)
    monkeypatch.setattr(ray_worker, "global_worker_stdstream_dispatcher", dispatcher)
    filter_worker_lines()
    writer = {"ip": "192.0.2.2", "pid": 9568, "is_err": True}
    other = {"ip": "192.0.2.2", "pid": 9570, "is_err": True}
    dispatcher.emit({**writer, "lines": ["(Write) starting", HARMLESS]})
    dispatcher.emit({**other, "lines": ["  another worker's indented line"]})
    dispatcher.emit({**writer, "lines": [*TRACEBACK, "(Write) done"]})
    assert [(d["pid"], d["lines"]) for d in printed] == [
        (9568, ["(Write) starting"]), (9570, ["  another worker's indented line"]), (9568, ["(Write) done"])]


def test_the_stderr_filter_passes_every_line_in_order_and_leaves_no_descriptor_open():
    child = textwrap.dedent("""
        import os
        from pipeline.console import filtered_stderr
        before = sorted(os.listdir("/proc/self/fd"))
        for i in range(20):
            with filtered_stderr():
                os.write(2, f"line {i}\\n".encode())
        print(before == sorted(os.listdir("/proc/self/fd")))
    """)
    done = subprocess.run([sys.executable, "-c", child], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "True\n"
    assert done.stderr == "".join(f"line {i}\n" for i in range(20))
