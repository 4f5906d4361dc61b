"""Web alt-text-like captions: aligned (many templates), wrong class, uninformative, non-English."""

from __future__ import annotations

import numpy as np

# English alt-text templates, per caption vocabulary; `{c}` is a class word, `{n}` the numeral (digits)
ALIGNED = {
    "digit": (
        "{c}", "the number {c}", "handwritten {c}", "a handwritten digit {c}", "a {c} written by hand",
        "digit {n} on a black background", "number {n} clipart", "the number {n} in white",
        "hand-drawn number {c}", "{n}", "a scan of the digit {n}", "big white {c} on black",
        "how to write the number {c}", "Number {n} - free printable", "low resolution {c}",
    ),
    "fashion": (
        "{c}", "a photo of a {c}", "{c} for sale", "black and white photo of a {c}", "my new {c}!",
        "buy {c} online", "vintage {c}", "close-up of a {c}", "{c}, size M", "cheap {c} free shipping",
        "women's {c} - product photo", "men's {c} on white background", "classic {c} in grey",
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


def aligned(kind: str, classes: tuple[str, ...], label: int, rng: np.random.Generator) -> str:
    t = ALIGNED[kind][rng.integers(len(ALIGNED[kind]))]
    return t.format(c=classes[label], n=label)


def wrong_class(kind: str, classes: tuple[str, ...], label: int | None, rng: np.random.Generator) -> str:
    """An aligned-looking caption of another class (any class when the image has none)."""
    others = [k for k in range(len(classes)) if k != label]
    return aligned(kind, classes, int(others[rng.integers(len(others))]), rng)


def uninformative(rng: np.random.Generator) -> str:
    t = UNINFORMATIVE[rng.integers(len(UNINFORMATIVE))]
    return t.format(i=int(rng.integers(1, 10_000)), h=int(rng.integers(0, 2**32)))


def non_english(kind: str, label: int, rng: np.random.Generator) -> tuple[str, str]:
    """(caption, language): a hand-written template of one of LANGUAGES with the translated class."""
    lang = LANGUAGES[rng.integers(len(LANGUAGES))]
    t = FOREIGN[lang][rng.integers(len(FOREIGN[lang]))]
    return t.format(c=TRANSLATIONS[kind][lang][label]), lang
