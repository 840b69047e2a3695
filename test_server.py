"""The test suite's entry point: `python test_server.py` runs every test in tests/ (the same as
`python -m pytest -q tests`); arguments pass through to pytest, e.g. `-k wyoming` or `-x`.

The tests live in tests/, one module per subject:

    test_settings    command line, environment, model bootstrap
    test_text        text normalization
    test_voices      voices, cloning, the voices folder and its API
    test_encoding    formats, streaming, speed
    test_engine      admission, cancellation, the scheduler, faults that end cleanly
    test_http_api    endpoints, errors, real HTTP, OpenAI compatibility, clients replayed
    test_hardening   limits, fuzzing, hostile clients, broken disks
    test_model       the real pocket-tts model: audio, batching, int8
    test_wyoming     Home Assistant's Wyoming protocol
    test_agents      voice-agent WebSockets (Gradium's and ElevenLabs' protocols)
    test_operations  metrics, readiness, replicas, lifecycle, deployment recipes
    test_page        the page at /, in a real browser

Shared fixtures are in tests/conftest.py, shared helpers in tests/helpers.py.
"""

import sys
from pathlib import Path

import pytest

if __name__ == "__main__":
    sys.exit(pytest.main(["-q", str(Path(__file__).resolve().parent / "tests"), *sys.argv[1:]]))
