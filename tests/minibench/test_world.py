"""The mini world: deterministic subjects and scenes, ground truth that matches the images."""

from __future__ import annotations

import numpy as np
import pytest

from patchdpo_fast.minibench.world import ATTRIBUTES, MiniWorld


def test_subjects_are_distinct_deterministic_and_split():
    a, b = MiniWorld(seed=3), MiniWorld(seed=3)
    assert a.subjects == b.subjects
    assert MiniWorld(seed=4).subjects != a.subjects
    assert len({s.attribute_values() for s in a.subjects}) == len(a.subjects)
    assert not set(a.train_subjects) & set(a.heldout_subjects)
    assert len(a.heldout_subjects) == 16 and len(a.train_subjects) == 48
    # held-out subjects are new combinations of attribute values the training subjects use
    for i, attr in enumerate(ATTRIBUTES):
        train_values = {s.attribute_values()[i] for s in a.train_subjects}
        assert {s.attribute_values()[i] for s in a.heldout_subjects} <= train_values, attr


def test_prompts_name_their_scene():
    w = MiniWorld()
    assert len({s.prompt for s in w.scenes}) == len(w.scenes) == 48
    for scene in w.scenes:
        assert w.scene_from_prompt(scene.prompt) == scene
    with pytest.raises(KeyError, match="not a mini-world prompt"):
        w.scene_from_prompt("a dog on the moon")
    evals = w.eval_scenes()
    assert {s.background for s in evals} == {s.background for s in w.scenes}


def test_render_ground_truth_and_determinism():
    w = MiniWorld()
    subject, scene = w.subjects[0], w.scenes[5]
    r1, r2, r3 = w.render(subject, scene, seed=1), w.render(subject, scene, seed=1), w.render(subject, scene, seed=2)
    assert np.array_equal(r1.image, r2.image)
    assert not np.array_equal(r1.image, r3.image)  # another background draw
    inside = r1.alpha > 0.999
    assert inside.sum() > 20
    assert np.allclose(r1.image[inside], r3.image[inside])  # the subject does not depend on the background seed
    assert np.allclose(r1.image[inside], r1.subject_rgb[inside])
    assert r1.image.shape == (32, 32, 3) and r1.image.dtype == np.float32
    assert r1.image.min() >= 0 and r1.image.max() <= 1


def test_placement_follows_the_prompt():
    w = MiniWorld()
    subject = w.subjects[1]
    left = w.render(subject, "a small object in the snow, on the left").alpha
    right = w.render(subject, "a small object in the snow, on the right").alpha
    large = w.render(subject, "a large object in the snow, on the right").alpha
    cols = np.arange(32)
    assert (left.sum(0) * cols).sum() / left.sum() < 12 < 20 < (right.sum(0) * cols).sum() / right.sum()
    assert large.sum() > 1.8 * right.sum()


def test_reference_maps_onto_the_scene():
    w = MiniWorld()
    subject = w.subjects[2]
    scene = w.scene_from_prompt("a large object on a beach, on the left")
    ref, shot = w.render_reference(subject), w.render(subject, scene)
    s, tx, ty = w.reference_to_scene(scene)
    ys, xs = np.nonzero(ref.alpha > 0.5)
    cx_ref, cy_ref = xs.mean() + 0.5, ys.mean() + 0.5
    ys, xs = np.nonzero(shot.alpha > 0.5)
    assert abs(s * cx_ref + tx - (xs.mean() + 0.5)) < 0.5
    assert abs(s * cy_ref + ty - (ys.mean() + 0.5)) < 0.5
    assert np.all(ref.image[ref.alpha == 0] == 1.0)  # clean white background


def test_bad_world_settings():
    with pytest.raises(ValueError, match="num_heldout"):
        MiniWorld(num_subjects=4, num_heldout=4)
    with pytest.raises(ValueError, match="multiple of 8"):
        MiniWorld(resolution=30)


def test_pair_only_subjects_split_the_training_subjects(tmp_path):
    from patchdpo_fast.minibench.report import _split_sentence
    from patchdpo_fast.minibench.runner import Minibench
    from patchdpo_fast.minibench.settings import preset

    settings = preset("smoke")
    n_train = len(Minibench(tmp_path / "same", settings).world.train_subjects)
    settings.world.pair_only_subjects = 2
    bench = Minibench(tmp_path / "split", settings)
    pretrain, pairs = bench.subject_split()
    assert len(pairs) == 2 and len(pretrain) == n_train - 2
    assert not {s.name for s in pretrain} & {s.name for s in pairs}
    assert f"Pre-training on {n_train - 2} training subjects; pairs built on 2 other" in _split_sentence(bench)
    settings.world.pair_only_subjects = n_train
    with pytest.raises(ValueError, match="pair_only_subjects"):
        Minibench(tmp_path / "bad", settings).subject_split()
