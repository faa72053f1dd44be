"""The demo's last step: register the adapter, start the server, ask it one question with the
official ``openai`` SDK, print the answer, and stop the server."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console

from loraforge.errors import LoraforgeError

ADAPTER_NAME = "support-demo"
TENANT = "demo"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_demo(console: Console, adapter: Path, home: Path, question: str, system: str | None) -> Path:
    """Returns the server's log file."""
    import logging

    import httpx

    logging.getLogger("httpx").setLevel(logging.WARNING)  # no line per HTTP request in the demo

    from loraforge.govern.audit import AuditLog
    from loraforge.serve.adapters import AdapterStore
    from loraforge.serve.keys import KeyStore

    cli = Path(sys.executable).parent / "loraforge"
    console.print(f"$ loraforge adapters add {adapter} --name {ADAPTER_NAME} --tenant {TENANT} --replace")
    audit = AuditLog(home)
    with audit.action("demo", "adapter.add", ADAPTER_NAME, tenant=TENANT, directory=str(adapter)) as act:
        reg = AdapterStore(home).add(adapter, ADAPTER_NAME, tenant=TENANT, replace=True)
        act.outcome["sha256"] = reg.weights_sha256
    console.print(f"$ loraforge keys create --tenant {TENANT}")
    keys = KeyStore(home)
    with audit.action("demo", "key.create", f"tenant:{TENANT}", role="user") as act:
        key, record = keys.create(TENANT)
        act.outcome["key_id"] = record.id  # never the key itself
    port = _free_port()
    log_path = home / "serve-demo.log"
    console.print(f"$ loraforge serve --port {port}")
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            [str(cli), "serve", "--home", str(home), "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ},
        )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 300  # the first start on a machine also compiles the LoRA kernel (~40 s)
        while True:
            try:
                if httpx.get(url + "/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.time() > deadline:
                raise LoraforgeError(f"the server did not start; see {log_path}")
            time.sleep(0.25)
        from openai import OpenAI

        client = OpenAI(base_url=url + "/v1", api_key=key)
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
        console.print(f'>>> OpenAI(base_url="{url}/v1", api_key=…).chat.completions.create(model="{ADAPTER_NAME}", …)')
        reply = client.chat.completions.create(
            model=ADAPTER_NAME,
            messages=messages,  # type: ignore[arg-type]
            max_tokens=80,
            temperature=0,
        )
        usage = httpx.get(url + "/v1/usage", headers={"Authorization": f"Bearer {key}"}).json()
        console.print(f"[bold]Q:[/] {question}")
        console.print(f"[bold green]A ({ADAPTER_NAME}):[/] {reply.choices[0].message.content}", highlight=False)
        assert reply.usage is not None
        console.print(
            f"[dim]{reply.usage.prompt_tokens} prompt + {reply.usage.completion_tokens} completion tokens; "
            f"tenant {TENANT} has used {int(usage['total']['total_tokens'])} tokens in "
            f"{int(usage['total']['requests'])} requests[/]"
        )
    finally:
        server.terminate()
        server.wait(timeout=30)
        with audit.action("demo", "key.revoke", record.id, tenant=TENANT):
            keys.revoke(record.id)
    console.print("server stopped; the demo key is revoked")
    return log_path
