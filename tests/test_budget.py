"""One Budget: one clock, named reserves, stage budgets that never pass the command's end."""

from __future__ import annotations

import pickle
import time

import pytest

from autoft.core.budget import Budget


def test_a_reserve_ends_the_budget_earlier_and_is_named():
    budget = Budget.of(100.0, start=1000.0)
    trials = budget.reserve("refit", 15.0)
    assert trials.end == 1085.0 and trials.reserved == (("refit", 15.0),)
    assert trials.seconds == budget.seconds == 100.0  # the whole length, reserves included
    assert trials.hard_end == budget.hard_end == 1100.0  # the command's end does not move
    assert Budget().reserve("refit", 15.0).end is None  # unbounded stays unbounded


def test_a_stage_ends_at_its_own_time_or_the_budgets_whichever_is_first():
    now = time.monotonic()
    budget = Budget.of(10.0, start=now)
    short = budget.stage(2.0)
    assert short.end == pytest.approx(time.monotonic() + 2.0, abs=0.1) and short.hard_end == budget.end
    assert budget.stage(60.0).end == budget.end  # never past the budget's end
    assert budget.stage(None).end == budget.end
    unbounded = Budget().stage(0.0)
    assert unbounded.end is not None and unbounded.hard_end is None
    assert not unbounded.hard_expired()  # a stage of an unbounded budget may finish its first step


def test_a_passed_hard_end_stops_even_a_stage_that_has_time_of_its_own():
    past = Budget(end=time.monotonic() - 1, hard_end=time.monotonic() - 1)
    assert past.expired() and past.hard_expired() and past.stage(60.0).hard_expired()


def test_slack_extends_the_end_and_the_hard_end():
    budget = Budget.of(100.0, start=1000.0)
    refit = budget.reserve("refit", 20.0).extended(4.0)
    assert refit.end == 1084.0 and refit.hard_end == 1100.0
    assert budget.extended(4.0).hard_end == 1104.0


def test_a_budget_pickles_into_a_worker_on_the_same_clock():
    budget = Budget.of(30.0).reserve("refit", 5.0)
    again = pickle.loads(pickle.dumps(budget))
    assert again == budget and abs(again.left() - budget.left()) < 0.05
