"""The paper's LRP check on simulated ageing tori (seed 002, Fig. 3), as a test.

Three 2D MLens base models are trained briefly on tori that age by border atrophy and by
lesions after 40; their LRP maps, averaged as the paper averages an ensemble's maps, must
concentrate on the lesions, speak for "older" at atrophied and for "younger" at intact borders,
and sum to prediction minus output bias.  About 40 s on one CPU thread.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from bidsapp.explain.torus import (TorusAgeing, simulate_torus, simulate_tori, torus_lrp_metrics,
                                   train_torus_ensemble)


def test_simulated_ageing_is_what_it_says():
    rng = np.random.default_rng(0)
    young = [simulate_torus(25.0, rng) for _ in range(20)]
    old = [simulate_torus(75.0, rng) for _ in range(20)]
    # no lesions before the onset, several at 75 (expected 0.12 * 35 = 4.2 per torus)
    assert not any(s[2].any() for s in young)
    assert np.mean([s[2].any() for s in old]) > 0.9
    # atrophy: the body shrinks with age and the lost pixels are background now
    assert np.mean([s[1].sum() for s in old]) < 0.75 * np.mean([s[1].sum() for s in young])
    for image, torus, lesions, atrophy in old:
        assert np.all(image[atrophy] == 0) and not (atrophy & torus).any()
        assert np.all(lesions <= torus) and np.all(image[lesions] > image[torus & ~lesions].max() - 40)
        assert image.max() <= 255 and np.all(image == np.rint(image))
    none = simulate_torus(75.0, np.random.default_rng(1), ageing=TorusAgeing(lesion_rate=0.0,
                                                                             lesion_sd=0.0))
    assert not none[2].any()


def test_lrp_on_trained_tori(record_property):
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    networks = train_torus_ensemble(simulate_tori(2400, seed=0), n_models=3, epochs=8, seed=0)
    train_seconds = time.perf_counter() - t0
    metrics = torus_lrp_metrics(networks, simulate_tori(200, seed=1))
    metrics["train_seconds"] = train_seconds
    for key, value in metrics.items():
        record_property(key, value)
    print("torus LRP metrics:", {k: round(v, 4) for k, v in metrics.items()})
    # the networks learned the simulated ageing (predicting the mean age gives ~15 y)
    assert metrics["mae"] < 6.0
    # relevance concentrates on the planted lesions
    assert metrics["n_with_lesions"] > 50
    assert metrics["lesion_ratio"] >= 3.0
    # atrophied borders speak for an older age, intact borders for a younger one
    assert metrics["border_signed_old"] > 0 > metrics["border_signed_young"]
    # conservation: every map sums to its prediction minus the output bias (within 1 %)
    assert metrics["conservation_max_rel_error"] <= 0.01
