"""The explorer's HTTP API on tiny models: every endpoint, bad input changing nothing, edits reverted bit-exactly,
reverting one edit among several, busy handling, and the `kvedit explore` command's checks."""

from __future__ import annotations

import socket
import threading

import pytest
import torch
from fastapi.testclient import TestClient
from helpers import same, snapshot, tiny

from kvedit.analysis.inspect import inspect_prompt
from kvedit.analysis.triggers import mine_triggers
from kvedit.analysis.vocab import project, token_strings
from kvedit.cli import main
from kvedit.cli.explore import bind_socket, is_loopback
from kvedit.editing.delta import WeightDelta
from kvedit.explore import ExploreSession, ExploreSettings, create_app
from kvedit.explore.api import jsonable
from kvedit.explore.value_cache import ValueTokenCache
from kvedit.explore.views import Vocabulary, prompt_view
from kvedit.models import ffn_memory

PROMPT = "the eiffel tower is located in the city of"
TEXT = (
    "the eiffel tower is located in the city of paris. the colosseum is located in the city of rome. "
    "berlin is the capital of germany. the louvre is a famous landmark in paris. "
    "french is the language spoken in france. big ben stands in london."
)
FAST = {"lr": 0.01, "max_steps": 4}  # a few steps: the tests check bookkeeping, not edit quality
#: the statistics corpus (the `corpus` fixture in conftest writes it)
CORPUS_TEXT = "\n\n".join(TEXT for _ in range(20))


def page_client(app, base_url: str = "http://testserver") -> TestClient:
    """A client that sends what the explorer's own page sends: its Origin and the server's token."""
    return TestClient(app, base_url=base_url, headers={"Origin": base_url, "X-Kvedit-Token": app.state.token})


def edit_body(**kw):
    body = {
        "prompt": PROMPT,
        "subject": "the eiffel tower",
        "target_new": "rome",
        "target_true": "paris",
        "method": "ft-keys",
        "layers": [1],
        **FAST,
    }
    return body | kw


@pytest.fixture
def app(corpus):
    lm = tiny("llama")
    session = ExploreSession(lm, ExploreSettings(corpus=corpus, mine_tokens=300, mine_k=5))
    with page_client(create_app(session)) as client:
        yield client, session
    session.close()


def run_job(client, session, response, expect="done"):
    assert response.status_code == 202, response.json()
    job = session.jobs.wait(response.json()["id"], timeout=300)
    polled = client.get(f"/api/jobs/{job.id}").json()
    assert polled["state"] == expect, polled
    return polled


# ---- the prompt view is inspect_prompt's analysis --------------------------------------------------------
def assert_same_as_inspect(ours, ref):
    assert ours["tokens"] == ref["tokens"]
    assert [e["token"] for e in ours["next_token"]][: len(ref["next_token"])] == [e["token"] for e in ref["next_token"]]
    for a, b in zip(ours["layers"], ref["layers"], strict=True):
        assert [m["key"] for m in a["memories"]] == [m["key"] for m in b["memories"]]
        assert [m["value_tokens"] for m in a["memories"]] == [m["value_tokens"] for m in b["memories"]]
        assert [m["coefficient"] for m in a["memories"]] == pytest.approx(
            [m["coefficient"] for m in b["memories"]], rel=1e-5
        )
        assert [e["token"] for e in a["lens"]] == [e["token"] for e in b["lens"]]
        assert [e["prob"] for e in a["lens"]] == pytest.approx([e["prob"] for e in b["lens"]], rel=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3_text"])
@pytest.mark.parametrize("cached", [False, True])
def test_prompt_view_equals_inspect_prompt(family, cached):
    """The same memories, coefficients, value tokens and logit lens as `kvedit inspect`, with the value tokens
    projected on demand or read from the per-layer projections the session fills in the background."""
    lm = tiny(family)
    vocab = Vocabulary(token_strings(lm))
    cache = ValueTokenCache(lm, 4)
    if cached:
        cache.fill_now()
        assert cache.ready == lm.num_layers
    ours = prompt_view(lm, vocab, PROMPT, top_memories=6, top_tokens=4, next_tokens=4, cached=cache.get)
    assert_same_as_inspect(ours, inspect_prompt(lm, PROMPT, top_memories=6, top_tokens=4))


def test_value_cache_follows_the_weights(corpus):
    """A values edit drops its layer's cached projections (a keys edit none); the prompt view stays equal to
    inspect_prompt on the edited model, and again after the revert."""
    lm = tiny("llama")
    session = ExploreSession(lm, ExploreSettings(corpus=corpus, prefetch_values=False))
    client = page_client(create_app(session))
    session.values.fill_now()
    run_job(client, session, client.post("/api/edits", json=edit_body()))  # keys of layer 1
    assert session.values.ready == 4
    run_job(client, session, client.post("/api/edits", json=edit_body(method="ft-values", layers=[2], lr=0.5)))
    assert session.values.ready == 3 and session.values.get(2) is None
    session.values.fill_now()
    ours = client.post("/api/prompt", json={"prompt": PROMPT}).json()
    assert_same_as_inspect(ours, inspect_prompt(lm, PROMPT, top_memories=10, top_tokens=5))
    client.post("/api/edits/2/revert")
    assert session.values.ready == 3
    session.values.fill_now()
    assert_same_as_inspect(
        client.post("/api/prompt", json={"prompt": PROMPT}).json(),
        inspect_prompt(lm, PROMPT, top_memories=10, top_tokens=5),
    )
    assert client.get("/api/info").json()["value_tokens_ready"] == 4
    session.close()


# ---- page and facts -------------------------------------------------------------------------------------
def test_page_static_files_and_info(app):
    client, session = app
    page = client.get("/")
    assert page.status_code == 200 and "/static/app.js" in page.text and '<script src="http' not in page.text
    for name in ("app.js", "style.css"):
        assert client.get(f"/static/{name}").status_code == 200
    assert "/api/prompt" in client.get("/openapi.json").json()["paths"]
    assert client.get("/docs").status_code == 404  # FastAPI's docs page would load scripts from a CDN
    info = client.get("/api/info").json()
    assert info["model"] == "tiny-llama" and info["layers"] == 4 and info["d_ff"] == 64
    assert {"ft-keys", "ft-values", "rome", "memit", "pmet"} <= {m["name"] for m in info["methods"] if m["main"]}
    assert info["edits"] == [] and info["job"] is None and info["mined_layers"] == []


def test_prompt_endpoint_and_bad_prompts(app):
    client, _ = app
    r = client.post("/api/prompt", json={"prompt": PROMPT, "watch": "paris"})
    assert r.status_code == 200
    data = r.json()
    assert len(data["layers"]) == 4 and len(data["layers"][0]["memories"]) == 10
    assert sum(e["prob"] for e in data["next_token"]) <= 1 + 1e-6
    assert data["watch"]["token"] == "paris" and 1 <= data["watch"]["rank"] <= 80
    assert data["layers"][-1]["watch"]["prob"] == pytest.approx(
        data["watch"]["prob"], rel=1e-5
    )  # lens at the end = output
    for body, message in [
        ({"prompt": "  "}, "empty"),
        ({"prompt": "the zzz tower"}, "does not know"),
        ({}, "prompt: Field required"),
    ]:
        r = client.post("/api/prompt", json=body)
        assert r.status_code == 400 and message in r.json()["error"], r.json()


def test_memory_view_and_bad_memories(app):
    client, session = app
    r = client.post("/api/memory", json={"layer": 2, "key": 7, "prompt": PROMPT}).json()
    lm = session.lm
    v = ffn_memory(lm, 2).written[7].detach()
    assert [e["token"] for e in r["promotes"]] == [session.vocab[i] for i in project(lm, v).topk(10).indices.tolist()]
    assert len(r["on_prompt"]["coefficients"]) == len(r["on_prompt"]["tokens"]) and 1 <= r["on_prompt"]["rank"] <= 64
    assert "triggers" not in r  # nothing mined yet: the page offers to mine
    for body, message in [
        ({"layer": 2, "key": 64}, "out of range; layer 2 has memories 0..63"),
        ({"layer": 4, "key": 0}, "layer 4 is out of range"),
        ({"layer": 1, "key": 0, "prompt": " "}, "empty"),
        ({"layer": "x", "key": 0}, "layer"),
    ]:
        r = client.post("/api/memory", json=body)
        assert r.status_code == 400 and message in r.json()["error"], r.json()


def test_mining_a_layer_on_the_fly(app, corpus):
    client, session = app
    assert client.post("/api/mine", json={"layer": 9}).status_code == 400
    done = run_job(client, session, client.post("/api/mine", json={"layer": 1}))
    assert done["result"]["layer"] == 1 and done["result"]["tokens"] >= 300
    assert client.get("/api/info").json()["mined_layers"] == [1]
    view = client.post("/api/memory", json={"layer": 1, "key": 5}).json()
    reference = mine_triggers(session.lm, corpus, layers=[1], k=5, max_tokens=300, progress=False)
    assert [e["coefficient"] for e in view["triggers"]] == pytest.approx(
        [e.coefficient for e in reference.examples(1, 5)]
    )
    assert all(e["trigger"] for e in view["triggers"]) and "mined here" in view["triggers_origin"]


def test_a_facts_knowledge_neurons_are_found_as_a_job_with_their_memories(app):
    from kvedit.analysis.neurons import fact_neurons

    client, session = app
    prompts = [PROMPT, "the eiffel tower lies in the city of"]
    done = run_job(
        client, session, client.post("/api/neurons", json={"prompts": prompts, "answer": "paris", "steps": 3})
    )
    want = fact_neurons(session.lm, prompts, "paris", 3)
    got = done["result"]["neurons"]
    assert [(n["layer"], n["key"]) for n in got] == [(l, i) for l, i, _ in want.neurons] and got
    assert [n["attribution"] for n in got] == pytest.approx([a for _, _, a in want.neurons])
    assert set(done["result"]["suppression"]) == {"knowledge", "random"}
    first = got[0]  # each links to its memory view
    assert client.post("/api/memory", json={"layer": first["layer"], "key": first["key"]}).status_code == 200
    for body, message in [
        ({"prompts": [], "answer": "paris"}, "at least one prompt"),
        ({"prompts": [PROMPT], "answer": " "}, "answer is empty"),
        ({"prompts": [PROMPT], "answer": "paris", "steps": 0}, "steps must be"),
        ({"prompts": [PROMPT] * 21, "answer": "paris"}, "at most 20"),
    ]:
        r = client.post("/api/neurons", json=body)
        assert r.status_code == 400 and message in r.json()["error"], r.json()


def test_given_triggers_are_checked_against_the_model(corpus):
    lm = tiny("llama")
    other = mine_triggers(tiny("llama", seed=1), corpus, layers=[0], k=3, max_tokens=200, progress=False)
    with pytest.raises(ValueError, match="mined on"):
        ExploreSession(lm, triggers=other, triggers_origin="elsewhere")
    mine = mine_triggers(lm, corpus, layers=[0, 2], k=3, max_tokens=200, progress=False)
    session = ExploreSession(lm, triggers=mine, triggers_origin="runs/mined")
    assert session.info()["mined_layers"] == [0, 2]
    assert len(session.memory(2, 3)["triggers"]) == 3
    session.close()


def test_intervene(app):
    client, session = app
    same_dist = client.post(
        "/api/intervene", json={"prompt": PROMPT, "interventions": [{"layer": 1, "key": 3, "factor": 1}]}
    ).json()
    assert same_dist["kl_before_after"] == pytest.approx(0, abs=1e-6) and not same_dist["top_changed"]
    # the memory that writes most at the last token of layer 3, scaled up hard, moves the output
    top = client.post("/api/prompt", json={"prompt": PROMPT}).json()["layers"][3]["memories"][0]["key"]
    r = client.post(
        "/api/intervene",
        json={"prompt": PROMPT, "watch": "rome", "interventions": [{"layer": 3, "key": top, "factor": 30}]},
    ).json()
    assert r["kl_before_after"] > 1e-5 and r["before"] != r["after"] and set(r["watch"]) == {"before", "after"}
    # the same as scaling that memory's value vector in the weights (down_proj column), checked independently
    lm = session.lm
    weight = lm.module(lm.values_path(3)).weight
    saved = weight.detach().clone()
    with torch.no_grad():
        weight[:, top] *= 30
        probs = torch.softmax(lm.model(**lm.tokenizer(PROMPT, return_tensors="pt")).logits[0, -1], -1)
        weight.copy_(saved)
    assert [e["prob"] for e in r["after"]] == pytest.approx(probs[[e["id"] for e in r["after"]]].tolist(), rel=1e-4)
    for body, message in [
        ({"prompt": PROMPT, "interventions": []}, "no memories chosen"),
        ({"prompt": PROMPT, "interventions": [{"layer": 0, "key": 64}]}, "out of range"),
        ({"prompt": "", "interventions": [{"layer": 0, "key": 1}]}, "empty"),
    ]:
        r = client.post("/api/intervene", json=body)
        assert r.status_code == 400 and message in r.json()["error"], r.json()


# ---- edits ---------------------------------------------------------------------------------------------
def test_edit_revert_is_bit_exact_and_patches_round_trip(app, tmp_path):
    client, session = app
    lm = session.lm
    original = snapshot(lm)
    done = run_job(
        client,
        session,
        client.post(
            "/api/edits",
            json=edit_body(
                paraphrases=["the eiffel tower lies in"], neighbours=["the louvre is located in the city of"]
            ),
        ),
    )
    entry = done["result"]
    assert entry["id"] == 1 and entry["state"] == "applied" and entry["layers"] == [1]
    kinds = [row["kind"] for row in entry["summary"]["rows"]]
    assert kinds == ["efficacy", "paraphrase", "neighborhood"]
    rewrite = entry["summary"]["rows"][0]
    assert rewrite["new_after"] > rewrite["new_before"]  # the edit pushed the new object up
    assert "1" in entry["summary"]["patch_view"]["layers"]  # the memories the edit changed, layer 1
    assert not same(snapshot(lm), original)
    patch = client.get("/api/edits/1/patch")
    assert patch.status_code == 200 and "kvedit-edit-1-ft-keys.safetensors" in patch.headers["content-disposition"]
    (tmp_path / "p.safetensors").write_bytes(patch.content)
    edited = snapshot(lm)
    assert client.post("/api/edits/1/revert", json={}).json() == {"reverted": [1], "applied": []}
    assert same(snapshot(lm), original)  # bit-identical
    r = client.post("/api/edits/1/revert", json={})
    assert r.status_code == 400 and "already reverted" in r.json()["error"]
    # load the downloaded patch again: the same edited weights, a new entry in the list
    loaded = client.post("/api/patches", content=patch.content, headers={"X-Filename": "p.safetensors"}).json()
    assert loaded["id"] == 2 and "loaded from p.safetensors" in loaded["source"]
    assert loaded["summary"]["rows"][0]["new_after"] == pytest.approx(rewrite["new_after"], rel=1e-5)
    assert same(snapshot(lm), edited)
    r = client.post("/api/patches", content=patch.content, headers={"X-Filename": "p.safetensors"})
    assert r.status_code == 400 and "already" in r.json()["error"] and same(snapshot(lm), edited)
    client.post("/api/edits/2/revert", json={})
    assert same(snapshot(lm), original)
    assert [e["state"] for e in client.get("/api/edits").json()] == ["reverted", "reverted"]
    assert WeightDelta.load(tmp_path / "p.safetensors").metadata["method"] == "ft-keys"


def test_bad_patches_change_nothing(app):
    client, session = app
    lm = session.lm
    original = snapshot(lm)
    from kvedit import EditRequest, edit

    other = tiny("gpt2")
    delta = edit(other, EditRequest("{} is located in", "the eiffel tower", "rome", "paris"), "ft-values", **FAST)
    foreign = delta.save(session._files.name + "/foreign.safetensors").read_bytes()
    good = foreign
    damaged = bytearray(good)
    damaged[-3] ^= 0xFF
    for data, message in [
        (foreign, "made for 'tiny-gpt2'"),
        (bytes(damaged), "damaged"),
        (b"", "empty"),
        (b"not a patch", "not a readable safetensors patch"),
    ]:
        r = client.post("/api/patches", content=data, headers={"X-Filename": "bad.safetensors"})
        assert r.status_code == 400 and message in r.json()["error"], r.json()
        assert "kvedit-explore-" not in r.json()["error"]  # the user's file name, not the server's temporary copy
    assert same(snapshot(lm), original) and client.get("/api/edits").json() == []


def test_a_patch_upload_larger_than_any_patch_of_the_model_is_refused_unread(app):
    client, session = app
    limit = session.patch_size_limit()
    weights_bytes = sum(p.numel() * p.element_size() for p in session.lm.model.parameters())
    assert limit == 2 * weights_bytes + (1 << 20)
    chunks = (b"\0" * (1 << 20) for _ in range(limit // (1 << 20) + 2))  # streamed: no length header
    r = client.post("/api/patches", content=chunks, headers={"X-Filename": "huge.safetensors"})
    assert r.status_code == 413 and "larger than" in r.json()["error"]
    assert client.get("/api/edits").json() == []


@pytest.mark.parametrize(
    "body, message",
    [
        (edit_body(prompt="the louvre is located in the city of"), "does not contain the subject"),
        (edit_body(prompt=""), "prompt is empty"),
        (edit_body(subject=" "), "subject is empty"),
        (edit_body(target_new="zzz"), "does not know"),
        (edit_body(target_new="paris"), "nothing to edit"),
        (edit_body(method="magic"), "unknown editing method"),
        (edit_body(layers=[7]), "out of range"),
        (edit_body(max_steps=0), "max_steps"),
        (edit_body(neighbours=["the zzz is in"]), "does not know"),
    ],
)
def test_bad_edit_input_is_refused_before_anything_runs(app, body, message):
    client, session = app
    original = snapshot(session.lm)
    r = client.post("/api/edits", json=body)
    assert r.status_code == 400 and message in r.json()["error"], r.json()
    assert session.jobs.jobs == {} and same(snapshot(session.lm), original)


def test_failed_edit_job_reports_and_restores(app):
    client, session = app
    original = snapshot(session.lm)
    from kvedit.evaluation.probe import greedy_answer

    answer = greedy_answer(session.lm, PROMPT)  # asking for the model's own answer: nothing to edit
    failed = run_job(
        client, session, client.post("/api/edits", json=edit_body(target_new=answer, target_true=None)), "failed"
    )
    assert "nothing to edit" in failed["error"]
    assert same(snapshot(session.lm), original) and client.get("/api/edits").json() == []


def test_reverting_one_edit_among_several(app):
    """#1 and #2 change the same keys (layer 1), #3 the values of layer 2. #1 alone is refused (restoring its
    weights would undo #2) and nothing changes; with cascade #2 then #1 go; #3 stays, untouched."""
    client, session = app
    lm = session.lm
    original = snapshot(lm)
    run_job(client, session, client.post("/api/edits", json=edit_body()))
    run_job(
        client,
        session,
        client.post(
            "/api/edits",
            json=edit_body(
                subject="berlin", prompt="berlin is the capital of", target_new="italy", target_true="germany"
            ),
        ),
    )
    after_two = snapshot(lm)
    run_job(client, session, client.post("/api/edits", json=edit_body(method="ft-values", layers=[2])))
    after_three = snapshot(lm)
    r = client.post("/api/edits/1/revert", json={"cascade": False})
    assert r.status_code == 409 and "#2" in r.json()["error"] and "#3" not in r.json()["error"]
    assert same(snapshot(lm), after_three)
    r = client.post("/api/edits/1/revert", json={"cascade": True}).json()
    assert r == {"reverted": [2, 1], "applied": [3]}
    now = snapshot(lm)
    values = f"{lm.values_path(2)}.weight"
    assert all(torch.equal(now[n], original[n]) for n in now if n != values)
    assert torch.equal(now[values], after_three[values]) and not torch.equal(now[values], after_two[values])
    assert client.post("/api/edits/3/revert").json()["reverted"] == [3]
    assert same(snapshot(lm), original)
    assert client.post("/api/edits/9/revert").status_code == 404 and client.get("/api/jobs/99").status_code == 404


def test_a_failed_cascade_puts_back_what_it_reverted(app):
    client, session = app
    lm = session.lm
    run_job(client, session, client.post("/api/edits", json=edit_body()))  # gate and up keys of layer 1
    run_job(
        client,
        session,
        client.post(
            "/api/edits",
            json=edit_body(
                subject="berlin",
                prompt="berlin is the capital of",
                target_new="italy",
                target_true="germany",
                method="ft-key-gate",
            ),
        ),
    )  # gate keys only
    # a weight #1 touched and #2 did not is changed behind the explorer's back: #2 reverts, #1 then cannot
    with torch.no_grad():
        lm.module(lm.key_paths(1)["up"]).weight[0, 0] += 1.0
    tampered = snapshot(lm)
    r = client.post("/api/edits/1/revert", json={"cascade": True})
    assert r.status_code == 400 and "cannot revert patch" in r.json()["error"]
    assert same(snapshot(lm), tampered)  # #2's revert was undone again
    assert [e["state"] for e in client.get("/api/edits").json()] == ["applied", "applied"]


def test_quick_views_are_refused_while_a_job_holds_the_model(app):
    client, session = app
    release = threading.Event()
    job = session.jobs.submit("test", "a long test job", lambda job: release.wait(30))
    try:
        for _ in range(200):
            if job.state == "running":
                break
            threading.Event().wait(0.01)
        r = client.post("/api/prompt", json={"prompt": PROMPT})
        assert r.status_code == 409 and "busy with job 1: a long test job" in r.json()["error"]
        r = client.post("/api/edits", json=edit_body())
        assert r.status_code == 409 and "still running" in r.json()["error"]
        assert client.get("/api/info").json()["job"]["title"] == "a long test job"
    finally:
        release.set()
    session.jobs.wait(job.id)
    assert client.post("/api/prompt", json={"prompt": PROMPT}).status_code == 200


def test_settings_are_checked():
    for bad, message in [
        ({"mine_rank": "max"}, "mine_rank"),
        ({"mine_tokens": 0}, "mine_tokens"),
        ({"top_memories": 0}, "top_memories"),
        ({"stats_tokens": 0}, "stats_tokens"),
    ]:
        with pytest.raises(ValueError, match=message):
            ExploreSettings(**bad)


def test_jsonable_has_no_nan():
    assert jsonable({1: float("nan"), "x": [float("inf"), 1.5, (2, None)]}) == {"1": None, "x": [None, 1.5, [2, None]]}


# ---- the command ---------------------------------------------------------------------------------------
def test_command_refuses_bad_options_before_loading(tmp_path, capsys):
    assert main(["explore", "--mined", str(tmp_path)]) == 2
    assert "holds no mined triggers" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(ValueError, match=f"cannot listen on 127.0.0.1:{port}"):
            bind_socket("127.0.0.1", port)
    with pytest.raises(SystemExit):
        main(["explore", "--port", "70000"])
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1") and not is_loopback("0.0.0.0")


def test_trusted_hosts(corpus):
    session = ExploreSession(tiny("llama"))
    client = page_client(create_app(session, allowed_hosts=["127.0.0.1", "localhost"]), base_url="http://127.0.0.1")
    assert client.get("/api/info").status_code == 200
    assert client.get("/api/info", headers={"host": "evil.example"}).status_code == 400
    session.close()
