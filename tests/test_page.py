"""The page at /, in a real browser (Debian chromium driven by playwright) on the real model."""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import subprocess
from pathlib import Path

import av
import pytest
import requests

from tests.helpers import (
    ROOT,
    LiveServer,
    duration,
    free_port,
    library_seconds,
    make_server,
    port_open,
    server_command,
    wait_for,
    wav_bytes,
)
from tools.offline_model import CORPUS, SR, tone, write_audio

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--autoplay-policy=no-user-gesture-required",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--no-first-run",
]  # fmt: skip


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (.ci/run installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


AXE = Path(os.environ.get("AXE_JS", ROOT / ".ci/node_modules/axe-core/axe.min.js"))


# The page's own objects, reached from tests: the first sound and the end of each stream.
INSTRUMENT = """
  window.sounds = [];
  const start = player.start;
  player.start = function (entry, when, skip) {
    window.firstSound ??= performance.now();
    start.call(this, entry, when, skip);
    [...this.sources].at(-1).take = this.take.id;
  };
  const original = stream;
  window.stream = async (...args) => { await original(...args); window.streamDone = performance.now(); };
"""


def open_page(browser, url: str, **context):
    page = browser.new_page(accept_downloads=True, **context)
    page.errors = []
    page.on("pageerror", lambda exc: page.errors.append(str(exc)))
    page.add_init_script("""{
      const Real = window.AudioContext;  // count the page's audio contexts
      window.contexts = 0;
      window.AudioContext = class extends Real { constructor(o) { super(o); window.contexts++; } };
    }""")
    page.goto(url + "/")
    page.wait_for_function("document.querySelectorAll('#voice option').length > 0")
    page.evaluate(f"() => {{ {INSTRUMENT} }}")
    return page


def generate_in_page(page, text: str, fmt: str):
    """Generate and wait until the take is a result; return its row."""
    count = page.locator("#results li").count()
    page.fill("#text", text)
    page.select_option("#format", fmt)
    page.evaluate("window.firstSound = undefined; window.streamDone = undefined")
    page.click("#generate")
    wanted = f"document.querySelectorAll('#results li').length > {count}"
    page.wait_for_function(wanted, timeout=90_000)  # the real model, on a loaded 2-core machine
    return page.locator("#results li").first


def saved_bytes(page) -> bytes:
    """The first result's file, through the page's save dialog (stubbed to hand it back)."""
    page.evaluate(
        """window.showSaveFilePicker = async (options) => ({
             createWritable: async () => ({
               write: async (blob) => {
                 const bytes = new Uint8Array(await blob.arrayBuffer());
                 let text = ''; bytes.forEach((b) => { text += String.fromCharCode(b); });
                 window.saved = {name: options.suggestedName, data: btoa(text)};
               },
               close: async () => {},
             }),
           }); window.saved = undefined;"""
    )
    page.click("#results li >> nth=0 >> button:has-text('Save as')")
    page.wait_for_function("window.saved !== undefined")
    return base64.b64decode(page.evaluate("window.saved.data"))


def stated_seconds(data: bytes) -> float | None:
    """The length a file states in its headers (what players show before decoding it)."""
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        if stream.duration:
            return float(stream.duration * stream.time_base)
        return container.duration / 1e6 if container.duration else None


class TestBrowserPage:
    """Issue #12: the studio page in Debian chromium, on the real (random-weight) model."""

    @pytest.fixture
    def page(self, browser, real):
        page = open_page(browser, real.url)
        yield page
        assert page.errors == []
        page.close()

    def test_loads_with_logo_favicon_voices_and_no_empty_player(self, page, real):
        assert page.evaluate("document.querySelector('header img').naturalWidth") > 0
        assert page.get_attribute("link[rel=icon]", "href") == "/favicon.svg"
        icon = requests.get(real.url + "/favicon.svg")
        assert (
            icon.headers["Content-Type"] == "image/svg+xml"
            and b'viewBox="0 0 64 64"' in icon.content
        )
        selected = page.eval_on_selector("#voice", "s => s.options[s.selectedIndex].text")
        assert selected == "ref (default)"
        assert page.inner_text("#status") == "English model on CPU"  # not "tiny.yaml · cpu"
        assert page.inner_text("#counter") == "87 / 4,096 characters"  # the greeting
        assert page.is_hidden("#player") and page.is_visible("#results-empty")

    @pytest.mark.parametrize("fmt", ["mp3", "opus", "aac", "flac", "wav", "pcm"])
    def test_every_format_plays_while_it_is_generated(self, page, real, fmt):
        """Sound starts before the stream ends; the saved file is the take and says its length."""
        text = " ".join(CORPUS[:4])
        result = generate_in_page(page, text, fmt)
        first, done = page.evaluate("[window.firstSound, window.streamDone]")
        assert first is not None and done is not None and first < done, (first, done)
        assert page.evaluate("window.contexts") == 1
        assert fmt.upper() in result.inner_text() and "1.00×" in result.inner_text()
        want = library_seconds(real.model, text)
        played = page.evaluate("player.take.duration")
        assert abs(played - want) < 0.08, (played, want)  # codec padding at most
        data = saved_bytes(page)
        assert page.evaluate("window.saved.name").endswith("." + fmt)
        if fmt == "pcm":
            assert len(data) == round(want * SR) * 2
            return
        assert abs(duration(data) - played) < 0.08
        if fmt in ("wav", "flac", "opus"):  # containers that state a length
            assert abs(stated_seconds(data) - played) < 0.08, stated_seconds(data)

    def test_a_new_run_or_a_result_stops_what_was_playing(self, page):
        page.fill("#text", " ".join(CORPUS))
        page.select_option("#format", "wav")
        page.click("#generate")
        page.wait_for_function("document.querySelectorAll('#results li').length === 1")
        page.wait_for_function("player.playing && player.sources.size > 0")
        assert page.evaluate("player.position() < player.take.duration - 1")  # still sounding
        page.fill("#text", "Hello world.")
        page.click("#generate")
        for _ in range(10):  # while the second run streams: only its own sources exist
            assert page.evaluate("[...player.sources].every((s) => s.take === player.take.id)")
            page.wait_for_timeout(40)
        page.wait_for_function("document.querySelectorAll('#results li').length === 2")
        page.click("#results li >> nth=1 >> button:has-text('Play')")  # the first take again
        assert page.evaluate("player.take.text.startsWith('Hello world. This')")
        assert page.evaluate("[...player.sources].every((s) => s.take === player.take.id)")
        assert page.get_attribute("#results li >> nth=1", "aria-current") == "true"
        assert page.evaluate("window.contexts") == 1

    def test_pause_seek_and_stop_after_the_stream_ends(self, page):
        generate_in_page(page, " ".join(CORPUS[:3]), "mp3")
        page.wait_for_function("player.take.complete && player.playing")
        page.click("#play")  # pause
        assert page.inner_text("#play") == "Play"
        paused = page.evaluate("player.position()")
        page.wait_for_timeout(300)
        assert page.evaluate("player.position()") == paused
        assert page.evaluate("player.sources.size") == 0
        page.click("#play")
        page.wait_for_timeout(300)
        assert page.evaluate("player.position()") > paused + 0.1
        page.evaluate("player.seek(player.take.duration / 2)")
        assert abs(page.evaluate("player.position() / player.take.duration") - 0.5) < 0.05
        page.click("#stop")
        assert page.evaluate("[player.position(), player.sources.size, player.playing]") == [
            0,
            0,
            False,
        ]
        page.wait_for_function("player.ctx.state === 'suspended'")
        page.click("#play")  # plays again from the start
        page.wait_for_function("player.playing && player.position() > 0")

    def test_uploads_are_your_voices_and_removing_one_asks_first(self, page, real, tmp_path):
        folder = Path(real.server.voices.voices_dir)
        folder.mkdir(parents=True, exist_ok=True)
        write_audio(folder / "Shelf Voice.wav", tone(250, 2.0))
        ref = write_audio(tmp_path / "Browser Voice.flac", tone(230, 3.0, 48000), 48000)
        page.set_input_files("#clone-file", str(ref))
        assert page.input_value("#clone-name") == "Browser Voice"
        assert re.search(r"\(\d+ KB\)", page.inner_text("#drop-text"))  # not "(0.0 MB)"
        page.click("#clone-add")
        page.wait_for_function("document.querySelector('#voice').value === 'Browser Voice'")
        assert "Browser Voice" in page.inner_text("#my-voices")
        assert "Shelf Voice" in page.inner_text("#server-voices")
        assert page.locator("button[aria-label='Remove voice Shelf Voice']").count() == 0
        assert page.locator("button[aria-label='Remove voice ref']").count() == 0  # the default
        page.click("button[aria-label='Remove voice Browser Voice']")
        assert page.is_visible("#confirm") and "Browser Voice" in page.inner_text("#confirm")
        page.click("#confirm-cancel")
        assert page.is_hidden("#confirm") and (folder / "Browser Voice.flac").exists()
        page.click("button[aria-label='Remove voice Browser Voice']")
        page.click("#confirm-ok")
        page.wait_for_function(
            "!document.querySelector('#my-voices').innerText.includes('Browser')"
        )
        assert not (folder / "Browser Voice.flac").exists()
        (folder / "Shelf Voice.wav").unlink()

    def test_dropping_a_recording_anywhere_clones_it(self, page, real):
        data = base64.b64encode(wav_bytes(260, 2.5)).decode()
        page.evaluate(
            """(b64) => {
                 const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
                 const transfer = new DataTransfer();
                 transfer.items.add(new File([bytes], 'Dropped In.wav', {type: 'audio/wav'}));
                 document.querySelector('#compose h2').dispatchEvent(
                   new DragEvent('drop', {dataTransfer: transfer, bubbles: true, cancelable: true}));
               }""",
            data,
        )
        page.wait_for_function("document.querySelector('#voice').value === 'Dropped In'")
        assert (Path(real.server.voices.voices_dir) / "Dropped In.wav").is_file()
        page.click("button[aria-label='Remove voice Dropped In']")
        page.click("#confirm-ok")
        page.wait_for_function(
            "!document.querySelector(\"button[aria-label='Remove voice Dropped In']\")"
        )

    def test_errors_appear_next_to_their_cause_in_plain_words_on_a_phone(
        self, browser, real, tmp_path
    ):
        page = open_page(browser, real.url, viewport={"width": 390, "height": 844})
        bad = tmp_path / "notes.wav"
        bad.write_bytes(b"this is not audio" * 100)
        page.set_input_files("#clone-file", str(bad))
        page.click("#clone-add")
        page.wait_for_selector("#clone-error:not([hidden])")
        message = page.inner_text("#clone-error")
        assert message == "The voice file could not be decoded as audio."  # no field names
        box = page.locator("#clone-error").bounding_box()
        assert box["y"] >= 0 and box["y"] + box["height"] <= 844  # in view, not 500 px above
        good = write_audio(tmp_path / "ok.wav", tone(240, 2.0))
        page.set_input_files("#clone-file", str(good))
        assert page.is_hidden("#clone-error")  # a new attempt clears it

        page.route("**/v1/audio/speech", lambda route: route.abort())  # the server is gone
        page.click("#generate")
        page.wait_for_selector("#compose-error:not([hidden])")
        assert "Can't reach the server" in page.inner_text("#compose-error")
        assert page.is_visible("#offline") and "Failed to fetch" not in page.content()
        page.unroute("**/v1/audio/speech")
        page.wait_for_selector("#offline", state="hidden", timeout=10_000)  # it retries /health
        generate_in_page(page, "Hello world.", "wav")
        assert page.is_hidden("#compose-error")
        page.close()

    def test_errors_go_when_the_server_is_back_and_an_idle_page_notices_it_left(
        self, browser, real, tmp_path, tokenizer_path
    ):
        """Issue #21.4: a server killed -9 mid-take: the page says the connection broke off (it
        said "⚠ network error") and keeps what arrived; once the server is back, the banner and
        every "Can't reach the server" error are gone; an idle page notices the server leave."""
        port = free_port()
        command = server_command(real, tmp_path, tokenizer_path, port, voices="v")

        def start():
            proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            assert wait_for(lambda: proc.poll() is not None or port_open(port), timeout=60)
            return proc

        (tmp_path / "v").mkdir()
        write_audio(tmp_path / "v" / "Folder.wav", tone(240, 2.0))
        proc = start()
        page = open_page(browser, f"http://127.0.0.1:{port}")
        try:
            page.click("[data-prompt=long]")
            page.click("#generate")
            page.wait_for_function("window.firstSound !== undefined")
            proc.kill()
            proc.wait(timeout=10)
            page.wait_for_selector("#compose-error:not([hidden])")
            assert page.inner_text("#compose-error").startswith(
                "The connection to the server broke off during this take."
            )
            page.wait_for_selector("#offline:not([hidden])", timeout=5_000)
            assert page.evaluate("player.take.duration") > 0 and page.is_visible("#player")
            page.click("#generate")  # tried again while it is down, and a voice preview too
            page.wait_for_function(
                "document.querySelector('#compose-error').textContent.startsWith(\"Can't reach\")"
            )
            page.click("button[aria-label='Preview voice Folder']")
            page.wait_for_selector("#voices-error:not([hidden])")
            assert page.inner_text("#voices-error").startswith("Can't reach the server")
            proc = start()
            page.wait_for_selector("#offline", state="hidden", timeout=15_000)
            assert page.is_hidden("#compose-error") and page.is_hidden("#voices-error")
            proc.kill()  # nobody presses anything: the page notices by itself
            proc.wait(timeout=10)
            page.wait_for_selector("#offline:not([hidden])", timeout=15_000)
            assert page.errors == []
        finally:
            proc.kill()
            page.close()

    def test_a_vanished_voice_is_explained(self, page, real):
        Path(real.server.voices.voices_dir).mkdir(parents=True, exist_ok=True)  # run alone too
        write_audio(Path(real.server.voices.voices_dir) / "Doomed.wav", tone(240, 2.0))
        page.reload()
        page.wait_for_function(
            "[...document.querySelectorAll('#voice option')].some(o => o.value === 'Doomed')"
        )
        page.select_option("#voice", "Doomed")
        (Path(real.server.voices.voices_dir) / "Doomed.wav").unlink()  # behind the page's back
        page.fill("#text", "Hello world.")
        page.click("#generate")
        page.wait_for_function("document.querySelector('#voice').value !== 'Doomed'")
        options = page.eval_on_selector_all("#voice option", "os => os.map(o => o.value)")
        assert "Doomed" not in options  # the list was loaded again (issue #21.8)
        selected = page.eval_on_selector("#voice", "s => s.selectedOptions[0].textContent")
        assert "(default)" in selected
        assert page.is_visible("#compose-error")
        assert page.inner_text("#compose-error") == (
            f"That voice is no longer on the server: {selected} is selected instead."
        )
        generate_in_page(page, "Hello world.", "wav")  # the default speaks
        assert page.is_hidden("#compose-error")

    def test_stop_button_and_keyboard_shortcut(self, page):
        page.click("[data-prompt=long]")
        page.focus("#text")
        page.keyboard.press("Control+Enter")
        page.wait_for_function("document.querySelector('#generate').textContent === 'Stop'")
        page.click("#generate")
        page.wait_for_function("document.querySelector('#metrics').textContent === 'Stopped.'")
        assert page.inner_text("#generate") == "Generate"

    def test_stop_ends_the_sound_and_the_player_is_not_left_stuck(self, page):
        """Issue #21.2-3: Stop ends playback (the clock stops, the button says Play, the take
        plays again from the start); a failed request leaves no phantom player."""
        page.click("[data-prompt=long]")
        page.click("#generate")
        page.wait_for_function("window.firstSound !== undefined")
        page.wait_for_timeout(500)
        page.click("#generate")
        page.wait_for_function("document.querySelector('#metrics').textContent === 'Stopped.'")
        assert page.inner_text("#play") == "Play"
        assert page.evaluate("() => player.playing || player.sources.size") in (False, 0)
        shown = page.inner_text("#time")
        page.wait_for_timeout(400)
        assert page.inner_text("#time") == shown and shown.startswith("0:00 / ")  # it stopped
        page.click("#play")  # what arrived plays again
        page.wait_for_function("document.querySelector('#play').textContent === 'Pause'")
        page.click("#play")
        page.route("**/v1/audio/speech", lambda route: route.abort())
        page.fill("#text", "Hello world.")
        page.click("#generate")
        page.wait_for_selector("#compose-error:not([hidden])")
        assert page.is_hidden("#player")  # no "Pause 0:00 / 0:00" left behind
        page.unroute("**/v1/audio/speech")

    def test_counter_counts_like_the_server_and_chips_can_be_undone(self, page, real):
        page.fill("#text", "😀" * 4096)  # 4,096 code points: valid, the server agrees
        assert page.inner_text("#counter") == "4,096 / 4,096 characters"
        assert page.is_enabled("#generate")
        page.fill("#text", "😀" * 4097)
        assert page.is_disabled("#generate") and "over" in page.inner_text("#counter-alert")
        assert page.get_attribute("#counter", "aria-live") is None  # not read at each keystroke
        page.fill("#text", "My own words.")
        page.click("[data-prompt=numbers]")
        assert page.input_value("#text").startswith("On 3 May")
        page.click("#undo")
        assert page.input_value("#text") == "My own words."
        page.click("[data-prompt=long]")  # a prompt over a prompt: nothing to undo
        page.click("[data-prompt=greeting]")
        assert page.is_hidden("#undo-note")

    def test_voice_previews_are_generated_once(self, page):
        requests_made = []
        page.on("request", lambda r: requests_made.append(r) if "speech" in r.url else None)
        page.click("#voice-preview")
        page.wait_for_function("player.take && player.take.complete")
        assert page.inner_text("#now-title") == "ref (preview)"
        page.click("#voice-preview")  # again: from the page's cache
        page.wait_for_function("player.playing")
        assert len(requests_made) == 1
        assert page.locator("#results li").count() == 0  # previews are not results

    def test_results_are_kept_titled_by_their_words_and_time_and_removal_can_be_undone(
        self, page, real
    ):
        """Issue #21.6: rows are titled by the text's first words and the time; they are kept
        in this browser (IndexedDB) and play again after a reload; Delete and Clear all have an
        Undo; past the cap the oldest go. Download is one click; Save as… asks where."""
        generate_in_page(page, "Hello world.", "wav")
        long = "The lighthouse keeper climbed the spiral stairs every evening, counting."
        generate_in_page(page, long, "mp3")
        titles = page.locator("#results li b").all_inner_texts()
        assert titles == ["The lighthouse keeper climbed the spiral…", "Hello world."]
        meta = page.inner_text("#results li >> nth=1 >> .meta")
        assert re.match(r"ref · \d{1,2}:\d{2}( [AP]M)? · WAV · 1\.00× · ", meta), meta
        durations = page.evaluate("ui.takes.map((t) => t.duration)")
        page.reload()
        page.wait_for_function("document.querySelectorAll('#results li').length === 2")
        assert page.locator("#results li b").all_inner_texts() == titles
        assert page.evaluate("ui.takes.map((t) => t.duration)") == pytest.approx(durations, 1e-3)
        page.click("#results li >> nth=1 >> button:has-text('Play')")
        page.wait_for_function("player.playing && player.take.title === 'Hello world.'")
        with page.expect_download() as event:  # one click, no dialog
            page.click("#results li >> nth=1 >> button:has-text('Download')")
        data = Path(event.value.path()).read_bytes()
        assert event.value.suggested_filename.endswith(".wav")
        assert abs(duration(data) - durations[1]) < 0.01
        page.click("#results li >> nth=1 >> button:has-text('Delete')")  # the one playing
        assert page.locator("#results li").count() == 1 and page.is_hidden("#player")
        assert page.inner_text("#removed-text") == "Removed “Hello world.”."
        page.click("#undo-remove")
        assert page.locator("#results li b").all_inner_texts() == titles
        page.click("#clear-results")
        assert page.locator("#results li").count() == 0 and page.is_visible("#results-empty")
        assert page.inner_text("#removed-text") == "Removed 2 results."
        page.click("#undo-remove")
        assert page.evaluate("shelf.all().then((records) => records.length)") == 2
        page.reload()  # the undone removal was stored again
        page.wait_for_function("document.querySelectorAll('#results li').length === 2")
        page.evaluate("KEEP.takes = 2")
        page.fill("#text", "A third take.")  # past the cap: the oldest goes
        page.click("#generate")
        page.wait_for_function("ui.takes[0].title === 'A third take.'")
        assert page.locator("#results li b").all_inner_texts() == ["A third take.", titles[0]]
        stored = page.evaluate("shelf.all().then((records) => records.map((r) => r.text))")
        assert sorted(stored) == sorted(["A third take.", long])
        page.click("#clear-results")
        # The store's transactions run in order, so this read sees the removal committed; a
        # reload before that commits would abort it (as closing a tab within a few ms would).
        assert page.evaluate("shelf.all().then((records) => records.length)") == 0
        page.reload()
        page.wait_for_function("document.querySelectorAll('#voice option').length > 0")
        page.wait_for_timeout(300)  # the stored results, if any, are back by now
        assert page.locator("#results li").count() == 0 and page.is_visible("#results-empty")

    def test_the_voice_menu_lists_voices_and_the_selected_one_is_marked(self, page, real):
        """Issue #21.7: the menu holds real voices only (OpenAI's names are in a hint, not 13
        entries of "alloy → narrator"); the Voices card marks the selected voice, and Use says
        so at once."""
        folder = Path(real.server.voices.voices_dir)
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("Second", "Third"):
            write_audio(folder / f"{name}.wav", tone(240, 2.0))
        try:
            self.check_voice_menu_and_tiles(page)
        finally:
            for name in ("Second", "Third"):
                (folder / f"{name}.wav").unlink()

    @staticmethod
    def check_voice_menu_and_tiles(page):
        page.reload()
        page.wait_for_selector("#voices li[data-voice=Third]")
        options = page.eval_on_selector_all("#voice option", "os => os.map(o => o.textContent)")
        assert options == ["ref (default)", "Second", "Third"]  # no "alloy → ref"
        page.click("#aliases summary")
        assert "alloy → ref" in page.inner_text("#aliases")
        assert page.locator("#voices li.selected").count() == 0  # the default is a file path
        page.click("button[aria-label='Use voice Second']")
        assert page.input_value("#voice") == "Second"
        assert page.get_attribute("#voices li.selected", "data-voice") == "Second"
        assert page.inner_text("#voices li.selected [data-use]") == "✓ Selected"
        assert page.get_attribute("button[aria-label='Use voice Second']", "aria-pressed") == (
            "true"
        )
        assert page.inner_text("#voices-alert") == "Second will speak the next take."
        page.select_option("#voice", "Third")  # the menu and the tiles agree either way
        assert page.get_attribute("#voices li.selected", "data-voice") == "Third"
        assert page.inner_text("button[aria-label='Use voice Second']") == "Use"
        card = page.locator("#voices").bounding_box()
        for tile in page.locator("#server-voices li").all():
            box = tile.bounding_box()
            assert box["x"] >= card["x"] and box["x"] + box["width"] <= card["x"] + card["width"]

    def test_waveform_and_meter_are_scaled_to_the_loudest_sample(self, page):
        """Issue #21.10: a quiet take filled a sliver of the waveform and never moved the meter;
        now the loudest bar is the canvas' full height (95 %) and the meter reaches the top."""
        page.evaluate("""() => {  // a quiet take: every sample at a tenth of what it was
          const append = player.append;
          player.append = function (take, samples, rate) {
            append.call(this, take, samples.map((v) => v / 10), rate);
          };
          window.levels = [];
          const level = player.level;
          player.level = function () { const v = level.call(this); levels.push(v); return v; };
        }""")
        generate_in_page(page, " ".join(CORPUS[:2]), "wav")
        page.wait_for_function("player.take.complete && !player.playing", timeout=60_000)
        assert page.evaluate("player.take.loudest") < 0.2
        assert page.evaluate("Math.max(...levels)") > 0.5
        tallest = page.evaluate("""() => {
          const c = document.querySelector('#wave'), g = c.getContext('2d');
          const data = g.getImageData(0, 0, c.width, c.height).data;
          let best = 0;
          for (let x = 0; x < c.width; x++) {
            let filled = 0;
            for (let y = 0; y < c.height; y++) filled += data[(y * c.width + x) * 4 + 3] > 0;
            best = Math.max(best, filled);
          }
          return best / c.height;
        }""")
        assert tallest > 0.9, tallest

    @pytest.mark.parametrize("viewport", [(1280, 900), (390, 844)])
    def test_a_long_passage_row_stays_inside_its_card(self, browser, real, viewport):
        """Issue #21.1: a result row's text is cut with an ellipsis, not as wide as the text
        (its Delete button ended at x=1280 against a card edge at 1180; a phone scrolled sideways)."""
        width, height = viewport
        page = open_page(browser, real.url, viewport={"width": width, "height": height})
        passage = " ".join(["A long passage that keeps going, sentence after sentence."] * 2)
        generate_in_page(page, passage, "wav")
        card = page.locator("#results-card").bounding_box()
        for selector in ("#results li", "#results li button:has-text('Delete')"):
            box = page.locator(selector).first.bounding_box()
            assert box["x"] >= card["x"] and box["x"] + box["width"] <= card["x"] + card["width"]
        scroll = page.evaluate("document.documentElement.scrollWidth")
        assert scroll <= width  # no sideways scrolling
        assert page.errors == []
        page.close()

    def test_a_phone_keeps_the_player_on_screen_with_buttons_a_finger_can_press(
        self, browser, real
    ):
        """Issue #21.5: on a 390x844 touch screen the player stays in view while audio plays
        (it sat below the form), row buttons are 44 px tall, and no keyboard hint shows."""
        page = open_page(browser, real.url, viewport={"width": 390, "height": 844},
                         has_touch=True, is_mobile=True)  # fmt: skip
        assert page.is_hidden("#shortcut")
        page.fill("#text", "Hello world.")
        page.click("#generate")
        page.wait_for_selector("#player:not([hidden])")
        box = page.locator("#player").bounding_box()
        assert box["y"] >= 0 and box["y"] + box["height"] <= 844  # in view without scrolling
        page.wait_for_function("document.querySelectorAll('#results li').length > 0")
        for button in page.locator("#results li button").all():
            assert button.bounding_box()["height"] >= 44
        page.evaluate("window.scrollTo(0, document.documentElement.scrollHeight)")
        last = page.locator("#voices").bounding_box()  # the page's end is not under the player
        assert last["y"] + last["height"] <= page.locator("#player").bounding_box()["y"] + 1
        assert page.errors == []
        page.close()

    def test_seeking_by_keyboard_while_paused_shows_at_once(self, page):
        """Issue #21.9: on the slider, End and Home move time, label and waveform at once while
        paused; arrows step 5 s; Space plays and pauses."""
        generate_in_page(page, " ".join(CORPUS), "wav")
        page.wait_for_function("window.streamDone !== undefined")
        if page.inner_text("#play") == "Pause":
            page.click("#play")
        duration = page.evaluate("() => player.take.duration")
        assert duration > 12
        total = page.inner_text("#time").split(" / ")[1]
        page.focus("#seek")
        page.keyboard.press("End")
        assert page.inner_text("#time") == f"{total} / {total}"
        page.keyboard.press("Home")
        assert page.inner_text("#time") == f"0:00 / {total}"
        wave = page.evaluate("() => document.querySelector('#wave').toDataURL()")
        page.keyboard.press("ArrowRight")
        page.keyboard.press("ArrowRight")
        assert page.inner_text("#time") == f"0:10 / {total}"
        assert page.get_attribute("#seek", "aria-valuetext") == f"0:10 of {total}"
        assert page.evaluate("() => document.querySelector('#wave').toDataURL()") != wave
        page.keyboard.press("ArrowLeft")
        assert page.inner_text("#time") == f"0:05 / {total}"
        page.keyboard.press(" ")
        assert page.inner_text("#play") == "Pause"
        page.keyboard.press(" ")
        assert page.inner_text("#play") == "Play"

    def test_api_key_is_checked_before_it_is_kept(self, browser, stub):
        live = LiveServer(make_server(stub, api_key="s3cret").app, threads=4)
        try:
            page = browser.new_page()
            page.goto(live.url + "/")
            page.wait_for_selector("#key-card:not([hidden])")
            assert page.is_hidden("#key-error") and page.is_hidden("#compose-error")
            assert page.locator("main #key-card").count() == 1  # inside a landmark
            page.fill("#api-key", "wrong")
            page.click("#key-save")
            page.wait_for_selector("#key-error:not([hidden])")
            assert page.inner_text("#key-error") == (
                "That key was not accepted. Check it and try again."
            )
            assert page.evaluate("localStorage.getItem('pocket-tts-api-key')") is None
            page.fill("#api-key", "s3cret")
            page.click("#key-save")
            # (the voice menu is filled already: listings are open, so wait for the card itself)
            page.wait_for_selector("#key-card", state="hidden")
            assert page.is_hidden("#key-error")
            assert page.evaluate("localStorage.getItem('pocket-tts-api-key')") == "s3cret"
            page.reload()
            page.wait_for_function("document.querySelectorAll('#voice option').length > 0")
            assert page.is_hidden("#key-card")
            page.click("#key-change")
            page.click("#key-forget")
            assert page.evaluate("localStorage.getItem('pocket-tts-api-key')") is None
            assert page.is_visible("#key-card")
            page.close()
        finally:
            live.close()

    def test_a_fresh_browser_is_not_told_of_a_saved_key_and_logs_nothing(self, browser, stub):
        """Issue #21.10: with --api_key, a browser that never saved a key is not told its saved
        key is refused; the key form raises no console message (a password form wants a
        username field)."""
        live = LiveServer(make_server(stub, api_key="s3cret").app, threads=4)
        try:
            page = browser.new_page()
            messages = []
            page.on("console", lambda message: messages.append(message.text))
            page.goto(live.url + "/")
            page.wait_for_selector("#key-card:not([hidden])")
            page.wait_for_function("document.querySelectorAll('#voice option').length > 0")
            page.fill("#text", "Hello world.")
            # The page of a server that asked for no key when it loaded (Generate is disabled
            # while the card is open): its first request meets the key.
            page.evaluate("() => { document.querySelector('#key-card').hidden = true; "
                          "updateCounter(); }")  # fmt: skip
            with page.expect_response("**/v1/audio/speech") as response:
                page.click("#generate")
            assert response.value.status == 401
            page.wait_for_function("document.querySelector('#generate').textContent === 'Generate'")
            assert page.is_visible("#key-card") and page.is_hidden("#key-error")
            assert not [m for m in messages if "Password forms" in m], messages
            page.close()
        finally:
            live.close()

    def test_generate_waits_while_the_key_is_asked_for_and_a_change_can_be_cancelled(
        self, browser, stub
    ):
        """Issue #21.10: Generate is disabled while the key card is open; "Change key" has a
        Cancel that keeps the saved key."""
        live = LiveServer(make_server(stub, api_key="s3cret").app, threads=4)
        try:
            page = browser.new_page()
            page.goto(live.url + "/")
            page.wait_for_selector("#key-card:not([hidden])")
            page.fill("#text", "Hello world.")
            assert page.is_disabled("#generate") and page.is_hidden("#key-cancel")
            page.fill("#api-key", "s3cret")
            page.click("#key-save")
            page.wait_for_selector("#key-card", state="hidden")
            assert page.is_enabled("#generate")
            page.click("#key-change")
            assert page.is_visible("#key-card") and page.is_disabled("#generate")
            page.click("#key-cancel")
            assert page.is_hidden("#key-card") and page.is_enabled("#generate")
            assert page.evaluate("localStorage.getItem('pocket-tts-api-key')") == "s3cret"
            page.close()
        finally:
            live.close()

    @pytest.mark.parametrize("scheme", ["light", "dark"])
    def test_axe_finds_no_serious_violations(self, browser, real, scheme, tmp_path):
        if not AXE.is_file():
            pytest.skip("axe-core is not installed (.ci/run installs it)")
        page = open_page(browser, real.url, color_scheme=scheme)
        generate_in_page(page, "Hello world.", "wav")  # the player and a result, too
        page.add_script_tag(path=str(AXE))
        found = page.evaluate(
            "async () => (await axe.run(document, {resultTypes: ['violations']})).violations"
            ".map((v) => ({id: v.id, impact: v.impact, nodes: v.nodes.map((n) => n.target)}))"
        )
        serious = [v for v in found if v["impact"] in ("serious", "critical")]
        assert serious == [], serious
        shots = os.environ.get("PAGE_SCREENSHOTS")
        if shots:  # for people to look at: light, dark, and a phone
            page.screenshot(path=f"{shots}/page-{scheme}.png", full_page=True)
            page.set_viewport_size({"width": 390, "height": 844})
            page.screenshot(path=f"{shots}/page-{scheme}-phone.png", full_page=True)
        page.close()
