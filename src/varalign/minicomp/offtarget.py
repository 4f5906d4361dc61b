"""Off-target but well-aligned samples (minicomp v5): images whose caption describes them correctly but which
show nothing a downstream task asks about.

- `rendered_text`: the caption's words drawn into the image (banners, memes, slides, book covers) in a 3×5
  pixel font, at scale 2 (6×10 px glyphs, 7 px pitch, 12 px lines) when every word fits in 4 characters,
  else at scale 1 (3×5 glyphs, 4 px pitch, 7 px lines, up to 8 characters a line); a downstream class
  name ("COAT", "SEVEN") with probability `p_class_word`, else a web word ("SALE", "MENU").
- `off_domain`: procedurally drawn shapes (with a count and a tone), stripes / checkerboards / dots, bar
  charts and arrows, captioned accurately ("three white circles", "a bar chart with 4 bars").
- `low_info`: a near-copy of the target domain at low information: one pool image at half size, tiled 2×2
  (the same item four times), captioned with its class ("seamless coat pattern").

Everything is drawn from the generator passed in (deterministic), as (32, 32) uint8 grayscale.
"""

from __future__ import annotations

import numpy as np

from .sources import SIZE

OFFTARGET_KINDS = ("rendered_text", "off_domain", "low_info")

# a 3×5 pixel font: each glyph 5 rows of 3 columns ("#" ink)
_FONT_ROWS = {
    "A": ".#.|#.#|###|#.#|#.#", "B": "##.|#.#|##.|#.#|##.", "C": ".##|#..|#..|#..|.##", "D": "##.|#.#|#.#|#.#|##.",
    "E": "###|#..|##.|#..|###", "F": "###|#..|##.|#..|#..", "G": ".##|#..|#.#|#.#|.##", "H": "#.#|#.#|###|#.#|#.#",
    "I": "###|.#.|.#.|.#.|###", "J": "..#|..#|..#|#.#|.#.", "K": "#.#|#.#|##.|#.#|#.#", "L": "#..|#..|#..|#..|###",
    "M": "#.#|###|###|#.#|#.#", "N": "##.|#.#|#.#|#.#|#.#", "O": ".#.|#.#|#.#|#.#|.#.", "P": "##.|#.#|##.|#..|#..",
    "Q": ".#.|#.#|#.#|##.|.##", "R": "##.|#.#|##.|#.#|#.#", "S": ".##|#..|.#.|..#|##.", "T": "###|.#.|.#.|.#.|.#.",
    "U": "#.#|#.#|#.#|#.#|###", "V": "#.#|#.#|#.#|#.#|.#.", "W": "#.#|#.#|###|###|#.#", "X": "#.#|#.#|.#.|#.#|#.#",
    "Y": "#.#|#.#|.#.|.#.|.#.", "Z": "###|..#|.#.|#..|###",
    "0": "###|#.#|#.#|#.#|###", "1": ".#.|##.|.#.|.#.|###", "2": "##.|..#|.#.|#..|###", "3": "##.|..#|.#.|..#|##.",
    "4": "#.#|#.#|###|..#|..#", "5": "###|#..|##.|..#|##.", "6": ".##|#..|###|#.#|###", "7": "###|..#|.#.|.#.|.#.",
    "8": "###|#.#|###|#.#|###", "9": "###|#.#|###|..#|##.",
    "-": "...|...|###|...|...", "!": ".#.|.#.|.#.|...|.#.", "%": "#.#|..#|.#.|#..|#.#", "$": ".##|##.|.#.|.##|##.",
}
FONT = {ch: np.array([[c == "#" for c in row] for row in rows.split("|")]) for ch, rows in _FONT_ROWS.items()}
GLYPH_H, GLYPH_W = 5, 3
WEB_WORDS = ("sale", "new", "menu", "news", "home", "love", "summer", "free", "open", "stop", "hello", "blog",
             "shop", "music", "party", "book", "tea", "cafe", "hotel", "game", "offer", "pizza", "faq", "wifi",
             "50% off", "$9", "top 10", "best", "gift", "welcome")
TEXT_TEMPLATES = ("{w}", "{w} logo", "the word {w}", "{w} banner", "a poster that says {w}", "sign: {w}",
                  "{w} - text on a plain background", "{w} sticker", "book cover: {w}", "slide titled {w}",
                  "{w} meme", "{w} lettering")


def layout(text: str) -> tuple[int, list[str]] | None:
    """(scale, lines) that draw `text` (upper-cased) inside 32×32 with a margin, or None if it cannot fit:
    scale 2 when every word has at most 4 characters and there are at most 2 lines, else scale 1 (up to 8
    characters a line, 4 lines). Words are never split."""
    words = text.upper().split()
    for scale, per_line, max_lines in ((2, 4, 2), (1, 8, 4)):
        if any(len(w) > per_line for w in words):
            continue
        lines: list[str] = []
        for w in words:
            if lines and len(lines[-1]) + 1 + len(w) <= per_line:
                lines[-1] += " " + w
            else:
                lines.append(w)
        if len(lines) <= max_lines:
            return scale, lines
    return None


def pitch(scale: int) -> tuple[int, int]:
    """(column pitch, line pitch) in pixels at `scale`."""
    return GLYPH_W * scale + 1, GLYPH_H * scale + 2


def draw_text(text: str, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """`text` drawn legibly in a 32×32 image: a plain background (dark or light, sometimes a banner frame), the
    glyphs in a contrasting tone, light pixel noise; returns (image, {"scale", "lines", "origin" (y, x),
    "ink", "paper"}) so the text can be read back (see `read_text`)."""
    fit = layout(text)
    if fit is None:
        raise ValueError(f"{text!r} does not fit in {SIZE}x{SIZE}")
    scale, lines = fit
    px, py = pitch(scale)
    width = max(len(line) for line in lines) * px - 1
    height = len(lines) * py - 2
    dark = rng.random() < 0.5
    paper = int(rng.integers(0, 70)) if dark else int(rng.integers(185, 256))
    ink = int(rng.integers(200, 256)) if dark else int(rng.integers(0, 60))
    img = np.full((SIZE, SIZE), paper, np.float32)
    margin = 2 if width <= SIZE - 4 and height <= SIZE - 4 else 0  # a margin, and room for a frame
    if margin and rng.random() < 0.3:  # a banner frame
        img[[0, -1], :] = ink
        img[:, [0, -1]] = ink
    y0 = int(rng.integers(margin, SIZE - margin - height + 1))
    x0 = int(rng.integers(margin, SIZE - margin - width + 1))
    for r, line in enumerate(lines):
        for c, ch in enumerate(line):
            if ch == " ":
                continue
            g = np.kron(FONT[ch], np.ones((scale, scale), bool))
            y, x = y0 + r * py, x0 + c * px
            img[y:y + g.shape[0], x:x + g.shape[1]][g] = ink
    img += 4.0 * rng.standard_normal(img.shape)
    return np.clip(img, 0, 255).round().astype(np.uint8), {"scale": scale, "lines": lines, "origin": (y0, x0),
                                                           "ink": ink, "paper": paper}


def read_text(img: np.ndarray, info: dict) -> str:
    """Read the text back from the pixels: each glyph cell at `info`'s layout, thresholded halfway between ink
    and paper, matched to the nearest glyph of FONT (or a space when empty)."""
    scale, (y0, x0) = info["scale"], info["origin"]
    px, py = pitch(scale)
    ink_is_bright = info["ink"] > info["paper"]
    mid = (info["ink"] + info["paper"]) / 2
    out = []
    for r, line in enumerate(info["lines"]):
        chars = []
        for c in range(len(line)):
            y, x = y0 + r * py, x0 + c * px
            cell = img[y:y + GLYPH_H * scale, x:x + GLYPH_W * scale].astype(np.float32)
            cell = cell.reshape(GLYPH_H, scale, GLYPH_W, scale).mean((1, 3))
            on = cell > mid if ink_is_bright else cell < mid
            if not on.any():
                chars.append(" ")
                continue
            chars.append(min(FONT, key=lambda ch: int((FONT[ch] != on).sum())))
        out.append("".join(chars))
    return " ".join(out)


def rendered_text(rng: np.random.Generator, class_words: list[str], p_class_word: float = 0.6
                  ) -> tuple[np.ndarray, str, str]:
    """(image, caption, the drawn word): a class name (with probability `p_class_word`) or a web word, drawn
    into the image, and a caption that says it."""
    while True:
        if class_words and rng.random() < p_class_word:
            word = class_words[int(rng.integers(len(class_words)))]
        else:
            word = WEB_WORDS[int(rng.integers(len(WEB_WORDS)))]
        if layout(word) is not None:
            break
    img, _ = draw_text(word, rng)
    caption = TEXT_TEMPLATES[int(rng.integers(len(TEXT_TEMPLATES)))].format(w=word)
    return img, caption, word


# ------------------------------------------------------------------------------------------ off-domain objects

SHAPES = ("circle", "square", "triangle", "ring", "cross", "diamond")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "ring": "rings", "cross": "crosses",
          "diamond": "diamonds"}
NUMBERS = ("zero", "one", "two", "three", "four")
# tone word -> (ink range, paper range): white and grey on black, black on white
TONES = {"white": ((215, 256), (0, 40)), "grey": ((120, 160), (0, 30)), "black": ((0, 35), (220, 256))}
PATTERNS = ("horizontal stripes", "vertical stripes", "a checkerboard pattern", "polka dots")
ARROWS = ("left", "right", "up", "down")


def _canvas(tone: str, rng: np.random.Generator) -> tuple[object, int]:
    from PIL import Image

    (ink_lo, ink_hi), (pap_lo, pap_hi) = TONES[tone]
    return Image.new("L", (SIZE, SIZE), int(rng.integers(pap_lo, pap_hi))), int(rng.integers(ink_lo, ink_hi))


def _shape(draw, shape: str, box: tuple[int, int, int, int], ink: int) -> None:
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "circle":
        draw.ellipse(box, fill=ink)
    elif shape == "square":
        draw.rectangle(box, fill=ink)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=ink)
    elif shape == "ring":
        draw.ellipse(box, outline=ink, width=2)
    elif shape == "cross":
        w = max(2, (x1 - x0) // 4)
        draw.rectangle((cx - w / 2, y0, cx + w / 2 - 1, y1), fill=ink)
        draw.rectangle((x0, cy - w / 2, x1, cy + w / 2 - 1), fill=ink)
    else:  # diamond
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=ink)


def off_domain(rng: np.random.Generator) -> tuple[np.ndarray, str, dict]:
    """(image, caption, facts): shapes with a count and tone, a pattern, a bar chart or an arrow, captioned
    accurately; `facts` says what was drawn (for the tests)."""
    from PIL import ImageDraw

    what = ("shapes", "shapes", "pattern", "chart", "arrow")[int(rng.integers(5))]
    tone = tuple(TONES)[int(rng.integers(len(TONES)))]
    canvas, ink = _canvas(tone, rng)
    draw = ImageDraw.Draw(canvas)
    facts: dict = {"what": what, "tone": tone}
    if what == "shapes":
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        n = int(rng.integers(1, 5))
        cells = rng.permutation(4)[:n]
        for cell in cells:  # one shape per 16×16 quarter, 10–13 px, jittered inside it
            s = int(rng.integers(10, 14))
            ox, oy = (cell % 2) * 16 + int(rng.integers(1, 16 - s)), (cell // 2) * 16 + int(rng.integers(1, 16 - s))
            _shape(draw, shape, (ox, oy, ox + s - 1, oy + s - 1), ink)
        facts.update(shape=shape, count=n)
        noun = shape if n == 1 else PLURAL[shape]
        art = ("an" if tone[0] in "aeiou" else "a") if n == 1 else NUMBERS[n]
        caption = (f"{art} {tone} {noun}", f"{art} {tone} {noun} on a plain background", f"clipart: {art} {tone} {noun}",
                   f"{art} {tone} {noun}, vector icon")[int(rng.integers(4))]
    elif what == "pattern":
        kind = PATTERNS[int(rng.integers(len(PATTERNS)))]
        period = int(rng.choice([4, 6, 8]))
        yy, xx = np.mgrid[:SIZE, :SIZE]
        if kind == "horizontal stripes":
            on = (yy // (period // 2)) % 2 == 0
        elif kind == "vertical stripes":
            on = (xx // (period // 2)) % 2 == 0
        elif kind == "a checkerboard pattern":
            on = ((yy // period) + (xx // period)) % 2 == 0
        else:
            on = ((yy % 8 - 3.5) ** 2 + (xx % 8 - 3.5) ** 2) <= 5
        arr = np.asarray(canvas).copy()
        arr[on] = ink
        facts.update(pattern=kind)
        caption = (f"{kind}", f"{tone} {kind.removeprefix('a ')}", f"{kind} texture", f"seamless {kind.removeprefix('a ')}",
                   f"background with {kind}")[int(rng.integers(5))]
        return arr, caption, facts
    elif what == "chart":
        n = int(rng.integers(2, 7))
        bw = (SIZE - 4) // n
        for k in range(n):
            h = int(rng.integers(5, SIZE - 4))
            draw.rectangle((2 + k * bw, SIZE - 2 - h, 2 + k * bw + bw - 3, SIZE - 3), fill=ink)
        facts.update(count=n)
        caption = (f"a bar chart with {n} bars", f"bar graph, {n} bars", f"a simple chart with {n} bars",
                   f"infographic: bar chart ({n} bars)")[int(rng.integers(4))]
    else:
        d = ARROWS[int(rng.integers(4))]
        pts = [(4, 13), (18, 13), (18, 6), (28, 16), (18, 26), (18, 19), (4, 19)]  # pointing right
        turn = {"right": lambda x, y: (x, y), "left": lambda x, y: (SIZE - 1 - x, y),
                "down": lambda x, y: (y, x), "up": lambda x, y: (y, SIZE - 1 - x)}[d]
        draw.polygon([turn(x, y) for x, y in pts], fill=ink)
        facts.update(direction=d)
        caption = (f"an arrow pointing {d}", f"{tone} arrow pointing {d}", f"{d} arrow icon",
                   f"arrow sign: {d}")[int(rng.integers(4))]
    arr = np.asarray(canvas).astype(np.float32) + 3.0 * rng.standard_normal((SIZE, SIZE))
    return np.clip(arr, 0, 255).round().astype(np.uint8), caption, facts


# ------------------------------------------------------------------------------------------ low information

LOW_INFO_TEMPLATES = ("seamless {c} pattern", "{c} pattern, repeated", "set of 4 {c} icons", "{c} wallpaper",
                      "grid of the same {c}", "{c} x4")


def low_info(img: np.ndarray, class_name: str, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """One image at half size tiled 2×2 (the same item four times), and a caption naming its class."""
    from PIL import Image

    half = np.asarray(Image.fromarray(img).resize((SIZE // 2, SIZE // 2), Image.BILINEAR))
    tiled = np.tile(half, (2, 2))
    return tiled, LOW_INFO_TEMPLATES[int(rng.integers(len(LOW_INFO_TEMPLATES)))].format(c=class_name)
