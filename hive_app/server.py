"""Start the app: service, job worker, Gradio server. Used by `app.py`, tests and the load bench."""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from dataclasses import dataclass  # noqa: E402

import gradio as gr  # noqa: E402

from hive_app.config import AppConfig  # noqa: E402
from hive_app.jobs import JobWorker  # noqa: E402
from hive_app.service import HiveService  # noqa: E402
from hive_app.ui import build_app, launch_kwargs  # noqa: E402


@dataclass
class Running:
    service: HiveService
    demo: gr.Blocks
    worker: JobWorker | None
    url: str

    def close(self) -> None:
        if self.worker is not None:
            self.worker.stop()
        self.demo.close()


def start(config: AppConfig, host: str = "127.0.0.1", port: int | None = None, block: bool = False,
          service: HiveService | None = None) -> Running:
    svc = service or HiveService(config)
    worker = JobWorker(svc) if config.run_jobs else None
    if worker is not None:
        worker.start()
    demo = build_app(svc)
    demo.queue(default_concurrency_limit=4)
    _, url, _ = demo.launch(server_name=host, server_port=port, prevent_thread_lock=not block, quiet=not block,
                            **launch_kwargs(svc))
    return Running(svc, demo, worker, url)


def serve(config: AppConfig, host: str, port: int) -> None:
    print(f"HIVE app: serving editor {config.model} on http://{host}:{port} (data in {os.environ.get('HIVE_HOME', './data')})")
    running = start(config, host, port, block=True)
    running.close()
