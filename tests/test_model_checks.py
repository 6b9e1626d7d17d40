"""Checks made before any model loads: here, a hub id that is not in the cache while the hub is unreachable
and ``HF_HUB_OFFLINE`` is unset (no network, the setting forgotten)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

HUB_MANIFEST = """\
version: 1
recipe: kontext-dev
defaults: {height: 32, width: 32, num_inference_steps: 2}
subjects:
  - name: dog
    class: dog
    references: [images/dog/00.jpg]
    prompts: ["a {class} in the snow"]
"""


class DeadNetwork:
    """A hub endpoint on loopback that takes each connection and drops it without a word, as a network
    that does not answer; `connections` counts the attempts."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:  # closed
                return
            self.connections += 1
            connection.close()

    def close(self) -> None:
        self.server.close()


def test_an_uncached_hub_model_without_network_is_one_line_after_one_request(make_project, tmp_path: Path):
    project = make_project(m=HUB_MANIFEST)
    network = DeadNetwork()
    env = {**os.environ, "HF_ENDPOINT": network.endpoint, "HF_HOME": str(tmp_path / "empty-hf-home")}
    env.pop("HF_HUB_OFFLINE")
    try:
        for command in ("validate", "gen"):
            network.connections = 0
            result = subprocess.run(
                [sys.executable, "-m", "squeeze_cli", command, str(project / "m.yaml")],
                capture_output=True,
                text=True,
                env=env,
                cwd=project,
                timeout=300,
            )
            assert result.returncode == 2, (command, result.stderr)
            # One quick request, not huggingface_hub's five retries with back-off (~40 s).
            assert network.connections == 1, (command, network.connections)
            errors = [line for line in result.stderr.splitlines() if "black-forest-labs" in line]
            assert len(errors) == 1, result.stderr
            assert "black-forest-labs/FLUX.1-Kontext-dev is not in the Hugging Face cache" in errors[0]
            assert "the hub is offline" in errors[0]
            assert "`hf download black-forest-labs/FLUX.1-Kontext-dev`" in errors[0]
            assert "HF_HUB_OFFLINE=1" in errors[0]
    finally:
        network.close()


def test_a_closed_hub_port_is_the_same_line(make_project, tmp_path: Path):
    """Nothing listening at all (connection refused), as `HF_ENDPOINT=http://127.0.0.1:9`."""
    project = make_project(m=HUB_MANIFEST)
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_HUB_OFFLINE")
    result = subprocess.run(
        [sys.executable, "-m", "squeeze_cli", "validate", "m.yaml"],
        capture_output=True,
        text=True,
        env=env,
        cwd=project,
        timeout=300,
    )
    assert result.returncode == 2
    assert "is not in the Hugging Face cache and the hub is offline" in result.stderr, result.stderr
