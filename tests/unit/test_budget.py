"""The training budget's arithmetic: minutes, or dollars turned into time at the cost table's hourly price."""

from __future__ import annotations

import itertools

import pytest

from tasks.lib.config import load_section
from tasks.lib.errors import ConfigError
from tasks.lib.training_runs import CostParams, budget_seconds, cost_usd, hourly_usd
from tasks.train import TrainParams


def cost(*overrides: str) -> CostParams:
    return load_section("cost", CostParams, overrides=list(overrides))


def test_no_budget_is_none():
    assert budget_seconds(minutes=None, usd=None, cost=cost(), accelerators=0) is None


def test_minutes_are_seconds():
    assert budget_seconds(minutes=2.5, usd=None, cost=cost(), accelerators=0) == 150


def test_dollars_buy_the_time_the_machine_and_its_gpus_cost():
    v100 = cost("cost.machine_type=n1-standard-8", "cost.accelerator=nvidia-tesla-v100")
    hourly = 0.38 + 2.48  # params.yaml's prices of the machine and one V100
    assert hourly_usd(v100, 1) == pytest.approx(hourly)
    assert budget_seconds(minutes=None, usd=hourly, cost=v100, accelerators=1) == pytest.approx(3600)
    # two GPUs cost twice the accelerator price: the same dollars buy less time
    assert budget_seconds(minutes=None, usd=1.0, cost=v100, accelerators=2) == pytest.approx(3600 / (0.38 + 2 * 2.48))
    # the arithmetic is cost_usd's, backwards
    seconds = budget_seconds(minutes=None, usd=0.25, cost=v100, accelerators=1)
    assert cost_usd(seconds, v100, 1) == pytest.approx(0.25)


def test_spot_prices_buy_more_time():
    on_demand = cost("cost.machine_type=n1-standard-8", "cost.accelerator=nvidia-tesla-v100")
    spot = cost("cost.machine_type=n1-standard-8-preemptible", "cost.accelerator=nvidia-tesla-v100-preemptible")
    assert budget_seconds(minutes=None, usd=1, cost=spot, accelerators=1) == pytest.approx(3600 / (0.08 + 0.82))
    assert budget_seconds(minutes=None, usd=1, cost=spot, accelerators=1) > 3 * budget_seconds(
        minutes=None, usd=1, cost=on_demand, accelerators=1
    )


def test_the_shorter_budget_wins():
    local = cost()  # $0.067 per hour
    assert budget_seconds(minutes=1, usd=1.0, cost=local, accelerators=0) == 60
    assert budget_seconds(minutes=600, usd=0.067, cost=local, accelerators=0) == pytest.approx(3600)


def test_a_free_machine_makes_a_dollar_budget_unlimited():
    free = cost("cost.machine_usd_per_hour.local=0.0")
    assert budget_seconds(minutes=None, usd=1.0, cost=free, accelerators=0) is None
    assert budget_seconds(minutes=3, usd=1.0, cost=free, accelerators=0) == 180


@pytest.mark.parametrize("key", ["budget_minutes", "budget_usd"])
@pytest.mark.parametrize("value", ["0", "-1"])
def test_a_budget_must_be_positive(key, value):
    with pytest.raises(ConfigError, match=rf"train\.{key}: Input should be greater than 0"):
        load_section("train", TrainParams, overrides=[f"train.{key}={value}"])
    assert getattr(load_section("train", TrainParams), key) is None  # params.yaml: no budget


def test_the_cosine_schedule_warms_up_then_anneals_to_the_floor_at_the_last_planned_epoch():
    from tasks.train import cosine_rate

    rates = [cosine_rate(e, 6, peak=1e-3, floor=1e-6, warmup=1) for e in range(8)]
    assert rates[0] == pytest.approx(5e-4)  # warm-up: half way to the peak
    assert rates[1] == pytest.approx(1e-3)  # the peak, then down
    assert all(a > b for a, b in itertools.pairwise(rates[1:6]))
    assert rates[3] == pytest.approx((1e-3 + 1e-6) / 2)  # the cosine's midpoint, half way from epoch 1 to epoch 5
    assert rates[5] == rates[6] == rates[7] == pytest.approx(1e-6)  # floor at the last planned epoch and after


def test_a_budget_plans_as_many_epochs_as_it_leaves_time_for_rounding_up():
    from tasks.train import planned_epochs

    assert planned_epochs(50, done=0, seconds=5, budget=None, epoch_seconds=10) == 50
    assert planned_epochs(50, done=0, seconds=5, budget=240, epoch_seconds=0) == 50  # no pace yet
    # 2 epochs done in 65 s at 30 s each: 175 s left is 5.8 epochs, and the 6th still finishes once started
    assert planned_epochs(50, done=2, seconds=65, budget=240, epoch_seconds=30) == 8
    assert planned_epochs(5, done=2, seconds=65, budget=240, epoch_seconds=30) == 5  # the epoch count is the cap
    assert planned_epochs(50, done=3, seconds=250, budget=240, epoch_seconds=30) == 4  # over: the epoch in progress
