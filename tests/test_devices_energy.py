"""Energy: trapezoid integration and the counter-or-integration decision, on hand-computed values."""

import pytest

from kaio.devices.energy import EnergyTracker, PowerIntegrator, counter_agrees, trapezoid_energy_j


def test_trapezoid_uneven_spacing():
    # 0.5 s at (10+20)/2 W, then 1.5 s at (20+40)/2 W: 7.5 J + 45 J
    assert trapezoid_energy_j([0.0, 0.5, 2.0], [10.0, 20.0, 40.0]) == pytest.approx(52.5)


def test_trapezoid_bridges_none_gaps():
    # The None reading is skipped: (0,100)-(1,200) gives 150 J, (1,200)-(4,300) gives 750 J.
    assert trapezoid_energy_j([0.0, 1.0, 3.0, 4.0], [100.0, 200.0, None, 300.0]) == pytest.approx(900.0)
    # Leading and trailing gaps contribute nothing: only (2,50)-(3,70) counts.
    assert trapezoid_energy_j([0.0, 2.0, 3.0, 5.0], [None, 50.0, 70.0, None]) == pytest.approx(60.0)


def test_trapezoid_degenerate_inputs():
    assert trapezoid_energy_j([], []) is None
    assert trapezoid_energy_j([1.0, 2.0], [None, None]) is None  # unknown, not zero
    assert trapezoid_energy_j([1.0], [250.0]) == 0.0
    assert trapezoid_energy_j([1.0, 1.0], [250.0, 250.0]) == 0.0  # no time elapsed
    with pytest.raises(ValueError):
        trapezoid_energy_j([0.0, 1.0], [1.0])


def test_power_integrator_matches_batch_function():
    integrator = PowerIntegrator()
    totals = [integrator.add(t, p) for t, p in [(0.0, 100.0), (0.25, None), (0.5, 300.0), (1.5, 300.0)]]
    assert totals == [0.0, 0.0, pytest.approx(100.0), pytest.approx(400.0)]


def test_counter_agreement_is_loose_but_not_blind():
    assert counter_agrees(100.0, 100.0)
    assert counter_agrees(30.0, 100.0)  # a windowed average lags: factor 3 is still plausible
    assert not counter_agrees(5.0, 100.0)
    assert not counter_agrees(2000.0, 100.0)
    assert not counter_agrees(10.0, 0.0)


def _feed(tracker, readings):
    return [tracker.update(t, p, c) for t, p, c in readings]


def test_good_counter_is_used_after_the_check_window():
    tracker = EnergyTracker(check_window_s=2.0)
    # 200 W steady; the counter (J) rises 200 J/s from an arbitrary origin, plus a 5 % calibration offset.
    readings = [(t * 0.5, 200.0, 1e6 + 210.0 * t * 0.5) for t in range(7)]
    results = _feed(tracker, readings)
    assert results[0] == (0.0, "integrated")  # checking: integral of a single reading
    assert results[3] == (pytest.approx(300.0), "integrated")  # 1.5 s, still checking
    assert results[4] == (pytest.approx(420.0), "counter")  # 2.0 s: 210 J/s * 2 s from the counter
    assert results[6] == (pytest.approx(630.0), "counter")
    assert tracker.fallback_reason is None


def test_stuck_counter_falls_back_to_integration():
    tracker = EnergyTracker(check_window_s=2.0)
    results = _feed(tracker, [(t * 0.5, 300.0, 5000.0) for t in range(6)])
    assert results[-1] == (pytest.approx(750.0), "integrated")  # 300 W * 2.5 s
    assert "stood still" in tracker.fallback_reason


def test_counter_that_disagrees_wildly_falls_back():
    tracker = EnergyTracker(check_window_s=1.0)
    # 100 W for 1 s is 100 J; the counter claims 5000 J.
    results = _feed(tracker, [(0.0, 100.0, 0.0), (0.5, 100.0, 2500.0), (1.0, 100.0, 5000.0), (1.5, 100.0, 7500.0)])
    assert results[-1] == (pytest.approx(150.0), "integrated")
    assert "disagreed" in tracker.fallback_reason


def test_counter_going_backwards_mid_run_keeps_energy_so_far():
    tracker = EnergyTracker(check_window_s=1.0)
    readings = [(0.0, 100.0, 50.0), (0.5, 100.0, 100.0), (1.0, 100.0, 150.0), (1.5, 100.0, 200.0)]
    assert _feed(tracker, readings)[-1] == (pytest.approx(150.0), "counter")
    # The counter wraps: the 150 J counted so far stay, then power is integrated from 1.5 s on.
    after = _feed(tracker, [(2.0, 100.0, 3.0), (2.5, 200.0, 53.0)])
    assert after[0] == (pytest.approx(150.0 + 50.0), "integrated")
    assert after[1] == (pytest.approx(150.0 + 50.0 + 75.0), "integrated")
    assert "backwards" in tracker.fallback_reason


def test_without_power_a_moving_counter_is_trusted_unverified():
    tracker = EnergyTracker(check_window_s=1.0)
    results = _feed(tracker, [(0.0, None, 10.0), (0.6, None, 70.0), (1.2, None, 130.0)])
    assert results[0] == (None, None)
    assert results[-1] == (pytest.approx(120.0), "counter")
    assert tracker.counter_unverified


def test_without_counter_power_is_integrated_and_without_both_nothing_is_claimed():
    powered = EnergyTracker()
    assert _feed(powered, [(0.0, 50.0, None), (2.0, 150.0, None)])[-1] == (pytest.approx(200.0), "integrated")
    blind = EnergyTracker()
    assert _feed(blind, [(0.0, None, None), (1.0, None, None)]) == [(None, None), (None, None)]


def test_idle_gpu_keeps_checking_instead_of_judging_the_counter():
    tracker = EnergyTracker(check_window_s=1.0)
    # 0.5 W for 1.5 s is below the 1 J needed for a meaningful comparison.
    results = _feed(tracker, [(0.0, 0.5, 7.0), (1.0, 0.5, 7.0), (1.5, 0.5, 7.0)])
    assert results[-1] == (pytest.approx(0.75), "integrated")
    assert tracker.fallback_reason is None


def test_counter_stuck_mid_run_counts_the_stuck_period_by_integration():
    tracker = EnergyTracker(check_window_s=1.0)
    readings = [(0.0, 100.0, 0.0), (0.5, 100.0, 50.0), (1.0, 100.0, 100.0)]
    assert _feed(tracker, readings)[-1] == (pytest.approx(100.0), "counter")
    # Frozen from 1.0 s while 100 W is drawn; declared stuck at 3.0 s. The counter's 100 J stand,
    # and the 2 s since it last moved are integrated: 100 + 200 J.
    after = _feed(tracker, [(2.0, 100.0, 100.0), (3.0, 100.0, 100.0)])
    assert after[0] == (pytest.approx(100.0), "counter")
    assert after[1] == (pytest.approx(300.0), "integrated")
    assert "stood still" in tracker.fallback_reason


def test_counter_that_stops_answering_is_replaced_by_integration():
    tracker = EnergyTracker(check_window_s=1.0)
    assert _feed(tracker, [(0.0, 100.0, 0.0), (1.0, 100.0, 100.0)])[-1] == (pytest.approx(100.0), "counter")
    # Unreadable for 10 s: the counter's figure stands meanwhile, then integration takes over from 1 s on.
    assert _feed(tracker, [(6.0, 100.0, None)])[-1] == (pytest.approx(100.0), "counter")
    assert _feed(tracker, [(11.5, 100.0, None)])[-1] == (pytest.approx(100.0 + 1050.0), "integrated")
    assert "could not be read" in tracker.fallback_reason
