"""The model thread's time by stage: every moment belongs to exactly one stage."""

from stageclock import OUTSIDE, StageClock


class FakeTime:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_each_moment_goes_to_the_innermost_open_stage():
    now = FakeTime()
    clock = StageClock(now)
    now.t += 1  # before any stage: other
    with clock.stage("prefill"):
        now.t += 2
        with clock.stage("sampling"):  # pauses prefill
            now.t += 4
        now.t += 8
    now.t += 16
    assert clock.totals() == {OUTSIDE: 17, "prefill": 10, "sampling": 4}


def test_totals_count_the_open_stage_so_far_and_sum_to_the_time_elapsed():
    now = FakeTime()
    clock = StageClock(now)
    with clock.stage("waiting"):
        now.t += 5
        assert clock.totals() == {OUTSIDE: 0, "waiting": 5}  # read while it is open
        now.t += 1
    assert clock.totals()["waiting"] == 6
    now.t += 3
    assert sum(clock.totals().values()) == 9


def test_a_stage_left_by_an_exception_still_ends():
    now = FakeTime()
    clock = StageClock(now)
    try:
        with clock.stage("decode"):
            now.t += 2
            raise RuntimeError("step failed")
    except RuntimeError:
        pass
    now.t += 1
    assert clock.totals() == {OUTSIDE: 1, "decode": 2}
