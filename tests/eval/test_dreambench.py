"""The DreamBench protocol file, prompt file names, reference selection and the layout checker."""

from __future__ import annotations

from pathlib import Path

import pytest

from patchdpo_fast.eval.dreambench import (
    KOSMOS_G_REFERENCE,
    LayoutError,
    check_layout,
    find_prompts_file,
    image_path,
    parse_prompts_file,
    parse_subject_list,
    prompt_slug,
    reference_images,
    render_prompt,
    selected_reference,
)

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data" / "dreambench256" / "prompts_and_classes.txt"


def test_protocol_file(protocol, mini) -> None:
    assert len(protocol.subjects) == 30 and set(protocol.subject_names) == set(KOSMOS_G_REFERENCE)
    assert len(protocol.object_templates) == len(protocol.live_templates) == 25
    live = sorted(s.name for s in protocol.subjects if s.live)
    assert live == ["cat", "cat2", "dog", "dog2", "dog3", "dog5", "dog6", "dog7", "dog8"]
    assert protocol.subject("bear_plushie").class_name == "stuffed animal"

    items = protocol.items()
    assert len(items) == 750 and len({(i.subject, i.file_name) for i in items}) == 750
    # the file name of every DreamBench prompt is the prompt itself (the official layout)
    assert all(prompt_slug(i.prompt) == i.prompt for i in items)
    assert protocol.prompts("backpack", limit=2) == ["a backpack in the jungle", "a backpack in the snow"]
    assert protocol.prompts("dog")[10] == "a dog wearing a red hat"  # live-subject list
    assert protocol.prompts("teapot")[10] == "a teapot with a wheat field in the background"  # object list
    assert protocol.prompts("dog", unique_token="sks")[0] == "a sks dog in the jungle"
    assert image_path("out", "dog", "a dog in the snow") == Path("out/dog/a dog in the snow.png")
    assert find_prompts_file(mini) == mini / "prompts_and_classes.txt"
    if SHARED.is_file():  # the copy in the test assets is the dataset's file
        assert parse_prompts_file(SHARED).items() == items


def test_prompt_slug_and_rendering() -> None:
    assert render_prompt("a {0} {1} in the snow", "dog") == "a dog in the snow"
    assert render_prompt("a {0} {1}", "stuffed animal", "sks") == "a sks stuffed animal"
    eiffel = "a dog with the Eiffel Tower in the background"
    assert prompt_slug(eiffel) == eiffel
    assert prompt_slug("  a   red/blue dog?  ") == "a red_blue dog_"
    assert prompt_slug("a caf\u00e9 \u2014 dog.") == "a caf_ _ dog"
    assert prompt_slug("x" * 300) == "x" * 200
    with pytest.raises(ValueError, match="empty"):
        prompt_slug(" ... ")
    assert parse_subject_list(["dog,backpack", "cat dog"]) == ["dog", "backpack", "cat"]
    assert parse_subject_list(None) is None


def test_protocol_errors(protocol, tmp_path) -> None:
    with pytest.raises(KeyError, match="nope"):
        protocol.items(["dog", "nope"])
    bad = tmp_path / "prompts.txt"
    bad.write_text("Classes\n\nsubject_name,class\ndog,dog\n\nPrompts\n\nObject Prompts\n\nprompt_list = [\n]\n")
    with pytest.raises(ValueError, match="Object Prompts"):
        parse_prompts_file(bad)
    with pytest.raises(FileNotFoundError, match=r"missing\.txt"):
        parse_prompts_file(tmp_path / "missing.txt")
    with pytest.raises(FileNotFoundError, match="--prompts-file"):
        find_prompts_file(tmp_path / "empty")


def test_reference_selection(mini, references_copy) -> None:
    assert [p.name for p in reference_images(mini, "dog")] == ["00.jpg", "01.jpg", "02.jpg"]
    assert selected_reference(mini, "dog") == mini / "dog" / "02.jpg"  # Kosmos-G's photo of 'dog'
    (references_copy / "dog" / "02.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="'02'"):
        selected_reference(references_copy, "dog")
    with pytest.raises(FileNotFoundError, match="cat"):
        reference_images(mini, "cat")


def test_layout_checker_lists_what_is_missing(protocol, tmp_path, write_layout, photos) -> None:
    root = write_layout(tmp_path / "gen", protocol, {"backpack": photos("backpack"), "dog": photos("dog")})
    report = check_layout(root, protocol, ["backpack", "dog"], 2)
    assert report.ok and len(report.paths) == 4 and all(p.is_file() for p in report.paths)
    assert list(report.by_subject()) == ["backpack", "dog"]

    (root / "dog" / "a dog in the snow.png").unlink()
    (root / "backpack" / "stray.png").write_bytes(b"x")
    with pytest.raises(LayoutError) as info:
        check_layout(root, protocol, ["backpack", "dog", "cat"], 2)
    err = info.value
    assert err.missing_subjects == ["cat"]
    assert err.missing_images == [("dog", "a dog in the snow.png")]
    message = str(err)
    assert "missing subjects (1): cat" in message
    assert "missing images (1):" in message and "dog/: 'a dog in the snow.png'" in message

    # the full protocol: 28 subject folders absent, and 23 prompts each of the two present ones (+1 deleted)
    report = check_layout(root, protocol, raise_on_missing=False)
    assert len(report.missing_subjects) == 28 and "backpack" not in report.missing_subjects
    assert len(report.missing_images) == 23 + 24
    assert report.unexpected_files == ["backpack/stray.png"]
    assert "missing subjects (28): backpack_dog, bear_plushie" in report.message()
