"""
The README's run command, ``make demo``, as a new user runs it: up to the
first successful answer to the curl command it prints, then stopped.
"""
from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.proxy import free_port

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_demo_answers_the_printed_curl_commands(tmp_path):
    port = free_port()
    demo = subprocess.Popen(
        ["make", "-s", "--no-print-directory", "demo", f"VENV={sys.prefix}",
         f"DEMO_DIR={tmp_path / 'demo'}", f"CERT_DIR={tmp_path}", f"PORT={port}"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )
    try:
        commands, output = [], []
        for line in demo.stdout:
            output.append(line)
            if line.strip().startswith("curl -k"):
                commands.append(shlex.split(line.strip()))
            if len(commands) == 2:
                break
        assert len(commands) == 2, "".join(output)

        answers = [_until_answered(command + ["-s", "-f"], demo) for command in commands]
    finally:
        os.killpg(demo.pid, signal.SIGTERM)
        demo.wait(30)

    prediction, segmentation = answers
    assert '"Lung volume (ml)"' in prediction
    assert '"segments"' in segmentation and '"className":"lung"' in segmentation
    assert (tmp_path / "zhiva.crt").exists() and (tmp_path / "zhiva.key").exists()


def _until_answered(command: list[str], demo: subprocess.Popen, limit: float = 300) -> str:
    deadline = time.monotonic() + limit
    while True:
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode == 0:
            return result.stdout
        if demo.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{command[2]} never answered: curl exit {result.returncode}")
        time.sleep(0.5)
