"""Issue 11, defect 2: `job_finished` with object-store credentials it cannot read.

In the cluster the functions read the store's credentials from Secret files; mounted with a
mode their user cannot read, opening the store fails. That used to happen outside the code
that maps store errors, so every finished Job was a 500, retried, then dead-lettered. Now it
is a 503 naming the store (transient for the Broker: it retries), nothing is recorded, and the
same event succeeds once the files can be read.
"""

from __future__ import annotations

import boto3
import pytest

from agent import contract
from tests.functions.handlers.test_functions import finish_job, submitted
from tests.functions.stream.support import replace_settings


@pytest.fixture
def secrets_dir(tmp_path, monkeypatch, s3_endpoint):
    secrets = tmp_path / "secrets"
    (secrets / "s3").mkdir(parents=True)
    (secrets / "s3" / "endpoint").write_text(s3_endpoint)
    (secrets / "s3" / "access_key_id").mkdir()  # not a file: reading it fails like EACCES does
    (secrets / "s3" / "secret_access_key").write_text("testing")
    monkeypatch.setenv("DOCKYARD_SECRETS_DIR", str(secrets))
    monkeypatch.delenv("DOCKYARD_S3_ENDPOINT", raising=False)
    return secrets


@pytest.fixture
def settings(settings, s3_endpoint, secrets_dir):
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1",
                 aws_access_key_id="testing", aws_secret_access_key="testing").create_bucket(Bucket="trouble")
    return replace_settings(settings, store="s3://trouble/dockyard")


async def test_unreadable_store_credentials_are_a_503_and_the_redelivery_succeeds(post, bus, runtime, secrets_dir):
    await submitted(post, "t-store")
    data = finish_job(runtime, "t-store", "Complete")

    refused = await post("job_finished", contract.EVENT_JOB_UPDATE, data)
    assert refused.status_code == 503, refused.text
    assert "object store" in refused.json()["error"] and "access_key_id" in refused.json()["error"]
    assert (await bus.registry.get("t-store"))["state"] != contract.STATE_FINISHED

    (secrets_dir / "s3" / "access_key_id").rmdir()
    (secrets_dir / "s3" / "access_key_id").write_text("testing")
    answered = await post("job_finished", contract.EVENT_JOB_UPDATE, data)
    assert answered.status_code == 200, answered.text
    record = await bus.registry.get("t-store")
    assert record["state"] == contract.STATE_FINISHED and record["final_snapshot_missing"] is True
