"""Oracle quality maps and the ground-truth metric: perfect images score 1, broken patches are found."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from patchdpo_fast.minibench.metrics import subject_l1, summarize
from patchdpo_fast.minibench.oracle import auroc as _auroc
from patchdpo_fast.minibench.oracle import map_agreement, oracle_maps
from patchdpo_fast.minibench.world import MiniWorld

PROMPT = "a large object in the snow, in the center"


@pytest.fixture(scope="module")
def world():
    return MiniWorld()


def test_ground_truth_scores_perfectly(world):
    subject = world.subjects[0]
    image = world.render(subject, PROMPT, seed=5).image  # another background draw than the oracle's own
    q_ref, q_gen, _ = oracle_maps(world, subject, PROMPT, image, 8)
    assert q_ref.shape == q_gen.shape == (8, 8)
    assert q_gen.min() > 0.9 and q_ref.min() > 0.9
    assert subject_l1(world, subject.name, world.scene_from_prompt(PROMPT), image) < 1e-6


def test_a_broken_patch_is_found_on_both_sides(world):
    subject = world.subjects[0]
    scene = world.scene_from_prompt(PROMPT)
    image = world.render(subject, scene, seed=5).image.copy()
    alpha = world.render(subject, scene).alpha
    ys, xs = np.nonzero(alpha > 0.99)
    y0, x0 = int(np.median(ys)) // 4 * 4, int(np.median(xs)) // 4 * 4  # a 4x4 cell inside the subject
    image[y0 : y0 + 4, x0 : x0 + 4] = 1.0 - image[y0 : y0 + 4, x0 : x0 + 4]  # wrong colours there
    q_ref, q_gen, _ = oracle_maps(world, subject, scene, image, 8)
    cell = q_gen[y0 // 4, x0 // 4]
    others = torch.cat([q_gen.flatten()[: (y0 // 4) * 8 + x0 // 4], q_gen.flatten()[(y0 // 4) * 8 + x0 // 4 + 1 :]])
    assert cell < 0.5 and cell < others.min()
    assert q_ref.min() < 0.75  # the reference cells that land there were not reproduced
    assert q_ref.flatten().sort().values[-20:].min() > 0.95  # most of the reference is fine
    assert subject_l1(world, subject.name, scene, image) > 0.02


def test_a_missing_subject_scores_low(world):
    subject = world.subjects[3]
    scene = world.scene_from_prompt(PROMPT)
    empty = world.render(subject, scene, seed=1).background
    q_ref, q_gen, _ = oracle_maps(world, subject, scene, empty, 8)
    alpha = torch.nn.functional.avg_pool2d(torch.from_numpy(world.render(subject, scene).alpha)[None, None], 4)[0, 0]
    assert q_gen[alpha > 0.9].max() < 0.5
    assert q_gen[alpha == 0].min() > 0.8  # background patches are fine
    ref_alpha = torch.nn.functional.avg_pool2d(torch.from_numpy(world.render_reference(subject).alpha)[None, None], 4)
    # no part of the subject was reproduced (edges are lenient: a one-pixel shift may put background there)
    assert q_ref[ref_alpha[0, 0] > 0.5].mean() < 0.35
    assert q_ref[ref_alpha[0, 0] == 0].min() == 1.0  # reference background: nothing to fix


def test_summarize_averages_per_subject_first():
    rows = [{"subject": "a", "x": 1.0}, {"subject": "a", "x": 1.0}, {"subject": "a", "x": 1.0},
            {"subject": "b", "x": 0.0}]  # fmt: skip
    assert summarize(rows) == {"x": 0.5}


def test_auroc_matches_pairwise_counting():
    rng = np.random.default_rng(0)
    score, label = rng.normal(size=200).round(1), rng.random(200) < 0.3
    pos, neg = score[label], score[~label]
    brute = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert _auroc(score, label) == pytest.approx(brute)
    assert _auroc(score, np.zeros(200, bool)) is None


def test_map_agreement_tells_background_blindness_from_subject_blindness():
    world = MiniWorld(8, 2, 32, seed=0)
    subject, prompt = world.train_subjects[0], world.scenes[0].prompt
    render = world.render(subject, world.scenes[0])
    cover = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(render.alpha)[None, None], 8)[0, 0].numpy()
    rng = np.random.default_rng(0)
    rows_perfect, rows_background_bad = [], []
    for _ in range(6):
        oracle = np.ones((8, 8), np.float32)
        on_subject = np.argwhere(cover > 0.5)
        broken = on_subject[rng.choice(len(on_subject), size=max(1, len(on_subject) // 3), replace=False)]
        oracle[tuple(broken.T)] = 0.1
        rows_perfect.append((subject.name, prompt, oracle.copy(), oracle))
        blind = np.where(cover < 0.05, 0.0, 0.9).astype(np.float32)  # calls the background bad, sees no defect
        rows_background_bad.append((subject.name, prompt, blind, oracle))
    good = map_agreement(world, rows_perfect, 8)
    bad = map_agreement(world, rows_background_bad, 8)
    assert good["estimator_auroc_on_oracle_bad_patches"] == pytest.approx(1.0)
    assert good["subject_estimator_auroc_on_oracle_bad_patches"] == pytest.approx(1.0)
    assert good["background_oracle_bad_fraction"] == 0.0
    assert bad["subject_estimator_auroc_on_oracle_bad_patches"] == pytest.approx(0.5)
    assert bad["estimator_auroc_on_oracle_bad_patches"] < 0.5
    assert bad["background_estimator_mean_quality"] == 0.0
    assert bad["subject_estimator_mean_quality"] == pytest.approx(0.9)
