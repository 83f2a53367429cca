"""Edit request validation: each bad input is a clear error naming what is wrong."""

import pytest

from kvedit import EditRequest, RequestError


def make(**kw):
    base = dict(prompt="{} is located in the city of", subject="Eiffel Tower", target_new="Rome", target_true="Paris")
    return EditRequest(**(base | kw))


def test_valid_request_fills_the_template():
    r = make(paraphrase_prompts="The Eiffel Tower stands in")
    assert r.rewrite_prompt == "Eiffel Tower is located in the city of"
    assert r.paraphrase_prompts == ("The Eiffel Tower stands in",)
    assert EditRequest.from_dict(r.to_dict()) == r


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(prompt="Eiffel Tower is located in the city of"), r"exactly one '\{\}'"),
        (dict(prompt="{} and {} are in"), r"exactly one '\{\}'"),
        (dict(subject="  "), "subject is empty"),
        (dict(target_new=""), "target_new is empty"),
        (dict(target_true=" "), "target_true is empty"),
        (dict(target_new="Paris"), "target_new equals target_true"),
        (dict(prompt="{}, a tower in Paris, is located in the city of"), "already contains target_true 'Paris'"),
        (dict(prompt="{} is in Rome, the city of"), "already contains target_new 'Rome'"),
    ],
)
def test_invalid_requests_raise_clear_errors(change, message):
    with pytest.raises(RequestError, match=message):
        make(**change)


def test_target_inside_subject_is_allowed():
    """CounterFact has subjects that contain the true object (Toyota Camry -> Toyota)."""
    r = EditRequest("{} is produced by", "Toyota Camry", target_new="Honda", target_true="Toyota")
    assert r.rewrite_prompt == "Toyota Camry is produced by"


def test_target_as_part_of_a_word_is_not_containment():
    r = make(prompt="{} is a Parisian landmark in the city of")  # "Parisian" is not "Paris"
    assert r.rewrite_prompt == "Eiffel Tower is a Parisian landmark in the city of"
    with pytest.raises(RequestError, match="Paris"):
        make(prompt="{} is a landmark of Paris in the city of")  # the answer itself is in the prompt


def test_unknown_fields_are_named():
    with pytest.raises(RequestError, match="unknown request field"):
        EditRequest.from_dict({"prompt": "{} is in", "subject": "X", "target_new": "Y", "colour": "red"})


@pytest.mark.parametrize("field", ["prompt", "subject", "target_new", "target_true"])
def test_a_lone_surrogate_is_refused_naming_the_field(field):
    value = {"prompt": "{} is located in \ud800 the city of"}.get(field, "abc \ud800")
    with pytest.raises(RequestError, match=f"{field} holds a character that is not valid Unicode"):
        make(**{field: value})


@pytest.mark.parametrize("field", ["paraphrase_prompts", "neighborhood_prompts", "generation_prompts"])
def test_a_lone_surrogate_in_a_prompt_list_names_the_item(field):
    with pytest.raises(RequestError, match=rf"{field}\[1\] holds a character that is not valid Unicode"):
        make(**{field: ("fine", "abc \udfff")})


def test_check_text():
    from kvedit.data.requests import check_text

    assert check_text("Paris ☃", "x") == "Paris ☃"
    for bad, message in [(3, "x must be text"), ("a\x00b", "NUL"), ("abcd", "at most 3")]:
        with pytest.raises(RequestError, match=message):
            check_text(bad, "x", max_chars=3)
