"""Where a batch's model run goes: on the loop only once the model is known to run in a blink."""

from service.pipeline.run_place import INLINE_RUN_S, RunPlace


def test_a_model_runs_in_the_pool_until_its_runs_are_known_to_be_short() -> None:
    place, model = RunPlace(), object()
    assert not place.inline(model, 16)  # nothing known yet
    place.observe(model, 16, 0.0006)  # 37.5 us a row
    assert place.inline(model, 16)
    assert not place.inline(model, 64)  # 2.4 ms expected: over the limit
    assert not place.inline(object(), 16)  # another model starts over


def test_a_model_that_slows_down_goes_back_to_the_pool_and_returns_when_fast_again() -> None:
    place, model = RunPlace(), object()
    place.observe(model, 16, 0.0006)
    runs = 0
    while place.inline(model, 16):  # a busier machine: each run takes 10 ms
        place.observe(model, 16, 0.010)
        runs += 1
    assert 1 <= runs <= 3  # smoothed, but not slow to react
    while not place.inline(model, 16):
        place.observe(model, 16, 0.0006)
        runs += 1
    assert runs <= 20


def test_the_limit_is_the_expected_wall_time_of_the_whole_batch() -> None:
    place, model = RunPlace(limit_s=0.001), object()
    place.observe(model, 10, 0.0005)  # 50 us a row
    assert place.inline(model, 19) and not place.inline(model, 20)
    assert RunPlace().limit_s == INLINE_RUN_S
