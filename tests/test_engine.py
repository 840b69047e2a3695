"""The engine: admission and its queue, cancellation, one owner of the model, faults that
end cleanly, capacity, and the unbatched fallback (stub model, production scheduler).
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import requests

import pocket_tts_server as srv
from tests.helpers import (
    CODEC_SLACK,
    CONTENT_TYPES,
    LONG_TEXT,
    LiveServer,
    assert_openai_error,
    busy_worker,
    decode,
    duration,
    expected_seconds,
    generate_in_threads,
    make_server,
    post_json,
    raw_request,
    speech,
    wait_for,
    wav_bytes,
)
from tools.offline_model import SR


class TestConcurrencyAndCancellation:
    def test_concurrent_requests_never_mix_audio(self, stub, reference):
        stub.frame_delay = 0.005
        live = LiveServer(make_server(stub, max_batch=4).app, threads=8)
        voices = {"alba": 300, "marius": 400, "estelle": 500, str(reference): 250}
        results = {}

        def run(voice):
            r = post_json(
                live.url,
                {
                    "input": "Hello world. This is a test.",
                    "voice": voice,
                    "response_format": "wav",
                    "stream": voice == "marius",
                },
            )
            results[voice] = r

        threads = [threading.Thread(target=run, args=(v,)) for v in voices]
        [t.start() for t in threads]
        [t.join() for t in threads]
        live.close()
        for voice, freq in voices.items():
            samples, rate = decode(results[voice].content)
            spectrum = np.abs(np.fft.rfft(samples)) ** 2
            freqs = np.fft.rfftfreq(samples.size, 1 / rate)
            own = spectrum[np.abs(freqs - freq) < 15].sum() / spectrum.sum()
            assert own > 0.97, (voice, own)  # nothing of another request's voice leaked in
            assert abs(samples.size / rate - 3 * 1920 * 8 / SR) < 0.01

    def test_full_queue_is_429_with_retry_after_and_health_shows_it(self, stub):
        stub.frame_delay = 0.02
        with busy_worker(stub, max_queue=1) as (url, blocker):
            waiter = threading.Thread(target=post_json, args=(url, {"input": "Hi."}))
            waiter.start()
            assert wait_for(lambda: requests.get(f"{url}/health").json()["queue_depth"] == 1)
            health = requests.get(f"{url}/health").json()
            assert health["active_streams"] == 1 and health["max_batch"] == 1
            r = post_json(url, {"input": "Hi."})
            assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
            err = r.json()["error"]
            assert err["code"] == "rate_limit_exceeded"
            assert set(err) == {"message", "type", "param", "code"}
            blocker.close()
            waiter.join(timeout=10)
            assert wait_for(lambda: requests.get(f"{url}/health").json()["active_streams"] == 0)
            assert requests.get(f"{url}/health").json()["recent_rtf"] > 0

    def test_openai_sdk_retries_a_429(self, stub):
        import openai

        stub.frame_delay = 0.01
        with busy_worker(stub, "Hello world. " * 3, max_queue=0) as (url, _):
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=5)
            audio = client.audio.speech.create(
                model="tts-1", voice="alloy", input="Hi.", response_format="wav"
            )
            assert duration(audio.content) > 0.5  # it got through once the worker was free

    def test_queue_timeout_is_503(self, stub):
        stub.frame_delay = 0.02
        with busy_worker(stub, queue_timeout=0.3) as (url, _):
            r = post_json(url, {"input": "Hi."})
            assert r.status_code == 503 and "Retry-After" in r.headers
            assert r.json()["error"]["code"] == "server_busy"

    @pytest.mark.parametrize("stream", [True, False])
    def test_abandoned_request_stops_and_frees_the_worker(self, stub, stream):
        stub.frame_delay = 0.02
        live = LiveServer(make_server(stub, max_batch=1).app, threads=8)
        try:
            sock = raw_request(
                live.url, {"input": LONG_TEXT, "response_format": "wav", "stream": stream}
            )
            assert wait_for(lambda: len(stub.generated) >= 1)
            time.sleep(0.2)
            sock.close()  # the client hangs up mid-generation
            t0 = time.monotonic()
            r = post_json(live.url, {"input": "Hi.", "response_format": "pcm"})
            served = time.monotonic() - t0
            assert r.status_code == 200
            assert served < 1.0, served  # the abandoned one would have run ~10 s more
            assert stub.stopped[0] is True and len(stub.generated) <= 3
        finally:
            live.close()


class TestLoad:
    def test_many_concurrent_clients(self, stub):
        """Loopback only, bounded in count and time: every 200 is valid audio, the rest 429 JSON."""
        stub.frame_delay = 0.002
        server = make_server(stub, max_batch=2, max_queue=4)
        live = LiveServer(
            server.app, threads=server.engine.max_batch + server.settings.max_queue + 8
        )
        text = "Hello world. This is a test."
        want = expected_seconds(stub, server.engine, text)
        outcomes, lock = [], threading.Lock()
        deadline = time.monotonic() + 60

        def client(i):
            for j in range(4):
                if time.monotonic() > deadline:
                    return
                fmt = list(CONTENT_TYPES)[(i + j) % 6]
                r = post_json(
                    live.url, {"input": text, "response_format": fmt, "stream": (i + j) % 2 == 0}
                )
                if r.status_code == 200:
                    got = duration(r.content, fmt)
                    ok = want - 0.002 <= got <= want + CODEC_SLACK[fmt]
                else:
                    ok = r.status_code == 429 and "error" in r.json() and "Retry-After" in r.headers
                with lock:
                    outcomes.append((r.status_code, ok, fmt))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        live.close()
        assert len(outcomes) == 64
        assert all(ok for _, ok, _ in outcomes), [o for o in outcomes if not o[1]]
        assert sum(status == 200 for status, _, _ in outcomes) >= 16


class TestEngine:
    """Issue #18 through the production BatchScheduler and Admission (StubSteps for the model)."""

    @pytest.fixture
    def engine(self, stub):
        server = make_server(stub, max_batch=4)
        yield server.engine
        server.engine.close()

    @staticmethod
    def voice(stub):
        return stub.state(300.0)

    def test_routes_run_the_batch_scheduler_and_one_thread_touches_the_model(self, stub):
        """Concurrent HTTP requests: every prefill, step, join and leave ran on the scheduler's
        thread, every decoding on its Mimi thread; the request threads only waited."""
        stub.frame_delay = 0.005
        server = make_server(stub, max_batch=4)
        live = LiveServer(server.app, threads=8)
        try:
            assert requests.get(f"{live.url}/health").json()["batched"] is True
            threads = [threading.Thread(target=post_json, args=(live.url, {
                "input": f"Hello number {i}.", "response_format": fmt, "stream": i % 2 == 0}))
                for i, fmt in enumerate(["wav", "mp3", "pcm", "flac", "opus", "aac"])]  # fmt: skip
            [t.start() for t in threads]
            [t.join() for t in threads]
        finally:
            live.close()
            server.engine.close()
        steps = server.engine.steps
        assert len(stub.generated) == 6
        assert {m: steps.threads[m] for m in ("prefill", "place", "step", "remove")} == {
            m: {"batch"} for m in ("prefill", "place", "step", "remove")
        }
        assert steps.threads["decode"] == {"mimi_0"}

    def test_a_failed_prefill_fails_only_its_own_request(self, stub, engine):
        """A pass with one bad row is retried row by row: the other rows of that pass speak in
        full, the bad one gets an error, and the next request succeeds."""
        engine.steps.prefill_failures = ["Poison."]
        texts = ["Hello world.", "Poison.", "This is a test.", "Numbers one two three!"]
        acquired = [engine.acquire() for _ in texts]  # admitted together: one gathered pass
        try:
            outcomes = generate_in_threads(engine, texts, self.voice(stub))
        finally:
            [release() for release in acquired]
        assert isinstance(outcomes[1][1], srv.GenerationFailed)
        for i in (0, 2, 3):
            assert outcomes[i][1] is None
            assert outcomes[i][0] == pytest.approx(stub.expected_frames(texts[i]) * 1920 / SR)
        assert engine.steps.threads["prefill"] == {"batch"}
        assert generate_in_threads(engine, ["Hello world."], self.voice(stub))[0][1] is None

    @pytest.mark.parametrize("stage", ["step", "decode", "deliver", "remove"])
    def test_a_fault_in_a_tick_fails_its_batch_within_a_second(self, stub, engine, stage):
        """Whatever raises in a tick, every stream of that batch gets an error within 1 s, its
        slots are freed, and the next request speaks in full."""
        stub.frame_delay = 0.01
        texts = [LONG_TEXT[:120], LONG_TEXT[:160], LONG_TEXT[:200]]

        def inject():
            assert wait_for(lambda: len(engine.scheduler.rows) == 3, timeout=10)
            time.sleep(0.1)
            engine.steps.fault = stage

        injector = threading.Thread(target=inject)
        injector.start()
        outcomes = generate_in_threads(engine, texts, self.voice(stub))
        injector.join()
        fault_at = engine.steps.fault_at
        assert fault_at is not None
        for audio_seconds, error, ended in outcomes.values():
            assert isinstance(error, srv.GenerationFailed)
            assert ("out of bounds" if stage == "deliver" else "injected") in str(error)
            assert ended - fault_at < 1.0 and audio_seconds > 0
        assert wait_for(lambda: not engine.scheduler.rows and not engine.steps.slots)
        (seconds, error, _) = generate_in_threads(engine, ["Hello world."], self.voice(stub))[0]
        assert error is None and seconds == pytest.approx(
            stub.expected_frames("Hello world.") * 0.08
        )

    def test_health_stays_fast_through_a_fault(self, stub):
        """Issue #19: while a fault fails the batch of three streams, /health answers in under
        100 ms (the median of five), and the next request is a 200 with its full length."""
        stub.frame_delay = 0.01
        server = make_server(stub, max_batch=4)
        live = LiveServer(server.app, threads=8)
        try:
            socks = [raw_request(live.url, {"input": LONG_TEXT[:200], "response_format": "pcm",
                                            "stream": True}) for _ in range(3)]  # fmt: skip
            assert wait_for(lambda: len(server.engine.scheduler.rows) == 3, timeout=10)
            server.engine.steps.fault = "step"
            timings = []
            for _ in range(5):
                t0 = time.monotonic()
                assert requests.get(f"{live.url}/health", timeout=5).status_code == 200
                timings.append(time.monotonic() - t0)
            assert sorted(timings)[2] < 0.1, timings
            assert wait_for(lambda: server.engine.active == 0, timeout=5)
            r = post_json(live.url, {"input": "Hello world.", "response_format": "pcm"})
            assert r.status_code == 200
            assert len(r.content) / 2 == stub.expected_frames("Hello world.") * 1920
            [sock.close() for sock in socks]
        finally:
            live.close()
            server.engine.close()

    def test_a_row_that_cannot_join_fails_alone(self, stub, engine):
        """A failure placing a prefilled row (its slot) fails that row; the batch goes on."""
        stub.frame_delay = 0.01
        texts = [LONG_TEXT[:120], LONG_TEXT[:120], "Hello world."]

        def join_late():
            assert wait_for(lambda: len(engine.scheduler.rows) == 2, timeout=10)
            engine.steps.fault = "place"

        injector = threading.Thread(target=join_late)
        injector.start()
        outcomes = generate_in_threads(engine, texts, self.voice(stub), delays=[0, 0, 0.3])
        injector.join()
        assert isinstance(outcomes[2][1], srv.GenerationFailed)
        for i in (0, 1):
            want = sum(stub.expected_frames(c) for c in engine.split(texts[i])) * 0.08
            assert outcomes[i][1] is None and outcomes[i][0] == pytest.approx(want)

    def test_closing_the_engine_ends_every_stream_and_its_threads(self, stub):
        stub.frame_delay = 0.01
        engine = make_server(stub, max_batch=2).engine
        closer = threading.Thread(target=lambda: (
            wait_for(lambda: engine.scheduler.rows, timeout=10), engine.close()))  # fmt: skip
        closer.start()
        outcomes = generate_in_threads(engine, [LONG_TEXT, LONG_TEXT], self.voice(stub))
        closer.join()
        assert all(isinstance(error, srv.GenerationFailed) for _, error, _ in outcomes.values())
        assert not engine.scheduler.thread.is_alive()
        with pytest.raises(srv.GenerationFailed, match="stopped"):
            list(engine.generate("Hello.", self.voice(stub), threading.Event()))

    def test_a_scheduler_thread_that_dies_fails_its_readers_within_a_second(self, stub):
        """Even what the loop does not catch (here SystemExit from a step) ends every waiting
        request with an error at once, and later ones are refused (a reader that still waited
        would notice the thread is gone within a second)."""
        stub.frame_delay = 0.01
        engine = make_server(stub, max_batch=2).engine
        original = engine.steps.step

        def die(*args):
            if len(engine.scheduler.rows) == 2:
                engine.steps.fault_at = time.monotonic()
                raise SystemExit
            return original(*args)

        engine.steps.step = die
        outcomes = generate_in_threads(engine, [LONG_TEXT, LONG_TEXT], self.voice(stub))
        assert not engine.scheduler.thread.is_alive()
        for _, error, ended in outcomes.values():
            assert isinstance(error, srv.GenerationFailed) and "stopped" in str(error)
            assert ended - engine.steps.fault_at < 1.0
        with pytest.raises(srv.GenerationFailed, match="stopped"):  # and no one waits from now on
            list(engine.generate("Hello.", self.voice(stub), threading.Event()))

    def test_sentence_splitting_is_linear_and_splits_as_pocket_tts(self, stub, engine):
        """Issue #19: pocket-tts's decimal check decoded the whole text per boundary (100k
        characters took 46 s). The windowed check splits every text the same way, in linear
        time."""
        import random

        from pocket_tts.models import text_chunking

        tokenizer, rng = stub.tokenizer, random.Random(0)
        words = ["3.5", "It costs 4. 5 apples.", "Pi is 3.14159.", "Hello.", "world 12.", "7.",
                 "x.y", "Yes!", "No?", "a 1.2.3 b.", "(1.)", "9 .5"]  # fmt: skip
        quadratic = text_chunking._is_decimal_period_boundary.__wrapped__
        for _ in range(200):
            text = " ".join(rng.choice(words) for _ in range(rng.randint(1, 30)))
            ours = text_chunking.split_into_best_sentences(tokenizer, text, 50, False, False)
            text_chunking._is_decimal_period_boundary = quadratic
            theirs = text_chunking.split_into_best_sentences(tokenizer, text, 50, False, False)
            srv.linear_sentence_splitting()
            assert ours == theirs, text
        t0 = time.monotonic()
        chunks = engine.split("The value is 3.5 today. " * 4200)  # 100,800 characters
        assert time.monotonic() - t0 < 10 and len(chunks) > 100

    def test_a_burst_of_uploads_never_starves_health(self, stub, voices_dir):
        """Issue #19: 45 concurrent uploads held every server thread while they waited to be
        encoded (one at a time), and /health waited 11.6 s. Encodings beyond the queue are 429s
        with Retry-After at once."""
        stub.encode_delay = 0.2
        server = make_server(stub, voices_dir=str(voices_dir), max_batch=4, max_queue=4)
        threads = server.engine.max_batch + server.settings.max_queue + 8  # as production
        live = LiveServer(server.app, threads=threads)
        statuses, health = [], []

        def send(i):
            files = {"file": ("v.wav", wav_bytes(200 + 7 * i))}
            r = requests.post(f"{live.url}/v1/voices", data={"name": f"v{i}"}, files=files)
            statuses.append((r.status_code, r.headers.get("Retry-After")))

        try:
            uploads = [threading.Thread(target=send, args=(i,)) for i in range(30)]
            [t.start() for t in uploads]
            time.sleep(0.3)
            for _ in range(5):
                t0 = time.monotonic()
                assert requests.get(f"{live.url}/health", timeout=10).status_code == 200
                health.append(time.monotonic() - t0)
            [t.join(timeout=60) for t in uploads]
        finally:
            live.close()
        assert max(health) < 1.0, health
        assert {code for code, _ in statuses} == {201, 429}
        assert all(after and int(after) >= 1 for code, after in statuses if code == 429)
        assert sum(code == 201 for code, _ in statuses) >= srv.ENCODING_QUEUE

    def test_queued_requests_start_in_arrival_order(self, stub):
        """One place: requests that queue behind it are served first come, first served."""
        stub.frame_delay = 0.01
        with busy_worker(stub, "Hello world. " * 3) as (url, blocker):
            texts = ["One.", "Two.", "Three.", "Four."]
            threads = []
            for text in texts:
                threads.append(threading.Thread(target=post_json, args=(url, {"input": text})))
                threads[-1].start()
                time.sleep(0.05)
            health = requests.get(f"{url}/health").json()
            assert health["queue_depth"] == 4 and health["can_start"] == 0
            [t.join(timeout=30) for t in threads]
        assert stub.generated[-4:] == texts

    def test_health_says_how_many_can_start(self, stub):
        server = make_server(stub, max_batch=3)
        client = server.app.test_client()
        health = client.get("/health").json
        assert health["capacity"] == 3 and health["can_start"] == 3
        release = server.engine.acquire()  # a request holds a place
        health = client.get("/health").json
        assert health["active_streams"] == 1 and health["can_start"] == 2
        release()
        assert client.get("/health").json["can_start"] == 3
        server.engine.close()

    def test_retry_after_follows_the_queue_position_and_stream_time(self):
        """A place frees every (typical request time / capacity) seconds."""
        capacity = srv.Capacity(0.08, 0, 2)
        admission = srv.Admission(capacity, max_queue=1, queue_timeout=5)
        held = [admission.acquire(), admission.acquire()]
        waiter = threading.Thread(target=lambda: admission.acquire()())
        waiter.start()
        assert wait_for(lambda: len(admission.queue) == 1)
        with pytest.raises(srv.Busy) as refused:
            admission.acquire()
        assert refused.value.status == 429
        assert refused.value.retry_after == 5  # no history: 5 s a request, 2 places, 2nd in line
        for _ in range(3):
            admission.finished(audio_seconds=6.0, wall_seconds=8.0)
        assert admission.retry_after(1) == 4 and admission.retry_after(5) == 20
        held[0]()
        waiter.join(timeout=5)
        assert not waiter.is_alive() and admission.active == 1
        held[1]()
        assert admission.active == 0

    def test_a_waiter_that_gives_up_keeps_no_place(self):
        capacity = srv.Capacity(0.08, 0, 1)
        admission = srv.Admission(capacity, max_queue=4, queue_timeout=0.3)
        release = admission.acquire()
        with pytest.raises(srv.Busy) as timed_out:
            admission.acquire()
        assert timed_out.value.status == 503 and timed_out.value.retry_after >= 1
        with pytest.raises(srv.ClientGone):
            admission.acquire(cancelled=lambda: True)
        assert not admission.queue and admission.active == 1
        release()
        release()  # idempotent
        assert admission.active == 0
        admission.acquire()
        assert admission.active == 1


class TestCapacity:
    """Admission's controller: calibrated step times scaled by a smoothed load, hysteresis."""

    TABLE = {1: 0.02, 2: 0.03, 4: 0.05, 8: 0.09}  # seconds per step, by batch size

    def capacity(self, margin=1.1) -> srv.Capacity:
        capacity = srv.Capacity(0.08, margin, 16)
        capacity.calibrate(self.TABLE)
        return capacity

    def test_the_largest_batch_that_fits_the_frame_with_its_margin(self):
        capacity = self.capacity()
        assert capacity.value == 6  # 6 streams: 70 ms x 1.1 <= 80 ms; 7: 80 ms x 1.1 > 80 ms
        for n in range(1, capacity.value + 1):
            assert capacity.expected(n) * 1.1 <= 0.08

    def test_noisy_ticks_never_make_it_swing(self):
        capacity, seen = self.capacity(), set()
        for i in range(2000):  # +-30 % noise around the calibrated times
            capacity.observe(6, self.TABLE[4] * 1.4 * (0.7 if i % 2 else 1.3))
            seen.add(capacity.value)
        assert seen == {6}

    def test_a_slower_machine_lowers_it_at_once_and_steadily(self):
        capacity, values = self.capacity(), []
        for _ in range(300):  # every tick 1.5 x its calibrated time (encoders, another process)
            capacity.observe(4, 0.05 * 1.5)
            values.append(capacity.value)
        assert values == sorted(values, reverse=True)  # down only, never back up meanwhile
        assert values[-1] == 3  # 40 ms x 1.5 x 1.1 <= 80 ms; 4 streams would not fit
        assert capacity.load == pytest.approx(1.5, rel=0.01)
        for _ in range(300):  # the machine is back to normal: so is the capacity, nearly
            capacity.observe(4, 0.05)
        assert capacity.load == pytest.approx(1.0, rel=0.01)
        assert capacity.value == 5  # 6 fits, but not with the 5 % it must spare to be added

    def test_throughput_first_admits_up_to_max_batch(self):
        assert self.capacity(margin=0).value == 16
        assert srv.Capacity(0.08, 1.1, 5).value == 5  # nothing calibrated: --max_batch


class TestUnbatchedFallback:
    """A pocket-tts whose internals changed runs its own generate_audio_stream per request."""

    @pytest.fixture
    def fallback(self, stub):
        return make_server(stub, batched=False)

    def test_it_is_served_one_stream_per_request(self, fallback, stub):
        assert fallback.engine.scheduler is None
        client = fallback.app.test_client()
        assert client.get("/health").json["batched"] is False
        for fmt in ("wav", "mp3", "opus"):
            r = speech(client, input="Hello world. This is a test.", response_format=fmt)
            want = expected_seconds(stub, fallback.engine, "Hello world. This is a test.")
            assert want - 0.002 <= duration(r.data) <= want + CODEC_SLACK[fmt]

    def test_a_failure_is_a_500_and_a_hang_up_stops_it(self, fallback, stub):
        stub.fail_after_frames = 2
        assert_openai_error(speech(fallback.app.test_client(), response_format="wav"), 500)
        stub.fail_after_frames, stub.frame_delay = None, 0.02
        live = LiveServer(fallback.app, threads=4)
        try:
            sock = raw_request(live.url, {"input": LONG_TEXT, "response_format": "pcm",
                                          "stream": True})  # fmt: skip
            assert sock.recv(4096)
            sock.close()
            assert wait_for(lambda: stub.stopped and fallback.engine.active == 0)
            assert stub.stopped[-1] is True
        finally:
            live.close()
