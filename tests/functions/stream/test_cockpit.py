"""The cockpit's relay to the Broker (DOCKYARD_BROKER_URL) and its config, over HTTP against a stand-in Broker.

The relay raises; the stream app's exception handler answers by the one rule:
what a person may not send is a 4xx naming the field, the Broker's own 4xx
comes back as it is, and an unreachable or failing Broker is a 503 (retry later).
"""

from __future__ import annotations

import json

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from agent import contract
from functions.stream.app import create_app
from tests.conftest import free_port
from tests.functions.stream.support import AUTH, AppServer, replace_settings

pytestmark = pytest.mark.timeout(60)

STRUCTURED = {"Content-Type": "application/cloudevents+json"}


def event(type_: str = contract.EVENT_TASK_SUBMITTED, data: dict | None = None, id: str = "e-1") -> str:
    return json.dumps({"specversion": "1.0", "type": type_, "source": "tests/cockpit", "id": id, "data": data or {"prompt": "hi"}})


@pytest.fixture
async def broker():
    """A stand-in Broker: records what it got, answers what `answers` holds next (202 by default)."""
    got: list[dict] = []
    answers: list = []

    async def ingress(request: Request):
        got.append(json.loads(await request.body()))
        return answers.pop(0) if answers else PlainTextResponse("", 202)

    server = await AppServer(Starlette(routes=[Route("/", ingress, methods=["POST"])])).start()
    yield server, got, answers
    await server.stop()


async def relay_client(settings, broker_url: str) -> httpx.AsyncClient:
    app = create_app(replace_settings(settings, broker_url=broker_url))
    return httpx.AsyncClient(headers=AUTH, transport=httpx.ASGITransport(app=app), base_url="http://stream")


async def test_the_relay_forwards_what_a_person_may_send_and_refuses_the_rest(settings, broker):
    server, got, answers = broker
    async with await relay_client(settings, f"{server.url}/") as client:
        assert (await client.get("/cockpit-config.json")).json()["ingress"] == "/api/events"
        accepted = await client.post("/api/events", content=event(), headers=STRUCTURED)
        assert accepted.status_code == 202
        assert accepted.json() == {"accepted": True, "task_id": contract.derive_task_id("tests/cockpit", "e-1")}
        assert got[-1]["type"] == contract.EVENT_TASK_SUBMITTED and got[-1]["data"] == {"prompt": "hi"}

        forged = await client.post("/api/events", content=event(contract.EVENT_JOB_UPDATE), headers=STRUCTURED)
        assert (forged.status_code, forged.json()["field"]) == (400, "type")
        form = await client.post("/api/events", content="prompt=hi", headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert (form.status_code, form.json()["field"]) == (400, "ce-specversion")  # a cross-site form is no CloudEvent
        assert len(got) == 1  # neither reached the Broker

        answers.append(JSONResponse({"error": "prompt is required", "field": "prompt"}, 400))
        refused = await client.post("/api/events", content=event(data={"prompt": ""}), headers=STRUCTURED)
        assert (refused.status_code, refused.json()) == (400, {"error": "prompt is required", "field": "prompt"})
        answers.append(PlainTextResponse("no such\nbroker", 404))
        missing = await client.post("/api/events", content=event(), headers=STRUCTURED)
        assert (missing.status_code, missing.json()) == (404, {"error": "the broker answered 404: no such broker", "field": None})
        answers.append(PlainTextResponse("overloaded", 500))
        failing = await client.post("/api/events", content=event(), headers=STRUCTURED)
        assert failing.status_code == 503 and "the broker answered 500: overloaded" in failing.json()["error"]


async def test_an_unreachable_broker_is_a_503(settings):
    async with await relay_client(settings, f"http://127.0.0.1:{free_port()}/") as client:
        answer = await client.post("/api/events", content=event(), headers=STRUCTURED)
    assert answer.status_code == 503
    assert "unreachable" in answer.json()["error"] and answer.json()["field"] is None


async def test_without_a_broker_url_the_page_posts_to_its_own_origin(settings):
    async with await relay_client(settings, "") as client:
        assert (await client.get("/cockpit-config.json")).json()["ingress"] == "/"
        assert (await client.post("/api/events", content=event(), headers=STRUCTURED)).status_code == 405  # no relay: static files
        page = await client.get("/")
        assert page.status_code == 200 and "<html" in page.text.lower()


async def test_the_config_tells_the_page_the_providers_states_outcomes_and_limits_the_server_applies(settings):
    from agent import models

    settings = replace_settings(settings, max_deadline_seconds=7200, default_retries=1, max_retries=4)
    async with await relay_client(settings, "") as client:
        config = (await client.get("/cockpit-config.json")).json()
    assert config["providers"] == ["scripted", *models.PROVIDERS]  # the form checks the providers the agent loads
    assert set(config["states"]) == {v for k, v in vars(contract).items() if k.startswith("STATE_")}
    assert set(config["outcomes"]) == {v for k, v in vars(contract).items() if k.startswith("OUTCOME_")}
    assert config["limits"] == {"deadline_seconds": {"default": 3600, "max": 7200}, "retries": {"default": 1, "max": 4}}
