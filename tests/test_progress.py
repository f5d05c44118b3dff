"""Progress is a display of work that goes on without it (pipeline/progress.py): a poll that
fails is said once and never ends the job or prints a traceback, and the row tally lives on the
driver's node (tests/test_cluster.py checks that on several raylets)."""

from __future__ import annotations

import threading
import time

import pytest

from pipeline.progress import Poller, Progress, TallyWatch


class Flaky(Poller):
    """Fails its first `failing` ticks, then counts the ones that worked."""

    def __init__(self, failing: int):
        super().__init__(0.01, "flaky")
        self.failing, self.ticks, self.good = failing, 0, 0

    def tick(self) -> None:
        self.ticks += 1
        if self.ticks <= self.failing:
            raise OSError("storage answered 503\nsecond line not shown")
        self.good += 1


def test_a_failing_poll_is_said_once_and_polling_goes_on(capsys):
    poller = Flaky(failing=5)
    with poller:
        deadline = time.monotonic() + 30
        while poller.good < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert poller.failures == 5 and poller.good >= 3
    err = capsys.readouterr().err
    assert err.count("warning:") == 1, err
    assert "flaky display could not be updated (OSError: storage answered 503)" in err
    assert "Traceback" not in err and "second line" not in err
    assert not any(t.name == "flaky" for t in threading.enumerate())


def test_a_failing_last_poll_does_not_replace_the_job_s_own_error(capsys):
    with pytest.raises(KeyError, match="the job's own"):
        with Flaky(failing=10**9):
            raise KeyError("the job's own")
    assert "warning: the flaky display could not be updated" in capsys.readouterr().err


@pytest.mark.ray
def test_a_lost_tally_leaves_the_last_counts_and_one_warning(ray_local, capsys):
    ray = ray_local
    progress = Progress("embed", 10, stream=None, bar=False, interval=3600)
    with TallyWatch(progress, poll=0.05) as watch:
        ray.get(watch.tally.add.remote(4, "node-a"))
        deadline = time.monotonic() + 30
        while watch.by_node != {"node-a": 4} and time.monotonic() < deadline:
            time.sleep(0.05)
        assert watch.by_node == {"node-a": 4}
        node = ray.get(watch.tally.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()))
        assert node == ray.get_runtime_context().get_node_id()
        ray.kill(watch.tally)  # the last read, in finish, then fails
    assert watch.by_node == {"node-a": 4} and progress.done == 4
    captured = capsys.readouterr()
    assert "warning: the progress display could not be updated" in captured.err and "Traceback" not in captured.err
    assert "embed: 4 / 10 rows" in captured.out
