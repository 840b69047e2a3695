"""Text normalization: numbers, money, dates and symbols said as words, per language."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from pocket_tts.utils.config import CONFIGS_DIR

import pocket_tts_server as srv
from tests.helpers import StubModel, make_server, speech

NORMALIZATION_TABLE = {
    "english": [
        ("$1,234 on 3 May", "one thousand, two hundred and thirty-four dollars on the third of May"),
        ("€5.50 is 12% of it.", "five euro, fifty cents is twelve percent of it."),
        ("Meet at 10:30 or 9:05, not 8:00.", "Meet at ten thirty or nine oh five, not eight o'clock."),
        ("It was -3.5°C on May 3rd, 2026.",
         "It was minus three point five degrees Celsius on May third, twenty twenty-six."),
        ("The 21st time & the 2nd.", "The twenty-first time and the second."),
        ("In 1999, 1,500,000 people.", "In nineteen ninety-nine, one million, five hundred thousand people."),
        ("Pi is 3.14.", "Pi is three point one four."),
    ],
    "french": [
        ("$1,234 le 3 mai", "mille deux cent trente-quatre dollars le trois mai"),
        ("1 234 € le 1er mai 2026", "mille deux cent trente-quatre euros le premier mai deux mille vingt-six"),
        ("5,50 € soit 12 %.", "cinq euros et cinquante centimes soit douze pour cent."),
        ("Rendez-vous à 10:30.", "Rendez-vous à dix heures trente."),
        ("Il fait 21°C.", "Il fait vingt et un degrés Celsius."),
        ("Le 2e & le 3ème.", "Le deuxième et le troisième."),
    ],
    "german": [
        ("$1,234 am 3. Mai", "eintausendzweihundertvierunddreißig Dollar am dritten Mai"),
        ("5,50 € sind 12 %.", "fünf Euro und fünfzig Cent sind zwölf Prozent."),
        ("Um 10:30 Uhr.", "Um zehn Uhr dreißig."),
        ("Es sind 21°C am 1. Mai 2026.",
         "Es sind einundzwanzig Grad Celsius am ersten Mai zweitausendsechsundzwanzig."),
        ("1.234,5 Meter & mehr.", "eintausendzweihundertvierunddreißig Komma fünf Meter und mehr."),
    ],
    "spanish": [
        ("$1,234 el 3 de mayo", "mil doscientos treinta y cuatro dólares el tres de mayo"),
        ("5,50 € es el 12 %.", "cinco euros con cincuenta céntimos es el doce por ciento."),
        ("A las 10:30.", "A las diez y treinta."),
        ("El 1 de mayo de 2026.", "El primero de mayo de dos mil veintiséis."),
    ],
    "italian": [
        ("$1,234 il 3 maggio", "milleduecentotrentaquattro dollari il tre maggio"),
        ("5,50 € è il 12%.", "cinque euro e cinquanta centesimi è il dodici per cento."),
        ("Alle 10:30.", "Alle dieci e trenta."),
        ("Il 1 maggio 2026.", "Il primo maggio duemilaventisei."),
    ],
    "portuguese": [
        ("$1,234 em 3 de maio", "mil duzentos e trinta e quatro dólares em três de maio"),
        ("5,50 € é 12%.", "cinco euros e cinquenta cêntimos é doze por cento."),
        ("Às 10:30.", "Às dez e trinta."),
        ("Faz 21°C.", "Faz vinte e um graus Celsius."),
    ],
    "dutch": [
        ("$1,234 op 3 mei", "duizendtweehonderdvierendertig dollar op drie mei"),
        ("€ 5,50 is 12%.", "vijf euro, vijftig cent is twaalf procent."),
        ("Om 10:30.", "Om tien uur dertig."),
        ("Op 1 mei 2026, de 3e keer.", "Op één mei tweeduizendzesentwintig, de derde keer."),
    ],
}  # fmt: skip


class TestTextNormalization:
    @pytest.mark.parametrize(
        "language,raw,spoken",
        [(lang, raw, spoken) for lang, rows in NORMALIZATION_TABLE.items() for raw, spoken in rows],
    )
    def test_language_table(self, language, raw, spoken):
        assert srv.normalize_text(raw, language) == spoken

    def test_every_language_has_rules_and_speaks_no_digits(self):
        assert set(srv.LANGUAGES) == set(NORMALIZATION_TABLE)
        for language in srv.LANGUAGES:
            spoken = srv.normalize_text("$1,234 on 3 May 2026 at 10:30, 12% & 21°C.", language)
            assert not any(c.isdigit() or c in "$%&°" for c in spoken), (language, spoken)

    @pytest.mark.parametrize(
        "raw,spoken",
        [
            ("\u201cQuoted\u201d \u2014 and \u2018single\u2019\u2026", '"Quoted" - and \'single\'...'),
            ("  lots \n\n of\t space  ", "lots of space"),
            ("**Bold**, __strong__, *em* and _it_ ~~gone~~", "Bold, strong, em and it gone"),
            ("# Title\n\nBody text", "Title. Body text"),
            ("See [the docs](https://example.com/x) and ![a logo](logo.png).", "See the docs and a logo."),
            ("- one\n- two\n> quoted", "one two quoted"),
            ("Use `pip install` now", "Use pip install now"),
            ("Great job \U0001f600\U0001f44d\U0001f3fd! \u2764\ufe0f", "Great job ! "),
            ("snake_case_name and 2*3", "snake_case_name and two*three"),
        ],
    )  # fmt: skip
    def test_unicode_markdown_emoji_whitespace(self, raw, spoken):
        assert srv.normalize_text(raw) == spoken.strip()

    def test_model_language_follows_the_config(self):
        for stem, language in [
            ("english_2026-10", "english"),
            ("german_24l", "german"),
            ("portuguese", "portuguese"),
            ("custom", "english"),
        ]:
            model = SimpleNamespace(origin=Path(f"/x/{stem}.yaml"))
            assert srv.model_language(model) == language

    @pytest.mark.parametrize(
        "raw,script",
        [
            ("Hi [pause:1.5] there", ["Hi", 1.5, "there"]),
            ("Hi[PAUSE: 2 ]there", ["Hi", 2.0, "there"]),
            ('<speak>Hi<break time="250ms"/>there</speak>', ["Hi", 0.25, "there"]),
            ("Hi <break time='1.5s'/> there", ["Hi", 1.5, "there"]),
            ('Hi <break strength="x-strong"/> there', ["Hi", 1.0, "there"]),
            ("Hi <break/> there", ["Hi", 0.5, "there"]),
            ("[pause:30]", [10.0]),
            ("[pause:10]" * 9, [10.0] * 6),  # a request's pauses add up to 60 s at most
            ('<p>One <say-as interpret-as="cardinal">2</say-as>.</p>', ["One two."]),
            ("a < b and c > d", ["a < b and c > d"]),
            ("1 <2> 3", ["one <two> three"]),
            ("...", [srv.WORDLESS_SILENCE_SECONDS]),
            ("... [pause:1] ...", [1.0]),
            ("<speak></speak>", [srv.WORDLESS_SILENCE_SECONDS]),
        ],
    )  # fmt: skip
    def test_speech_script_reads_markup(self, raw, script):
        assert srv.speech_script(raw) == script

    @pytest.mark.parametrize(
        "attack",
        ["# a" + " " * 4091 + "b", "\t" * 4096, "\n" * 4096, " \n" * 2048, "*" * 4096, "_" * 4096,
         "*a " * 1365, "_a " * 1365, "**a " * 1024, "**" + "a " * 2047, "[" * 4096, "![" * 2048,
         "[a](" * 1024, "- " * 2048 + "x", "1" * 4096, "1," * 2048, "1." * 2048, "123 " * 1024,
         "1\u00a0" * 2048, "0." + "7" * 4094, "3 May " * 682, "May 3 " * 682, "10:30 " * 682,
         "$1," * 1365, "1%" * 2048, "-1" * 2048, "1°" * 2048, "1st " * 1024, "1999 " * 819,
         "<a " * 1365, "<break " * 585, "[pause:" * 585, "<break time=" * 340,
         "[pause:1" + " " * 4088, "<" + "a" * 4095, "<a" + " " * 4094, "<break/>" * 512],
        ids=lambda attack: f"{attack[:12]!r}x{len(attack)}",
    )  # fmt: skip
    @pytest.mark.parametrize("language", ["english", "german"])
    def test_every_pattern_is_linear_on_pathological_input(self, attack, language):
        """A longest input of repeated markup is read in linear time (measured on an idle 2-core
        machine: 0.12 s at most, for 4,096 digits said one by one); a pattern that backtracks
        takes seconds ("# a" + 4091 spaces + "b" once took 168 s): half a second tells them apart."""
        t0 = time.perf_counter()
        srv.speech_script(attack[:4096], language)
        assert time.perf_counter() - t0 < 0.5

    @pytest.mark.parametrize(
        "language,raw,spoken",
        [("english", "Pick 1,2,3.", "Pick one, two, three."),
         ("english", "Draw: 4,15,23", "Draw: four, fifteen, twenty-three"),
         ("english", "Version 1.2.3", "Version one point two point three"),
         ("english", "$" + "1," * 29 + "1", "one" + ", one" * 29 + " dollars"),
         ("german", "€1,12345", "eins Komma eins zwei drei vier fünf Euro"),
         ("french", "1,12345 €", "un virgule un deux trois quatre cinq euros"),
         ("english", "1" * 20, " ".join(["one"] * 20)),
         ("english", "It costs $12.999.", "It costs twelve point nine nine nine dollars."),
         ("english", "0." + "7" * 30, "zero point" + " seven" * 30)],
    )  # fmt: skip
    def test_lists_versions_and_long_digit_runs_are_read_as_written(self, language, raw, spoken):
        assert srv.normalize_text(raw, language) == spoken

    def test_server_normalizes_in_the_model_language(self, tokenizer_path):
        stub = StubModel(tokenizer_path, origin=CONFIGS_DIR / "french.yaml")
        speech(make_server(stub).app.test_client(), input="Il fait 21°C.")
        assert stub.generated == ["Il fait vingt et un degrés Celsius."]
