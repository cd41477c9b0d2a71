"""The examples of docs/object-storage.md, run as written against the test S3 server."""

from __future__ import annotations

import anyio
import pytest
import torch

pytest.importorskip("obstore")
from test_doc_examples import python_block, run_block

import aiostage
from aiostage.testing._s3 import S3Server


async def test_the_example_of_the_object_storage_page(
    aiostage_s3_bucket: str, aiostage_s3_server: S3Server
) -> None:
    code = python_block("object-storage.md", "aiostage.Checkpointer(root, keep_last=2)")
    bucket, s3_server = aiostage_s3_bucket, aiostage_s3_server
    seen = await run_block(code, {"bucket": bucket, "torch": torch})
    assert seen["loaded"]["step"] == 100
    assert seen["newest"] == 400
    keys = await anyio.to_thread.run_sync(s3_server.keys, bucket)
    steps = sorted({k.split("/")[1] for k in keys})
    assert steps == ["step_000000300", "step_000000400"]


async def test_the_configured_store_example(
    aiostage_s3_bucket: str, aiostage_s3_server: S3Server
) -> None:
    code = python_block("object-storage.md", 'aiostage.use_store("s3://models", store)')
    env = aiostage_s3_server.environ()
    names = {
        "bucket": aiostage_s3_bucket,
        "endpoint": aiostage_s3_server.endpoint,
        "key_id": env["AWS_ACCESS_KEY_ID"],
        "secret": env["AWS_SECRET_ACCESS_KEY"],
        "torch": torch,
    }
    try:
        seen = await run_block(code, names)
    finally:
        aiostage.use_store("s3://models", None)
    assert torch.equal(seen["again"]["w"], torch.ones(2))
    keys = await anyio.to_thread.run_sync(aiostage_s3_server.keys, aiostage_s3_bucket)
    assert keys[-1] == "run7/step_000000001/manifest.json"
