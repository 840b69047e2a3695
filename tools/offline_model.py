"""A pocket-tts that runs offline, for the tests and the benchmarks.

pocket-tts downloads its weights, tokenizer and voices from a model hub; these helpers make the
real pocket-tts code run without it: a small tokenizer trained here, a packaged architecture with
random weights (saved once when several processes must load the same model: the latent cache is
keyed by the weights), EOS disabled so that lengths follow token counts, and voice-like reference
recordings written with PyAV.
"""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import yaml
from pocket_tts.utils.config import CONFIGS_DIR
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

SR = 24000
CORPUS = [
    "Hello world. This is a test of the speech server, with numbers one two three!",
    "The quick brown fox jumps over the lazy dog? Yes... it does; really: twice.",
    "Long inputs are split into sentences, and every sentence must be spoken.",
]


def build_tokenizer(path: Path) -> Path:
    """A small BPE tokenizer in pocket-tts's style (metaspace words, isolated punctuation)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always"),
            pre_tokenizers.Split(Regex(r"[.!?,;:]"), behavior="isolated"),
        ]
    )
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    alphabet = (
        [chr(c) for c in range(33, 127)] + ["\u2581"] + list("àâäéèêëïîôöùûüçßñáíóú€£°\u201c\u201d")
    )
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>"], initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(CORPUS * 10, trainer)
    tok.save(str(path))
    return path


def random_weight_config(tmp: Path, tokenizer: Path, name: str = "english_2m_2026-10") -> Path:
    """A packaged pocket-tts architecture with no weights, our tokenizer, and EOS disabled."""
    cfg = yaml.safe_load((CONFIGS_DIR / f"{name}.yaml").read_text())
    for section in (cfg, cfg["flow_lm"], cfg["mimi"]):
        section.pop("weights_path", None)
    cfg.pop("weights_path_without_voice_cloning", None)
    table = cfg["flow_lm"]["lookup_table"]
    table.update(
        tokenizer="tokenizers",
        tokenizer_path=str(tokenizer),
        n_bins=Tokenizer.from_file(str(tokenizer)).get_vocab_size(),
    )
    cfg["default_eos_threshold"] = 1e9  # never stop early: durations follow token counts
    path = tmp / f"{name}_random.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def saved_weight_config(tmp: Path, tokenizer: Path, name: str = "english_2m_2026-10") -> Path:
    """`random_weight_config` whose random weights are saved once, so that every process (a
    restart, a replica) loads the same model."""
    from pocket_tts import TTSModel
    from safetensors.torch import save_file

    config = random_weight_config(tmp, tokenizer, name)
    weights = tmp / "weights.safetensors"
    save_file(TTSModel.load_model(config=str(config)).state_dict(), str(weights))
    cfg = yaml.safe_load(config.read_text())
    cfg["weights_path"] = str(weights)
    config.write_text(yaml.safe_dump(cfg))
    return config


def write_audio(path: Path, samples: np.ndarray, rate: int = SR, codec: str | None = None):
    """Write float samples ([n] mono or [channels, n]) with PyAV in the format of the suffix."""
    samples = np.atleast_2d(samples).astype(np.float32)
    layout = "mono" if samples.shape[0] == 1 else "stereo"
    codec = codec or {".wav": "pcm_s16le", ".flac": "flac", ".mp3": "libmp3lame"}[path.suffix]
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate, layout=layout)
        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(samples.T.reshape(1, -1)), format="flt", layout=layout
        )
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def tone(freq: float, seconds: float, rate: int = SR) -> np.ndarray:
    """A voice-like reference: a tone with a syllable-rate envelope."""
    t = np.arange(int(seconds * rate)) / rate
    return (0.4 * np.sin(2 * np.pi * freq * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))).astype(
        np.float32
    )
