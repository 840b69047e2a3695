"""Operations: Prometheus metrics, readiness, replicas behind HAProxy, start-up and
shutdown without leaks, and the deployment recipes.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
import yaml

import pocket_tts_server as srv
from tests.helpers import (
    LONG_TEXT,
    ROOT,
    LiveServer,
    StubSteps,
    busy_worker,
    duration,
    free_port,
    make_server,
    port_open,
    post_json,
    raw_request,
    stub_agents,
    wait_for,
    wav_bytes,
    ws_messages,
)
from tools.offline_model import saved_weight_config


def scrape(url: str, **headers) -> dict:
    """/metrics through prometheus_client's own parser: {(name, labels...): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    r = requests.get(f"{url}/metrics", headers=headers, timeout=10)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain")
    return {(s.name, *sorted(s.labels.items())): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}  # fmt: skip


class TestMetrics:
    def test_values_move_as_requests_run(self, stub):
        """Requests by route, status and format; first audio, duration, queue wait and step
        histograms; voice-cache lookups; the gauges read from the Engine."""
        live = LiveServer(make_server(stub, max_batch=2).app, threads=4)
        try:
            route = ("route", "/v1/audio/speech")
            before = scrape(live.url)
            ok = ("pocket_tts_requests_total", ("format", "wav"), route, ("status", "200"))
            assert before.get(ok, 0) == 0 and before[("pocket_tts_active_streams",)] == 0
            for _ in range(2):
                r = post_json(live.url, {"input": "Hello world.", "response_format": "wav",
                                         "stream": True})  # fmt: skip
                assert r.status_code == 200 and duration(r.content) > 0.1
            bad = post_json(live.url, {"input": "", "response_format": "wav"})
            assert bad.status_code == 400
            after = scrape(live.url)
        finally:
            live.close()
        assert after[ok] == 2
        refused = ("pocket_tts_requests_total", ("format", ""), route, ("status", "400"))
        assert after[refused] == 1  # refused before its format was read
        first = ("pocket_tts_time_to_first_audio_seconds_count", ("protocol", "http"))
        assert after[first] == 2
        assert after[("pocket_tts_request_duration_seconds_count", route)] >= 2
        assert after[("pocket_tts_queue_wait_seconds_count",)] >= 2
        assert (
            after[("pocket_tts_step_seconds_count",)] > before[("pocket_tts_step_seconds_count",)]
        )
        lookups = sum(v for k, v in after.items() if k[0] == "pocket_tts_voice_cache_lookups_total")
        assert lookups >= 2
        assert after[("pocket_tts_capacity",)] >= 1

    def test_refusals_by_reason_and_readiness_when_full(self, stub):
        """A full server counts its 429s, and /ready (and /health?ready=1) says 503 `full`, so a
        balancer sends the next request elsewhere; it is ready again once a place frees."""
        stub.frame_delay = 0.01
        with busy_worker(stub, max_queue=0) as (url, _):
            refused = post_json(url, {"input": "Hello."})
            assert refused.status_code == 429
            ready = requests.get(f"{url}/ready", timeout=10)
            assert ready.status_code == 503 and ready.json()["reason"] == "full"
            assert requests.get(f"{url}/health?ready=1", timeout=10).status_code == 503
            assert requests.get(f"{url}/health", timeout=10).status_code == 200  # cheap, as ever
            values = scrape(url)
            assert values[("pocket_tts_admission_refusals_total", ("reason", "queue_full"))] == 1
            assert values[("pocket_tts_active_streams",)] == 1
        live = LiveServer(make_server(stub, max_batch=1, max_queue=0).app)
        try:
            assert requests.get(f"{live.url}/ready", timeout=10).json() == {
                "ready": True, "reason": None, "active_streams": 0, "queue_depth": 0}  # fmt: skip
        finally:
            live.close()

    def test_draining_is_not_ready(self, stub):
        """After SIGTERM the server drains: /ready says 503 `draining` to connections still
        open (a balancer's kept-alive check) while running streams finish."""
        speech = make_server(stub)
        live = LiveServer(speech.app)
        try:
            with requests.Session() as session:  # one kept-alive connection, as a balancer's
                assert session.get(f"{live.url}/ready", timeout=10).status_code == 200
                srv.drain_then_exit(live.server, speech, 5.0)
                answer = session.get(f"{live.url}/ready", timeout=10)
            assert answer.status_code == 503 and answer.json()["reason"] == "draining"
        finally:
            live.thread.join(timeout=10)
            srv.close_http(live.server)
        assert not live.thread.is_alive()  # drained, then it stopped serving

    def test_metrics_key_and_the_api_key(self, stub):
        """/metrics is open as /health is, even under --api_key; --metrics_key closes it."""
        client = make_server(stub, api_key="k").app.test_client()
        assert client.get("/metrics").status_code == 200
        client = make_server(stub, api_key="k", metrics_key="m").app.test_client()
        refused = client.get("/metrics", headers={"Authorization": "Bearer k"})
        assert refused.status_code == 401 and "metrics_key" in refused.json["error"]["message"]
        assert client.get("/metrics", headers={"Authorization": "Bearer m"}).status_code == 200

    def test_protocol_sessions_and_their_first_audio(self, stub):
        """WebSocket (and Wyoming) sessions: open now, opened in all; each unit's first audio."""
        from websockets.asyncio.client import connect

        with stub_agents(stub) as agents:
            registry = agents.engine.metrics.registry

            def value(name, **labels):
                return registry.get_sample_value(name, labels) or 0

            async def run():
                async with connect(f"{agents.url}/api/speech/tts") as ws:
                    await ws.send(json.dumps({"type": "setup", "voice_id": "alba"}))
                    await ws.recv()
                    assert value("pocket_tts_sessions", protocol="websocket") == 1
                    await ws.send(json.dumps({"type": "text", "text": "Hello world."}))
                    await ws.send(json.dumps({"type": "end_of_stream"}))
                    await ws_messages(ws)

            asyncio.run(run())
            assert wait_for(lambda: value("pocket_tts_sessions", protocol="websocket") == 0)
            assert value("pocket_tts_sessions_opened_total", protocol="websocket") == 1
            assert value("pocket_tts_time_to_first_audio_seconds_count", protocol="websocket") == 1


HAPROXY = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")


def loopback_haproxy_config(port: int, servers: list[int]) -> str:
    """deploy/haproxy.cfg (compose's) for replicas on loopback: its checks and balancing, with
    this port, these servers instead of Docker's DNS, and a stats page to read."""
    text = (ROOT / "deploy" / "haproxy.cfg").read_text()
    text = re.sub(r"\nresolvers docker\n(?:    .*\n)+", "\n", text)
    text = text.replace(" init-addr none resolvers docker", "")
    text = text.replace("bind :8000", f"bind 127.0.0.1:{port}\n    stats enable\n"
                        "    stats uri /haproxy-stats")  # fmt: skip
    lines = "".join(f"    server r{i} 127.0.0.1:{p} check\n" for i, p in enumerate(servers))
    return re.sub(r"    server-template .*\n", lines, text)


class Replicas:
    """N server processes on loopback sharing `tmp/voices` and `tmp/cache`, behind HAProxy."""

    def __init__(self, tmp: Path, config: Path, reference: Path, count: int):
        self.ports, self.procs = [free_port() for _ in range(count)], [None] * count
        self.command = lambda port: [
            sys.executable, str(ROOT / "pocket_tts_server.py"), "--model_path", str(config),
            "--port", str(port), "--default_voice", str(reference), "--voices_dir",
            str(tmp / "voices"), "--cache_dir", str(tmp / "cache"), "--max_batch", "8"]  # fmt: skip
        self.urls = [f"http://127.0.0.1:{p}" for p in self.ports]
        for i in range(count):
            self.start(i, wait=False)
        assert all(wait_for(lambda p=p: port_open(p), timeout=120) for p in self.ports)
        self.port = free_port()
        (tmp / "haproxy.cfg").write_text(loopback_haproxy_config(self.port, self.ports))
        self.haproxy = subprocess.Popen([HAPROXY, "-f", str(tmp / "haproxy.cfg")],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        self.url = f"http://127.0.0.1:{self.port}"
        assert wait_for(lambda: self.up() == set(range(count)), timeout=30)

    def start(self, i: int, wait: bool = True):
        self.procs[i] = subprocess.Popen(self.command(self.ports[i]), stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL)  # fmt: skip
        if wait:
            assert wait_for(lambda: port_open(self.ports[i]), timeout=120)

    def up(self) -> set[int]:
        """The replicas HAProxy sends requests to now (its stats, as CSV)."""
        with contextlib.suppress(requests.RequestException):
            rows = requests.get(f"{self.url}/haproxy-stats;csv", timeout=5).text.splitlines()
            return {int(r.split(",")[1][1:]) for r in rows
                    if r.startswith("replicas,r") and r.split(",")[17].startswith("UP")}  # fmt: skip
        return set()

    def close(self):
        self.haproxy.kill()
        for proc in self.procs:
            proc.kill()
        for proc in [self.haproxy, *self.procs]:
            proc.wait(timeout=10)


@pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (.ci/run installs it)")
class TestReplicas:
    def test_three_replicas_behind_haproxy(self, tmp_path, tokenizer_path, reference):
        """Issue #23: uploads are seen and spoken by every replica; one name uploaded on two
        replicas at once has one winner and a 409; a delete is refused by all at once; 24
        concurrent streams spread over the replicas with nothing lost; a replica killed -9 mid-
        stream cuts that stream short (never a hang), leaves the balancer within its checks while
        requests keep succeeding, and rejoins once restarted."""
        replicas = Replicas(tmp_path, saved_weight_config(tmp_path, tokenizer_path), reference, 3)
        try:
            self.check_shared_voices(replicas)
            self.check_concurrent_streams(replicas)
            self.check_kill_and_rejoin(replicas)
        finally:
            replicas.close()

    @staticmethod
    def check_shared_voices(replicas: Replicas):
        def looked_up(replicas) -> dict[str, float]:
            """Voice-state lookups of all replicas, by where the state came from."""
            values = [scrape(url) for url in replicas.urls]
            return {result: sum(v.get(("pocket_tts_voice_cache_lookups_total",
                                       ("result", result)), 0) for v in values)
                    for result in ("memory", "disk", "encoded")}  # fmt: skip

        before = looked_up(replicas)
        files = {"file": ("v.wav", wav_bytes(220, seconds=2.0))}
        r = requests.post(f"{replicas.url}/v1/voices", data={"name": "Shared"}, files=files,
                          timeout=60)  # fmt: skip
        assert r.status_code == 201
        for url in replicas.urls:  # listed and spoken by each, at once
            assert "Shared" in {v["id"] for v in requests.get(f"{url}/v1/voices").json()["data"]}
            spoken = post_json(url, {"input": "Hi.", "voice": "Shared", "response_format": "wav"})
            assert spoken.status_code == 200 and duration(spoken.content) > 0.1
        after = looked_up(replicas)  # one encoding, then one shared cache entry read
        assert after["encoded"] - before["encoded"] == 1  # by the replica that took the upload
        assert after["disk"] - before["disk"] >= 2  # the two others found it on the volume

        recording = wav_bytes(260, seconds=2.0)  # made once: the helper's file is shared

        def upload(url, out):
            out.append(requests.post(f"{url}/v1/voices", data={"name": "Twice"}, timeout=60,
                                     files={"file": ("t.wav", recording)}))  # fmt: skip

        answers: list = []
        racers = [threading.Thread(target=upload, args=(u, answers)) for u in replicas.urls[:2]]
        [t.start() for t in racers]
        [t.join() for t in racers]
        assert sorted(a.status_code for a in answers) == [201, 409]
        assert requests.delete(f"{replicas.urls[0]}/v1/voices/Shared").status_code == 200
        for url in replicas.urls[1:]:  # no replica speaks it from memory
            refused = post_json(url, {"input": "Hi.", "voice": "Shared"})
            assert refused.status_code == 400 and refused.json()["error"]["code"] == (
                "voice_not_found"
            )

    @staticmethod
    def check_concurrent_streams(replicas: Replicas):
        results: list = []

        def listen(i):
            body = {"input": f"Hello number {i}.", "response_format": "wav", "stream": True}
            results.append(requests.post(f"{replicas.url}/v1/audio/speech", json=body, timeout=120))

        started = time.monotonic()
        threads = [threading.Thread(target=listen, args=(i,)) for i in range(24)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        wall = time.monotonic() - started
        assert [r.status_code for r in results] == [200] * 24
        audio = sum(duration(r.content) for r in results)
        served = [scrape(url).get(("pocket_tts_time_to_first_audio_seconds_count",
                                   ("protocol", "http")), 0) for url in replicas.urls]  # fmt: skip
        assert all(n > 0 for n in served), served  # least connections spread them
        print(
            f"\n24 streams on 3 replicas: {audio:.1f} s of audio in {wall:.1f} s "
            f"(aggregate {audio / wall:.1f}x real time); streams per replica {served}"
        )

    @staticmethod
    def check_kill_and_rejoin(replicas: Replicas):
        cut = requests.post(f"{replicas.url}/v1/audio/speech", stream=True, timeout=60,
                            json={"input": LONG_TEXT, "response_format": "pcm", "stream": True})  # fmt: skip
        parts = cut.iter_content(chunk_size=None)
        got = len(next(parts))
        victim = next(i for i, url in enumerate(replicas.urls)
                      if requests.get(f"{url}/health").json()["active_streams"])  # fmt: skip
        out: list[float] = []

        def watch():  # when the balancer stops sending to the killed replica
            while victim in replicas.up() and time.monotonic() - killed < 20:
                time.sleep(0.05)
            out.append(time.monotonic() - killed)

        replicas.procs[victim].kill()
        killed = time.monotonic()
        watcher = threading.Thread(target=watch)
        watcher.start()
        with contextlib.suppress(requests.RequestException):
            for part in parts:  # a truncated body, never a hang
                got += len(part)
        assert time.monotonic() - killed < 30
        for _ in range(6):  # meanwhile, new requests keep succeeding
            assert post_json(replicas.url, {"input": "Still here."}).status_code == 200
        watcher.join()
        assert out[0] < 5.0  # checks every 0.5 s, down after 2 failures
        restarted = time.monotonic()
        replicas.start(victim)
        assert wait_for(lambda: victim in replicas.up(), timeout=60)
        print(f"killed replica out of the balancer after {out[0]:.1f} s; rejoined "
              f"{time.monotonic() - restarted:.1f} s after its restart")  # fmt: skip


class TestLifecycle:
    def test_twenty_servers_built_and_shut_down_leak_no_thread_or_descriptor(self, stub, tmp_path):
        """Issue #24: every thread, socket and encoder a server starts (the scheduler and its
        Mimi thread, waitress, Wyoming's and the WebSockets' loops and pools) is stopped or closed
        on shutdown; a stream cut short closes its encoder."""

        def one_server():
            settings = srv.Settings(model_path="stub", voices_dir=str(tmp_path / "voices"),
                                    cache_dir=str(tmp_path / "cache"))  # fmt: skip
            speech = srv.build_server(settings, model=stub, steps=StubSteps(stub))
            live = LiveServer(speech.app, settings)
            service = srv.Service(settings, speech.engine)
            protocols = [srv.WyomingServer(service, "127.0.0.1", 0),
                         srv.AgentServer(service, "127.0.0.1", 0)]  # fmt: skip
            cut = raw_request(live.url, {"input": LONG_TEXT, "stream": True})
            assert cut.recv(4096)
            cut.close()  # a client that leaves mid-stream
            r = post_json(live.url, {"input": "Hello.", "response_format": "mp3"})
            assert r.status_code == 200
            live.close()
            for protocol in protocols:
                protocol.close()
            speech.engine.close()

        def descriptors() -> int:
            return len(os.listdir("/proc/self/fd"))

        one_server()  # first use: imports, lazily made pools and caches
        gc.collect()
        threads, fds = threading.active_count(), descriptors()
        for _ in range(20):
            one_server()
        gc.collect()
        assert wait_for(lambda: threading.active_count() <= threads, timeout=10), [
            t.name for t in threading.enumerate()
        ]
        assert descriptors() <= fds + 2, os.listdir("/proc/self/fd")


class TestDeployRecipes:
    """The container recipes cannot be built or pulled here (no registry): they are parsed and
    checked against what the server really serves and what CI really runs."""

    def test_dockerfile_installs_as_ci_does_and_runs_the_module(self):
        dockerfile = (ROOT / "Dockerfile").read_text()
        ci = (ROOT / ".ci" / "run").read_text()
        install = "python -m pip install --quiet --disable-pip-version-check -r requirements.txt"
        assert install in ci and install in dockerfile
        assert "COPY pocket_tts_server.py pocket-tts-logo.png" in dockerfile
        assert '"pocket_tts_server.py"' in dockerfile and "ARG TORCH_INDEX" in dockerfile
        for name in re.findall(r"POCKET_TTS_(\w+)=", dockerfile):
            assert hasattr(srv.Settings(), name.lower()), name

    def test_compose_replicas_share_one_volume_behind_haproxy(self):
        compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
        tts, proxy = compose["services"]["tts"], compose["services"]["haproxy"]
        assert tts["deploy"]["replicas"] >= 2 and tts["volumes"] == ["shared:/data"]
        assert "shared" in compose["volumes"]
        assert "./deploy/haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro" in proxy["volumes"]
        assert "server-template tts" in (ROOT / "deploy" / "haproxy.cfg").read_text()
        if HAPROXY:
            checked = subprocess.run([HAPROXY, "-c", "-f", str(ROOT / "deploy" / "haproxy.cfg")],
                                     capture_output=True, text=True)  # fmt: skip
            assert checked.returncode == 0, checked.stderr

    def test_kubernetes_probes_volume_and_autoscaler_name_what_the_server_serves(self, stub):
        docs = {d["kind"]: d for d in yaml.safe_load_all(
            (ROOT / "deploy" / "kubernetes.yaml").read_text())}  # fmt: skip
        assert docs["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]
        pod = docs["Deployment"]["spec"]["template"]["spec"]
        [container] = pod["containers"]
        assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
        assert container["livenessProbe"]["httpGet"]["path"] == "/health"
        claim = pod["volumes"][0]["persistentVolumeClaim"]["claimName"]
        assert claim == docs["PersistentVolumeClaim"]["metadata"]["name"]
        labels = docs["Deployment"]["spec"]["selector"]["matchLabels"]
        assert docs["Service"]["spec"]["selector"] == labels
        client = make_server(stub).app.test_client()  # the paths and metric names exist
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            assert client.get(container[probe]["httpGet"]["path"]).status_code == 200
        exposed = client.get("/metrics").get_data(as_text=True)
        for metric in docs["HorizontalPodAutoscaler"]["spec"]["metrics"]:
            assert f"\n{metric['pods']['metric']['name']} " in exposed
        for env in container["env"]:
            assert hasattr(srv.Settings(), env["name"].removeprefix("POCKET_TTS_").lower())
