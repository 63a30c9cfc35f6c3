"""The named API endpoints through gradio_client against a live app: edit, submit_ranking,
compare_vote; bad input gets a clear message and writes nothing; admin endpoints refuse others."""

from __future__ import annotations

import pytest
from gradio_client import Client, handle_file
from sqlalchemy import select

from db import feedback as fb
from db.engine import session_scope
from db.models import Comparison, Ranking, RankingItem, TrainingRun
from hive import toy
from tests.app_server import USERS, live_app
from tests.app_fixtures import bad_files  # noqa: F401


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_pipeline):
    with live_app(tmp_path_factory.mktemp("api_home"), tiny_pipeline) as live:
        yield live


@pytest.fixture(scope="module")
def client(app) -> Client:
    return Client(app.url, verbose=False)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("src") / "scene.png"
    toy.sample_example(3).input_image.save(path)
    return str(path)


def login(client: Client, name: str) -> str:
    return client.predict(name, USERS[name][1], api_name="/login")


def edit(client, token, image, instruction="make the circle blue", variants=4):
    return client.predict(handle_file(image), instruction, variants, 5, 2, 7.5, 1.5, True, token, api_name="/edit")


def test_edit_without_settings_takes_the_models_defaults(app, client, source, tiny_pipeline):
    from hive.editor import Editor

    token = client.predict(api_name="/guest")
    info, images = client.predict(handle_file(source), "make the circle blue", 2, 5, None, None, None, False, token,
                                  api_name="/edit")
    want = Editor(tiny_pipeline, device="cpu").settings()
    assert len(images) == 2
    assert [(v["steps"], v["guidance"], v["image_guidance"]) for v in info["variants"]] == [want, want]


def test_edit_rank_and_vote_through_the_api(app, client, source):
    token = client.predict(api_name="/guest")
    info, images = edit(client, token, source)
    assert len(images) == 4 and len(info["variant_ids"]) == 4
    assert [v["seed"] for v in info["variants"]] == [5, 6, 7, 8]
    item = client.predict(token, api_name="/next_item")
    assert item["request_id"] == info["request_id"] and item["own"] is True
    v = info["variant_ids"]
    result = client.predict(token, info["request_id"], [v[3], [v[0], v[1]], v[2]], False, False,
                            {str(v[3]): {"quality": 4}}, "key-1", api_name="/submit_ranking")
    again = client.predict(token, info["request_id"], [v[3], [v[0], v[1]], v[2]], False, False, None, "key-1",
                           api_name="/submit_ranking")
    assert again == result
    with session_scope(write=False) as s:
        items = {i.variant_id: (i.rank, i.quality) for i in
                 s.scalars(select(RankingItem).where(RankingItem.ranking_id == result["ranking_id"]))}
    assert items == {v[3]: (1, 4), v[0]: (2, None), v[1]: (2, None), v[2]: (3, None)}
    assert client.predict(token, api_name="/undo_ranking") == {"request_id": info["request_id"]}

    ann = login(client, "ann")
    pair = client.predict(ann, api_name="/compare_pair")
    vote = client.predict(ann, pair["pair"], "right", api_name="/compare_vote")
    pair2 = client.predict(ann, api_name="/compare_pair")
    vote2 = client.predict(ann, pair2["pair"], "both_bad", api_name="/compare_vote")
    with session_scope(write=False) as s:
        assert s.get(Comparison, vote["comparison_id"]).instruction == pair["instruction"]
        assert s.get(Comparison, vote2["comparison_id"]).choice == "both_bad"


@pytest.mark.parametrize("case, expected", [
    ("not_image", "not an image"),
    ("huge", "too large: 10000x10000"),
    ("empty", "instruction is empty"),
    ("long", "instruction is too long: 60000 characters"),
    ("variants", "variants must be between 2 and 8"),
])
def test_bad_edit_through_the_api_is_refused_and_writes_nothing(app, client, bad_files, source, case, expected):
    token = login(client, "ann")
    before = app.counts()
    image = {"not_image": bad_files["not_image"], "huge": bad_files["huge"]}.get(case, source)
    instruction = {"empty": "", "long": "x" * 60_000}.get(case, "make it red")
    with pytest.raises(Exception) as info:
        edit(client, token, str(image), instruction, variants=12 if case == "variants" else 4)
    assert expected in str(info.value)
    assert app.counts() == before


@pytest.mark.parametrize("order, expected", [
    (lambda v: [v[0], v[1], v[2]], "have no rank"),
    (lambda v: [v[0], v[1], v[1], v[2], v[3]], "appears more than once"),
])
def test_bad_ranking_through_the_api_is_refused_and_writes_nothing(app, client, source, order, expected):
    token = login(client, "bea")
    info, _ = edit(client, token, source)
    before = app.counts()
    with pytest.raises(Exception) as exc:
        client.predict(token, info["request_id"], order(info["variant_ids"]), False, False, None, None,
                       api_name="/submit_ranking")
    assert expected in str(exc.value)
    assert app.counts() == before


@pytest.mark.parametrize("who", ["guest", "ann", "vic", "none"])
def test_non_admins_cannot_reach_admin_endpoints(app, client, who):
    token = {"guest": lambda: client.predict(api_name="/guest"), "none": lambda: ""}.get(
        who, lambda: login(client, who))()
    before = app.counts()
    for api_name, args in (("/start_job", ("evaluate", {"n": 1})), ("/promote_version", (1,)),
                           ("/rollback_version", ()), ("/job_status", (1,))):
        with pytest.raises(Exception, match="admins only"):
            client.predict(token, *args, api_name=api_name)
    after = app.counts()
    assert after["training_runs"] == before["training_runs"] and after["model_versions"] == before["model_versions"]
    with session_scope(write=False) as s:
        assert s.scalars(select(TrainingRun)).all() == []


def test_visitor_accounts_edit_but_do_not_rank(app, client, source):
    token = login(client, "vic")
    info, _ = edit(client, token, source)
    with pytest.raises(Exception, match="annotator account"):
        client.predict(token, info["request_id"], [info["variant_ids"]], False, False, None, None,
                       api_name="/submit_ranking")
    with session_scope(write=False) as s:
        assert s.scalars(select(Ranking).where(Ranking.request_id == info["request_id"])).all() == []


def test_admin_promotes_and_rolls_back_editor_versions(app, client, source):
    admin = login(client, "boss")
    assert client.predict(admin, 2, api_name="/promote_version") == {"promoted": "tiny-candidate"}
    info, _ = edit(client, login(client, "ann"), source)
    assert info["model_version"] == "tiny-candidate"  # edits now use the promoted version
    promoted_first = client.predict(admin, api_name="/rollback_version")["promoted"]
    assert promoted_first != "tiny-candidate"
    info, _ = edit(client, login(client, "ann"), source)
    assert info["model_version"] == promoted_first
    with pytest.raises(Exception, match="no editor model version with id or name '999'"):
        client.predict(admin, 999, api_name="/promote_version")
    with session_scope(write=False) as s:  # a refused promotion changes nothing
        assert fb.promoted_version(s, "editor").name == promoted_first


def test_only_images_are_served_from_the_data_folder(app, client, source):
    import urllib.error
    import urllib.request

    edit(client, login(client, "ann"), source)
    with session_scope(write=False) as s:
        from db.models import Image

        image_path = app.home / s.scalars(select(Image.path)).first()

    def status(path) -> int:
        try:
            return urllib.request.urlopen(f"{app.url}gradio_api/file={path}", timeout=10).status
        except urllib.error.HTTPError as exc:
            return exc.code

    assert status(image_path) == 200
    for secret in ("app_secret", "hive.db"):
        assert (app.home / secret).exists()
        assert status(app.home / secret) in (403, 404)


def test_edit_cannot_read_server_files_by_path(app, client):
    """Naming a file on the server instead of uploading one reads nothing useful: Gradio only
    accepts paths in its upload, temp or working folders, and a non-image is refused."""
    before = app.counts()
    forged = {"path": str(app.home / "hive.db"), "meta": {"_type": "gradio.FileData"}}
    with pytest.raises(Exception) as info:
        client.predict(forged, "make it red", 4, 1, 2, 7.5, 1.5, False, login(client, "ann"), api_name="/edit")
    assert "not an image" in str(info.value) or "Cannot move" in str(info.value)
    with pytest.raises(Exception):
        client.predict({"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}}, "make it red", 4, 1, 2, 7.5,
                       1.5, False, login(client, "ann"), api_name="/edit")
    assert app.counts() == before
