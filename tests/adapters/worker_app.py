"""A worker program for tests that need a real process (signals, exit codes).

The adapter and backend come from the environment (RCA_TEST_ADAPTER,
RCA_TEST_BACKEND); everything else is the worker's own configuration.
"""

import importlib
import logging
import os

import anyio

mod = importlib.import_module(os.environ.get("RCA_TEST_ADAPTER", "rca_aiohttp"))
worker = mod.Worker(worker_type="signals")


@worker.task("sleep")
async def sleep(params: dict, files: mod.TaskFiles, **kwargs):
    await files.write("scratch.txt", "data")
    print("STARTED", kwargs["task_id"], flush=True)
    await anyio.sleep(params["seconds"])
    return {"data": {"slept": params["seconds"]}}


@worker.task("leak")
async def leak(params: dict, **kwargs):
    logging.getLogger("app").info("working on it")
    raise RuntimeError(f"could not call the API with token {os.environ['WORKER_TOKEN']}")


if __name__ == "__main__":
    backend = os.environ.get("RCA_TEST_BACKEND", "asyncio")
    if backend == "trio":
        worker.run(backend="trio")
    else:
        worker.run()
