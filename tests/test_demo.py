"""`vitrine demo`, the README's first command: the night runs, then the search page is live
until the demo is stopped, and stopping it stops the service."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

from tests.conftest import TINY_BACKBONE
from tests.live_server import free_port

REPO = Path(__file__).resolve().parents[1]


def _tiny_params(path: Path) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train"] |= {"backbone": TINY_BACKBONE, "weights": "none"}
    params["gate"]["floors"] = {"inshop.recall@1": 0.0}
    path.write_text(yaml.safe_dump(params))
    return path


def test_demo_ends_with_a_live_search_page(tmp_path: Path) -> None:
    port = free_port()
    command = [sys.executable, "-m", "components.cli", "demo", "--out", str(tmp_path / "demo")]
    command += ["--milvus-uri", str(tmp_path / "milvus"), "--port", str(port), "--quiet"]
    command += ["--products", "16", "--epochs", "1", "--params", str(_tiny_params(tmp_path / "p"))]
    demo = subprocess.Popen(
        command,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=os.environ | {"VITRINE_ADMIN_TOKEN": "demo-test"},
    )
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 240
        assert demo.stdout is not None
        while time.monotonic() < deadline:
            line = demo.stdout.readline()
            if not line:
                break
            lines.append(line.rstrip())
            if line.startswith("search page:"):
                break
        output = "\n".join(lines)
        assert lines and lines[-1].startswith("search page:"), output
        for step in ("validate", "train", "evaluate", "gate", "index", "rollout", "smoke"):
            assert any(line.startswith(f"[{step:>8}]") for line in lines), (step, output)
        assert "night promoted" in output

        url = f"http://127.0.0.1:{port}"
        assert "<html" in httpx.get(f"{url}/").text.lower()
        assert httpx.get(f"{url}/readyz").status_code == 200
        photo = next((tmp_path / "demo" / "nights" / "demo-catalog" / "images").rglob("*.jpg"))
        answer = httpx.post(
            f"{url}/v1/search/image", files={"image": (photo.name, photo.read_bytes())}
        )
        assert answer.status_code == 200 and answer.json()["results"], answer.text
        assert (tmp_path / "demo" / "metrics.json").is_file()
    finally:
        demo.send_signal(signal.SIGTERM)
        assert demo.wait(timeout=60) == 0
    # The service went down with the demo: the port is free again.
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        deadline = time.monotonic() + 30
        while True:
            try:
                probe.bind(("127.0.0.1", port))
                break
            except OSError:
                assert time.monotonic() < deadline, "the service outlived the demo"
                time.sleep(0.5)
