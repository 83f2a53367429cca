"""Issue 28 items 2, 4 and 7 on the explorer's API: bounds checked before a request may hold the model, text
that is not valid Unicode refused naming the field, factors and learning rates checked where every caller goes
through, and a NaN distribution never reported as a change."""

from __future__ import annotations

import json

import pytest
import torch
from fastapi.testclient import TestClient
from helpers import tiny

from kvedit.analysis.inspect import Intervention, check_distribution
from kvedit.cli import main
from kvedit.editing.registry import make_settings
from kvedit.explore import ExploreSession, ExploreSettings, create_app
from kvedit.explore.limits import Limits

PROMPT = "the eiffel tower is located in the city of"
EDIT = {
    "prompt": PROMPT,
    "subject": "the eiffel tower",
    "target_new": "rome",
    "target_true": "paris",
    "method": "ft-keys",
    "layers": [1],
    "lr": 0.01,
    "max_steps": 4,
}


@pytest.fixture
def api(tmp_path, monkeypatch, kvedit_cache):
    """A page client (the page's Origin and token) over a tiny model, and its session."""
    session = ExploreSession(
        tiny("llama"),
        ExploreSettings(mine_tokens=200, prefetch_values=False, limits=Limits(prompt_chars=2000, prompt_tokens=40)),
    )
    app = create_app(session)
    client = TestClient(app, headers={"Origin": "http://testserver", "X-Kvedit-Token": app.state.token})
    yield client, session
    session.close()


def refused(client, path, body, *messages):
    """POST `body` as JSON text the way curl would send it (\\ud800 escapes, Infinity and NaN as Python writes
    them) and check the 400 and its message."""
    r = client.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"})
    assert r.status_code == 400, (r.status_code, r.text)
    for message in messages:
        assert message in r.json()["error"], r.json()
    return r.json()["error"]


def test_mining_tokens_are_bounded(api):
    client, session = api
    refused(client, "/api/mine", {"layer": 1, "tokens": 0}, "tokens must be a whole number from 1 to 1000000, got 0")
    refused(client, "/api/mine", {"layer": 1, "tokens": -5}, "got -5")
    refused(client, "/api/mine", {"layer": 1, "tokens": 10**9}, "from 1 to 1000000")
    assert session.jobs.jobs == {}  # nothing started
    with pytest.raises(ValueError, match="mine_tokens must be at most"):
        ExploreSettings(mine_tokens=2_000_000)


def test_edit_settings_are_bounded_before_anything_runs(api):
    client, session = api
    refused(client, "/api/edits", EDIT | {"max_steps": 10**9}, "max_steps must be a whole number from 1 to 1000")
    refused(client, "/api/edits", EDIT | {"lr": float("inf")}, "lr must be a finite number > 0, got inf")
    refused(client, "/api/edits", EDIT | {"lr": float("nan")}, "lr must be a finite number > 0")
    refused(client, "/api/edits", EDIT | {"lr": 0}, "lr must be a finite number > 0")
    refused(
        client,
        "/api/edits",
        EDIT | {"paraphrases": ["the eiffel tower is in"] * 21},
        "21 paraphrases given; at most 20",
    )
    refused(
        client, "/api/edits", EDIT | {"neighbours": ["berlin is in"] * 21}, "21 neighbourhood prompts given; at most 20"
    )
    refused(client, "/api/edits", EDIT | {"layers": [0, 1, 2, 3, 0]}, "5 layers given; at most 4")
    assert session.jobs.jobs == {} and session.edits.entries == []


def test_prompt_length_is_checked_in_characters_and_tokens(api):
    client, session = api
    long_chars = "paris " * 10_000
    for path, body in [
        ("/api/prompt", {"prompt": long_chars}),
        ("/api/memory", {"layer": 1, "key": 1, "prompt": long_chars}),
        ("/api/intervene", {"prompt": long_chars, "interventions": [{"layer": 1, "key": 1}]}),
        ("/api/edits", EDIT | {"prompt": "the eiffel tower " + long_chars}),
    ]:
        refused(client, path, body, "the prompt is", "at most 2000 are accepted")
    refused(client, "/api/prompt", {"prompt": "paris " * 50}, "the prompt is 5", "tokens long; at most 40")
    refused(client, "/api/edits", EDIT | {"neighbours": ["paris " * 50]}, "neighbourhood prompt 1 is", "at most 40")
    # the model's context caps it too (the tiny model reads 64 positions)
    wide = ExploreSession(session.lm, ExploreSettings(prefetch_values=False, limits=Limits(prompt_tokens=10_000)))
    with pytest.raises(ValueError, match=r"at most 64 are accepted \(tiny-llama's context\)"):
        wide.prompt("paris " * 100)
    wide.close()


@pytest.mark.parametrize(
    "path, body, field",
    [
        ("/api/prompt", {"prompt": "abc \ud800"}, "the prompt holds"),
        ("/api/prompt", {"prompt": PROMPT, "watch": "a\udc00"}, "the followed token holds"),
        ("/api/memory", {"layer": 1, "key": 2, "prompt": "abc \ud800"}, "the prompt holds"),
        ("/api/intervene", {"prompt": "abc \ud800", "interventions": [{"layer": 1, "key": 1}]}, "the prompt holds"),
        ("/api/edits", EDIT | {"neighbours": ["berlin \ud800 is in"]}, "the neighbourhood prompt 1 holds"),
        ("/api/edits", EDIT | {"paraphrases": ["the eiffel tower is in", "x \udfff"]}, "the paraphrase 2 holds"),
        ("/api/edits", EDIT | {"target_new": "ro\ud800me"}, "the new object holds"),
    ],
)
def test_a_lone_surrogate_is_a_400_naming_the_field(api, path, body, field):
    client, session = api
    refused(client, path, body, field, "not valid Unicode")
    assert session.jobs.jobs == {}


def test_factors_are_checked_where_every_caller_goes_through(api, capsys):
    client, _ = api
    refused(
        client,
        "/api/intervene",
        {"prompt": PROMPT, "interventions": [{"layer": 1, "key": 3, "factor": 1e308}]},
        "the factor of memory 1:3 is 1e+308; expected a factor between -10000 and 10000",
    )
    refused(
        client,
        "/api/intervene",
        {"prompt": PROMPT, "interventions": [{"layer": 1, "key": 3, "factor": float("nan")}]},
        "must be a finite number",
    )
    for factor in (float("inf"), float("nan"), -1e5):
        with pytest.raises(ValueError, match="factor of memory 2:5"):
            Intervention(2, 5, factor)
    assert main(["inspect", "--scale", "1:2=1e308", "--model", "no-such-model-is-loaded", PROMPT]) == 2
    assert "expected a factor between" in capsys.readouterr().err


def test_a_nan_distribution_is_never_reported_as_a_change():
    probs = torch.softmax(torch.tensor([1.0, 2.0, float("nan")]), -1)
    with pytest.raises(ValueError, match="made the model's output NaN/Inf"):
        check_distribution(probs, [Intervention(1, 2, 3.0)])
    fine = torch.softmax(torch.tensor([1.0, 2.0]), -1)
    assert check_distribution(fine, []) is fine


@pytest.mark.parametrize("method", ["ft-keys", "rome", "memit"])
@pytest.mark.parametrize("setting", ["lr", "weight_decay"])
def test_settings_are_finite_in_the_shared_validation(method, setting):
    if setting == "weight_decay" or method.startswith("ft"):
        overrides = {setting: float("inf")}
    else:
        overrides = {setting: float("inf"), "layers": (1,)}
    with pytest.raises(ValueError, match=f"{setting} must be a finite number, got inf"):
        make_settings(None, method, **overrides)


def test_a_follow_token_that_is_not_one_token_does_not_block_the_analysis(api):
    """Issue 34: a follow token of two tokens is followed by its first token, and the answer says so; one the
    tokenizer does not know switches the follow column off, saying why; the analysis runs in both cases."""
    client, _ = api
    r = client.post("/api/prompt", json={"prompt": PROMPT, "watch": "tower is"})
    assert r.status_code == 200, r.json()
    data = r.json()
    assert data["watch"]["token"] == "tower" and data["layers"][0]["watch"]["token"] == "tower"
    assert "is 2 tokens" in data["watch_note"] and "following its first token 'tower'" in data["watch_note"]
    r = client.post("/api/prompt", json={"prompt": PROMPT, "watch": "qqq"})
    assert r.status_code == 200 and "watch" not in r.json() and "follow column is off" in r.json()["watch_note"]
    r = client.post(
        "/api/intervene",
        json={"prompt": PROMPT, "watch": "tower is", "interventions": [{"layer": 1, "key": 3, "factor": 0}]},
    )
    assert r.status_code == 200 and "following its first token" in r.json()["watch_note"]
