"""Training signals: divergence (far above the start, or pinned at a uniform guess) and overfitting."""

import math

import pytest

from lorakit.train.watch import DivergenceWatch

VOCAB = 49152
UNIFORM = math.log(VOCAB)


def run(watch, losses):
    return [watch.update(step, loss) for step, loss in enumerate(losses, start=1)]


def test_pinned_at_uniform_after_a_pretrained_start_is_flagged_on_the_third_step():
    watch = DivergenceWatch(VOCAB)
    messages = run(watch, [2.1, UNIFORM, UNIFORM + 0.01, UNIFORM - 0.02, UNIFORM])
    assert messages[:3] == [None, None, None]
    assert messages[3] is not None and "pinned at ln(vocab) = 10.8027" in messages[3]
    assert "for 3 steps" in messages[3] and "since step 2" in messages[3]
    assert watch.diverged_at == 4 and "for 4 steps" in messages[4]


def test_far_above_the_start_is_flagged():
    watch = DivergenceWatch(VOCAB)
    messages = run(watch, [2.0, 2.5, 3.5, 4.0, 5.0])
    assert messages[:4] == [None] * 4 and "far above the run's start (2.0000)" in messages[4]
    assert watch.diverged_at == 5


@pytest.mark.parametrize("losses", [
    [UNIFORM, UNIFORM - 0.01, UNIFORM - 0.02, UNIFORM - 0.05, UNIFORM - 0.2],  # a random-init model learning
    [2.0, 2.6, 2.4, 2.9, 1.8, 2.2, 1.5],  # a noisy but healthy run (never 3 bad steps in a row)
    [0.5, 1.4, 1.45, 1.3, 0.4],  # +0.9 is under the 1.0 margin above a small start
])
def test_healthy_runs_are_not_flagged(losses):
    watch = DivergenceWatch(VOCAB)
    assert run(watch, losses) == [None] * len(losses) and watch.diverged_at is None


def test_a_bad_step_breaks_the_streak_and_a_resumed_run_keeps_its_start():
    watch = DivergenceWatch(VOCAB)
    assert run(watch, [2.0, 9.0, 9.0, 2.1, 9.0, 9.0]) == [None] * 6
    resumed = DivergenceWatch(VOCAB, start=2.0)
    assert run(resumed, [9.0, 9.0, 9.0])[2] is not None
