"""Web alt-text-like captions: aligned (many templates), wrong class, uninformative, non-English.

Aligned captions may also name visible attributes of their image, measured from its pixels (see
`measure`): how much of the frame the object covers (size / stroke thickness), how bright it is, and for
clothes how patterned. Each attribute has three levels split at the source's tertiles (`levels`). A
wrong-class caption carries attribute words too, drawn at random, so its form gives nothing away.
"""

from __future__ import annotations

import numpy as np

# English alt-text templates, per caption vocabulary; `{c}` is a class word, `{n}` the numeral (digits)
ALIGNED = {
    "digit": (
        "{c}", "the number {c}", "handwritten {c}", "a handwritten digit {c}", "a {c} written by hand",
        "digit {n} on a black background", "number {n} clipart", "the number {n} in white",
        "hand-drawn number {c}", "{n}", "a scan of the digit {n}", "white {c} on black",
        "how to write the number {c}", "Number {n} - free printable", "low resolution {c}",
    ),
    "fashion": (
        "{c}", "a photo of a {c}", "{c} for sale", "black and white photo of a {c}", "my new {c}!",
        "buy {c} online", "vintage {c}", "close-up of a {c}", "{c}, size M", "cheap {c} free shipping",
        "women's {c} - product photo", "men's {c} on white background", "classic {c}, studio shot",
        "the perfect {c} for summer", "{c} (front view)",
    ),
}
UNINFORMATIVE = (
    "IMG_{i:04d}.jpg", "DSC{i:05d}.JPG", "click to enlarge", "image", "untitled", "thumbnail",
    "photo {i} of 12", "view larger image", "product image", "no description available",
    "Screenshot_{i}", "{h:08x}.png", "stock photo", "loading...", "Image may contain: 1 item",
)
LANGUAGES = ("de", "fr", "es")
FOREIGN = {
    "de": ("ein Foto von {c}", "{c} günstig online kaufen", "Abbildung: {c} in schwarz-weiß",
           "unser neues Produkt: {c}", "{c} – jetzt bestellen und sparen", "handgezeichnet: {c}"),
    "fr": ("une photo de {c}", "{c} pas cher, livraison gratuite", "image : {c} en noir et blanc",
           "notre nouveau produit : {c}", "acheter {c} en ligne", "dessiné à la main : {c}"),
    "es": ("una foto de {c}", "{c} barato con envío gratis", "imagen: {c} en blanco y negro",
           "nuestro nuevo producto: {c}", "comprar {c} en línea", "dibujado a mano: {c}"),
}
TRANSLATIONS = {
    "digit": {
        "de": ("null", "eins", "zwei", "drei", "vier", "fünf", "sechs", "sieben", "acht", "neun"),
        "fr": ("zéro", "un", "deux", "trois", "quatre", "cinq", "six", "sept", "huit", "neuf"),
        "es": ("cero", "uno", "dos", "tres", "cuatro", "cinco", "seis", "siete", "ocho", "nueve"),
    },
    "fashion": {
        "de": ("T-Shirt", "Hose", "Pullover", "Kleid", "Mantel", "Sandale", "Hemd", "Turnschuh", "Tasche",
               "Stiefelette"),
        "fr": ("t-shirt", "pantalon", "pull", "robe", "manteau", "sandale", "chemise", "basket", "sac", "bottine"),
        "es": ("camiseta", "pantalón", "jersey", "vestido", "abrigo", "sandalia", "camisa", "zapatilla", "bolso",
               "botín"),
    },
}
# clip_benchmark-style zero-shot templates for the downstream tasks
ZEROSHOT_TEMPLATES = {
    "digit": ('a photo of the number: "{c}".', "the digit {c}.", "a handwritten {c}."),
    "fashion": ("a photo of a {c}.", "a black and white photo of a {c}.", "a low resolution photo of a {c}."),
}


# attribute -> words for its low / middle / high tertile (None: no word), in caption order, per vocabulary
ATTRIBUTES = {
    "digit": {"size": ("thin", "medium", "bold"), "brightness": ("faint", "grey", "bright")},
    "fashion": {"size": ("small", "medium-sized", "large"), "brightness": ("dark", "grey", "light"),
                "texture": ("plain", None, "patterned")},
}
INK = 40  # a pixel brighter than this belongs to the object (images are white on black)


def measure(images: np.ndarray) -> dict[str, np.ndarray]:
    """Per image (N, H, W) uint8: `size` = share of object pixels, `brightness` = their mean, `texture` =
    their standard deviation (0 for an empty image)."""
    out: dict[str, list] = {"size": [], "brightness": [], "texture": []}
    for start in range(0, len(images), 4096):  # bounded memory for Fashion-MNIST's 61k images
        x = images[start:start + 4096].astype(np.float32)
        fg = x > INK
        n = np.maximum(fg.sum((1, 2)), 1)
        mean = (x * fg).sum((1, 2)) / n
        out["size"].append(fg.mean((1, 2)))
        out["brightness"].append(mean)
        out["texture"].append(np.sqrt(np.maximum((x * x * fg).sum((1, 2)) / n - mean**2, 0)))
    return {k: np.concatenate(v) for k, v in out.items()}


def levels(images: np.ndarray) -> dict[str, np.ndarray]:
    """Tertile cut points of each measured attribute over a source's images (the caption levels)."""
    return {k: np.quantile(v, [1 / 3, 2 / 3]) for k, v in measure(images).items()}


def attribute_words(kind: str, image: np.ndarray, cuts: dict[str, np.ndarray]) -> dict[str, str | None]:
    """{attribute: word or None} of one image, in the caption vocabulary `kind`."""
    m = measure(image[None])
    return {a: words[int(np.searchsorted(cuts[a], m[a][0], side="right"))] for a, words in ATTRIBUTES[kind].items()}


def random_words(kind: str, rng: np.random.Generator) -> dict[str, str | None]:
    """Attribute words drawn at random (for captions that do not describe their image)."""
    return {a: words[int(rng.integers(3))] for a, words in ATTRIBUTES[kind].items()}


def aligned(kind: str, classes: tuple[str, ...], label: int, rng: np.random.Generator,
            words: dict[str, str | None] | None = None, p_attribute: float = 0.0) -> str:
    """A template of ALIGNED[kind]; each of `words` (attribute -> word) is named with probability
    `p_attribute`, as adjectives before the class word (`a photo of a large dark coat`)."""
    t = ALIGNED[kind][rng.integers(len(ALIGNED[kind]))]
    adjs = [w for w in (words or {}).values() if rng.random() < p_attribute and w]
    if adjs:
        slot = "{c}" if "{c}" in t else "{n}"
        t = t.replace(slot, " ".join(adjs) + " " + slot, 1)
    return t.format(c=classes[label], n=label)


def wrong_class(kind: str, classes: tuple[str, ...], label: int | None, rng: np.random.Generator,
                p_attribute: float = 0.0) -> str:
    """An aligned-looking caption of another class (any class when the image has none), its attribute
    words (if any) drawn at random."""
    others = [k for k in range(len(classes)) if k != label]
    return aligned(kind, classes, int(others[rng.integers(len(others))]), rng, random_words(kind, rng), p_attribute)


def retrieval_captions(kind: str, classes: tuple[str, ...], label: int, words: dict[str, str | None],
                       rng: np.random.Generator, n: int = 2) -> list[str]:
    """`n` captions of one held-out image, each naming the class and every attribute word, in distinct
    templates (so images of one class are told apart by what they look like)."""
    picks = rng.permutation(len(ALIGNED[kind]))[:n]
    adjs = " ".join(w for w in words.values() if w)
    out = []
    for k in picks:
        t = ALIGNED[kind][k]
        slot = "{c}" if "{c}" in t else "{n}"
        out.append(t.replace(slot, f"{adjs} {slot}" if adjs else slot, 1).format(c=classes[label], n=label))
    return out


def uninformative(rng: np.random.Generator) -> str:
    t = UNINFORMATIVE[rng.integers(len(UNINFORMATIVE))]
    return t.format(i=int(rng.integers(1, 10_000)), h=int(rng.integers(0, 2**32)))


def non_english(kind: str, label: int, rng: np.random.Generator) -> tuple[str, str]:
    """(caption, language): a hand-written template of one of LANGUAGES with the translated class."""
    lang = LANGUAGES[rng.integers(len(LANGUAGES))]
    t = FOREIGN[lang][rng.integers(len(FOREIGN[lang]))]
    return t.format(c=TRANSLATIONS[kind][lang][label]), lang
