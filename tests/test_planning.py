"""The pipeline planner: stages balanced by estimated compute, exactly (the same largest stage as trying
every split), in polynomial work."""
import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from percnb import cost
from percnb.config import PerceiverConfig
from percnb.pipeline import balanced_split, module_costs, module_parameter_counts, plan_pipeline, split_with_work


def largest_stage(costs, starts):
    bounds = [*starts, len(costs)]
    return max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:]))


def brute_force(costs, stages):
    """The smallest largest-stage cost over every split (exponential: small cases only)."""
    return min(largest_stage(costs, [0, *cuts]) for cuts in itertools.combinations(range(1, len(costs)), stages - 1))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 50), min_size=1, max_size=9).flatmap(
    lambda costs: st.tuples(st.just(costs), st.integers(1, len(costs)))))
def test_balanced_split_is_optimal(case):
    costs, stages = case
    starts = balanced_split(costs, stages)
    assert len(starts) == stages and starts[0] == 0 and starts == sorted(set(starts)) and starts[-1] < len(costs)
    assert largest_stage(costs, starts) == brute_force(costs, stages)


def test_forty_layers_in_ten_stages_takes_polynomial_work():
    costs = module_costs(PerceiverConfig(num_layers=40))
    starts, work = split_with_work(costs, 10)
    n = len(costs)
    assert work <= 10 * n * n // 2, work                  # about 9,000, where every split is 2e8 candidates
    assert work * 10_000 < math.comb(n - 1, 9)           # trying every split: 4.4e8
    assert largest_stage(costs, starts) <= 2 * sum(costs) / 10   # 43 modules in 10 stages: near even
    print(f"40 layers in 10 stages: {work:,} candidate stages evaluated")


def test_plan_balances_compute_not_parameters():
    # a wide one-query decoder has many parameters but little compute: a parameter cut would give it a stage
    c = PerceiverConfig(input_len=64, latent_len=32, latent_dim=64, output_dim=256, ffw_output=4096, num_layers=6,
                        ffw_latent=128)
    costs = module_costs(c)
    assert costs == cost.module_flops(c, batch=1, train=True)
    plan = plan_pipeline(c, 2)
    assert largest_stage(costs, plan.split_points) == brute_force(costs, 2)
    by_parameters = balanced_split(module_parameter_counts(c), 2)
    assert largest_stage(costs, by_parameters) > 1.2 * largest_stage(costs, plan.split_points)


def test_shared_processors_stay_in_one_stage_by_default():
    plan = plan_pipeline(PerceiverConfig(share_weights=True, num_layers=4), 3)
    holders = {s for s in range(3) for i in plan.stage_indices(s) if 2 <= i < 6}
    assert len(holders) == 1
    with pytest.raises(ValueError, match="at most 4 stages"):
        plan_pipeline(PerceiverConfig(share_weights=True, num_layers=4), 5, n_microbatches=5)


def test_repeated_processors_of_a_converted_model_stay_in_one_stage():
    # hub-shaped: DeepMind's vision models repeat a block of layers (layers_per_block), with narrow q/k
    c = PerceiverConfig(num_layers=6, layers_per_block=3, cross_qk_channels=8, self_qk_channels=8, ffw_cross=8)
    costs = module_costs(c)
    assert costs == cost.module_flops(c, batch=1, train=True) and costs[2] == costs[5]
    plan = plan_pipeline(c, 3)
    holders = {s for s in range(3) for i in plan.stage_indices(s) if 2 <= i < 8}
    assert len(holders) == 1
    with pytest.raises(ValueError, match="layers_per_block=3 keeps the 6 processors in one stage"):
        plan_pipeline(c, 5, n_microbatches=5)


def test_more_stages_than_modules_is_refused():
    with pytest.raises(ValueError, match="num_stages must be in"):
        balanced_split([1, 2], 3)
