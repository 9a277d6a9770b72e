"""The reference SDK's Quick Start worker, with only the import's module name changed."""

import asyncio
import logging

from rca_aiohttp import Worker

logging.basicConfig(level=logging.INFO)

worker = Worker(worker_type="image-processing")


@worker.task("resize_image")
async def image_resizer(params: dict, **kwargs):
    task_id = kwargs.get("task_id")
    job_id = kwargs.get("job_id")
    print(f"Task {task_id} (Job: {job_id}): resizing image...")
    print(f"Parameters: {params}")
    await asyncio.sleep(1)  # Simulate I/O-bound work
    return {
        "status": "success",
        "data": {"resized_path": f"/path/to/resized_{params.get('filename')}"},
    }


if __name__ == "__main__":
    worker.run_with_health_check()
