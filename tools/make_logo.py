"""Draw pocket-tts-logo.png: a pocket holding a sound wave, and the wordmark.

Run from the repository root: python tools/make_logo.py
It writes pocket-tts-logo.png and prints the base64 that pocket_tts_server.py embeds as LOGO_PNG.
"""

import base64
import io
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

SCALE = 4  # draw large, then downsample: smooth edges without an anti-aliasing library
W, H = 320, 80
INK = (24, 28, 38, 255)
ACCENT = (255, 107, 74, 255)  # warm coral
ACCENT_DARK = (214, 74, 48, 255)
WAVE = (255, 255, 255, 255)


def s(v: float) -> int:
    return round(v * SCALE)


def draw_mark(d: ImageDraw.ImageDraw, x: float, y: float, size: float):
    """A rounded pocket with a stitched flap line and five sound bars inside."""
    d.rounded_rectangle(
        [s(x), s(y + size * 0.12), s(x + size), s(y + size)], s(size * 0.22), fill=ACCENT
    )
    # the pocket's opening: a darker band across the top
    d.rounded_rectangle(
        [s(x), s(y + size * 0.12), s(x + size), s(y + size * 0.34)], s(size * 0.1), fill=ACCENT_DARK
    )
    heights = (0.18, 0.36, 0.5, 0.3, 0.16)
    bar = size * 0.085
    gap = size * 0.075
    total = len(heights) * bar + (len(heights) - 1) * gap
    cx0 = x + (size - total) / 2
    mid = y + size * 0.66
    for i, h in enumerate(heights):
        bx = cx0 + i * (bar + gap)
        d.rounded_rectangle(
            [s(bx), s(mid - h * size / 2), s(bx + bar), s(mid + h * size / 2)],
            s(bar / 2),
            fill=WAVE,
        )


def main():
    img = Image.new("RGBA", (s(W), s(H)), (0, 0, 0, 0))
    d = ImageDraw.Draw(img)
    draw_mark(d, 8, 6, 66)
    font = ImageFont.load_default(size=s(38))
    d.text((s(88), s(41)), "pocket", font=font, fill=INK, anchor="lm")
    width = d.textlength("pocket", font=font)
    d.text((s(88) + width + s(4), s(41)), "tts", font=font, fill=ACCENT_DARK, anchor="lm")
    img = img.resize((W, H), Image.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, "PNG", optimize=True)
    Path("pocket-tts-logo.png").write_bytes(buf.getvalue())
    print(base64.b64encode(buf.getvalue()).decode())


if __name__ == "__main__":
    main()
