"""Command line, environment and model bootstrap."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

import pocket_tts_server as srv
from tests.helpers import ROOT, free_port


class TestSettings:
    def test_defaults_are_private_and_sane(self):
        s = srv.parse_settings([], environ={})
        assert (s.host, s.port, s.model_path, s.stream) == ("127.0.0.1", 8000, "english", False)
        assert (s.device, s.max_input_chars, s.api_key) == ("auto", 4096, None)

    def test_both_spellings_and_flags(self):
        a = srv.parse_settings(
            ["--model_path", "french", "--max-input-chars", "10", "--stream"], {}
        )
        b = srv.parse_settings(
            ["--model-path", "french", "--max_input_chars", "10", "--stream"], {}
        )
        assert a == b and a.model_path == "french" and a.max_input_chars == 10 and a.stream

    def test_environment_variables(self):
        env = {
            "POCKET_TTS_PORT": "9000",
            "POCKET_TTS_STREAM": "true",
            "POCKET_TTS_API_KEY": "k",
            "POCKET_TTS_QUANTIZE": "1",
            "POCKET_TTS_DEVICE": "cpu",
        }
        s = srv.parse_settings([], environ=env)
        assert (s.port, s.stream, s.api_key, s.quantize, s.device) == (9000, True, "k", True, "cpu")
        assert s.precision == "int8"  # --quantize is an alias
        assert srv.parse_settings(["--no-stream", "--port", "1"], environ=env).stream is False

    def test_precision(self):
        assert srv.parse_settings([], environ={}).precision == "auto"
        assert srv.parse_settings(["--precision", "float32"], environ={}).precision == "float32"
        assert srv.parse_settings(["--quantize"], environ={}).precision == "int8"
        env = {"POCKET_TTS_PRECISION": "int8"}
        assert srv.parse_settings([], environ=env).precision == "int8"
        with pytest.raises(SystemExit):
            srv.parse_settings(["--precision", "int4"], environ={})

    @pytest.mark.parametrize(
        "argv", [["--device", "tpu"], ["--port", "x"], ["--max_input_chars", "0"]]
    )
    def test_bad_flags_exit(self, argv):
        with pytest.raises(SystemExit):
            srv.parse_settings(argv, environ={})

    def test_model_sources(self, tmp_path):
        assert srv.model_source("english") == {"language": "english"}
        assert srv.model_source("hf://kyutai/x/cfg.yaml") == {"config": "hf://kyutai/x/cfg.yaml"}
        cfg = tmp_path / "c.yaml"
        cfg.write_text("x: 1")
        assert srv.model_source(str(cfg)) == {"config": str(cfg.resolve())}
        with pytest.raises(srv.ModelLoadError, match="french"):
            srv.model_source("klingon")
        with pytest.raises(srv.ModelLoadError, match="no such YAML"):
            srv.model_source(str(tmp_path / "missing.yaml"))

    @staticmethod
    def start_offline(tmp_path, *flags: str) -> subprocess.CompletedProcess:
        """The server as a user starts it, with the Hugging Face Hub unreachable."""
        env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path))
        command = [sys.executable, str(ROOT / "pocket_tts_server.py"), "--model_path", "english"]
        return subprocess.run(command + list(flags), capture_output=True, text=True, env=env,
                              timeout=120)  # fmt: skip

    def test_unreachable_hub_exits_with_actionable_message(self, tmp_path):
        proc = self.start_offline(tmp_path, "--port", str(free_port()))
        assert proc.returncode == 2
        assert "Could not load the pocket-tts model 'english'" in proc.stderr
        assert "--model_path" in proc.stderr and "Hugging Face Hub" in proc.stderr
        assert "Traceback" not in proc.stderr

    @pytest.mark.parametrize("flag", ["--port", "--wyoming_port", "--ws_port"])
    def test_a_port_in_use_is_said_before_the_model_loads(self, tmp_path, flag):
        """Each port is checked first: a taken one is one line and exit code 2, not a traceback
        after a model download (here the Hub is unreachable, so loading would fail otherwise)."""
        with socket.socket() as held:
            held.bind(("127.0.0.1", 0))
            held.listen()
            taken = str(held.getsockname()[1])
            flags = ["--port", str(free_port())] if flag != "--port" else []
            proc = self.start_offline(tmp_path, *flags, flag, taken)
        name = {"--port": "HTTP", "--wyoming_port": "Wyoming", "--ws_port": "WebSocket"}[flag]
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert f"error: the {name} port 127.0.0.1:{taken} cannot be opened" in proc.stderr

    def test_cuda_request_without_gpu_is_refused(self):
        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU")
        with pytest.raises(srv.ModelLoadError, match="CUDA"):
            srv.pick_device("cuda")
        assert srv.pick_device("auto") == "cpu"
