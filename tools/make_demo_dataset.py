#!/usr/bin/env python3
"""Build the bilingual (English/Chinese) emoji demo image–caption set from Noto Color Emoji.

Every fully-qualified emoji that the ``emoji`` package names in both English and Chinese, and
that the installed Noto Color Emoji font can draw as one glyph, is rendered with Pillow, composited
onto a plain background and resized to ``--image-size`` px. Each image gets one English and one
Chinese caption built from its names. The set is split **by concept** into train / validation /
test, so the validation and test images *and* names never occur in training.

Steps:

1. render ``<work-dir>/images/<codepoints>.png`` and write ``<work-dir>/{split}.jsonl``
   (the preprocessing tool's input format, one record per line)::

     {"image": "images/1f600.png",
      "captions": [{"text": "an emoji of grinning face", "lang": "en"},
                   {"text": "嘿嘿的表情符号", "lang": "zh"}],
      "id": "1f600", "emoji": "😀"}

2. unless ``--skip-build``: train the SentencePiece tokenizer on the **train** captions
   (``tools/train_tokenizer.py``) and pack each split into a Megatron indexed dataset
   (``tools/preprocess_data.py``) under ``--output-dir``;
3. write ``README.md``, ``LICENSE.md`` and ``stats.json`` into ``--output-dir``.

Runs are deterministic: the same font, ``emoji`` and Pillow versions and the same options give
byte-identical manifests and PNGs (the versions are recorded in ``stats.json``).

Examples::

    python tools/make_demo_dataset.py                      # full build into data/emoji_demo/
    python tools/make_demo_dataset.py --skip-build --work-dir /tmp/emoji --limit 30
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOOLS_DIR = ROOT / "tools"
DEFAULT_OUTPUT_DIR = ROOT / "data" / "emoji_demo"

log = logging.getLogger("make_demo_dataset")

DEBIAN_FONT_PACKAGE = "fonts-noto-color-emoji"
FONT_FILE = "NotoColorEmoji.ttf"
# Debian/Ubuntu first (the documented setup), then other distributions' layouts.
FONT_CANDIDATES = (
    Path("/usr/share/fonts/truetype/noto") / FONT_FILE,
    Path("/usr/share/fonts/noto") / FONT_FILE,
    Path("/usr/share/fonts/google-noto-color-emoji") / FONT_FILE,
    Path("/usr/share/fonts/truetype/noto-color-emoji") / FONT_FILE,
    Path("/usr/local/share/fonts") / FONT_FILE,
)
# Noto Color Emoji is a CBDT bitmap font whose strikes are 109 px; FreeType refuses other sizes.
FONT_SIZE = 109
# Padding (source px) around the font's glyph cell, so that the trainer's crop augmentation
# rarely cuts into the emoji itself.
CELL_PAD = 4

SPLITS = ("train", "validation", "test")
SKIN_TONES = frozenset(chr(c) for c in range(0x1F3FB, 0x1F400))
ZWJ = "\u200d"
VS16 = "\ufe0f"
REGIONAL_INDICATORS = range(0x1F1E6, 0x1F200)
TAG_CHARS = range(0xE0020, 0xE0080)
BLACK_FLAG = "\U0001f3f4"
# An unassigned flag (ZZ): the font draws its "unknown flag" glyph for it, which is also what
# it draws for any real flag it lacks; such renders are skipped.
UNKNOWN_FLAG = "\U0001f1ff\U0001f1ff"

# Short templates (a few tokens around the name): the names carry the content, the templates
# only keep the text encoder from seeing bare names alone.
TEMPLATES = {
    "en": ("an emoji of {name}", "{name}", "a picture of {name}", "an icon of {name}"),
    "zh": ("{name}的表情符号", "{name}", "一个{name}的图标", "{name}的图片"),
}

# Light grey rather than white: white emoji parts (clouds, eggs, paper, white flags and
# circles) would vanish into a white background, black ones (black circle, black heart)
# into a dark one; a light grey keeps both visible.
DEFAULT_BACKGROUND = "#e0e0e0"
DEFAULT_VOCAB_SIZE = 2000
DEFAULT_HAN_AS_CHARACTERS = False
DEFAULT_TRAIN_CAPTIONS = "one"


@dataclass(frozen=True)
class Entry:
    """One emoji with its cleaned names."""

    emoji: str
    id: str
    en: str
    zh: str


def codepoints_id(e: str) -> str:
    """``'1f468-200d-1f3eb'``: a file-name-safe id (lower-case hex code points joined by '-')."""
    return "-".join(f"{ord(c):04x}" for c in e)


def is_flag(e: str) -> bool:
    """Country/region flags (regional-indicator pairs or black flag + tag sequences).

    Their ``emoji`` names are bare place names ("China"), so captions add the word "flag".
    """
    cps = [ord(c) for c in e]
    if len(cps) == 2 and all(c in REGIONAL_INDICATORS for c in cps):
        return True
    return e[0] == BLACK_FLAG and len(e) > 1 and all(c in TAG_CHARS for c in cps[1:])


def concept_key(e: str) -> str:
    """The concept an emoji belongs to, ignoring gender and direction variants.

    "man teacher", "woman teacher" and "teacher" (or "woman running facing right" and "person
    running") look almost alike at 64 px, so they share one key and land in the same split;
    otherwise near-duplicate images would leak from training into validation/test.
    """
    key = e.replace(VS16, "")
    for suffix in ("\u2640", "\u2642", "\u27a1"):  # ♀ ♂ ➡
        key = key.replace(ZWJ + suffix, "")
    if ZWJ in key:  # man/woman/person (boy/girl/child) inside sequences: professions, families
        key = key.translate({0x1F468: 0x1F9D1, 0x1F469: 0x1F9D1, 0x1F466: 0x1F9D2,
                             0x1F467: 0x1F9D2})
    return key


def _clean_name(raw: str) -> str:
    """``':grinning_face:'`` → ``'grinning face'``; Chinese too: ``':按键_6:'`` → ``'按键 6'``."""
    return raw.strip(":").replace("_", " ").strip()


def load_catalog(limit: int | None = None) -> tuple[list[Entry], dict[str, int]]:
    """Fully-qualified, skin-tone-free emoji with English and Chinese names, sorted by code points.

    Returns the entries (the first ``limit`` only, when given) and the counts of what was dropped.
    """
    try:
        import emoji
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise SystemExit("the 'emoji' package (>= 2.16) is needed: "
                         "pip install 'emoji>=2.16'") from exc
    # emoji 2.16 loads only English names by default; this adds a 'zh' key to every EMOJI_DATA
    # entry. demojize(language='zh') is the fallback for versions without load_language.
    load_language = getattr(getattr(emoji, "config", None), "load_language", None)
    if load_language is not None:
        load_language("zh")
    fully_qualified = emoji.STATUS["fully_qualified"]
    dropped = {"not_fully_qualified": 0, "skin_tone": 0, "missing_name": 0}
    entries = []
    for e, data in emoji.EMOJI_DATA.items():
        if data.get("status") != fully_qualified:
            dropped["not_fully_qualified"] += 1
            continue
        if SKIN_TONES.intersection(e):
            dropped["skin_tone"] += 1
            continue
        zh_raw = data.get("zh")
        if zh_raw is None:
            zh_raw = emoji.demojize(e, language="zh")
            zh_raw = None if zh_raw == e else zh_raw
        en, zh = _clean_name(data.get("en") or ""), _clean_name(zh_raw or "")
        if not en or not zh:
            dropped["missing_name"] += 1
            continue
        if is_flag(e):
            en, zh = f"{en} flag", f"{zh}旗帜"
        entries.append(Entry(emoji=e, id=codepoints_id(e), en=en, zh=zh))
    entries.sort(key=lambda x: [ord(c) for c in x.emoji])
    if limit is not None:
        entries = entries[:limit]
    return entries, dropped


def find_font(explicit: str | None = None) -> Path:
    """Path of NotoColorEmoji.ttf: ``explicit``, a known install location, or fontconfig's."""
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise SystemExit(f"--font {path}: no such file")
        return path
    for path in FONT_CANDIDATES:
        if path.is_file():
            return path
    fc_match = shutil.which("fc-match")
    if fc_match:
        # fc-match always answers with *some* font, so accept only the emoji font itself.
        out = subprocess.run([fc_match, "-f", "%{file}", "Noto Color Emoji"],
                             capture_output=True, text=True, check=False).stdout.strip()
        if out and Path(out).name == FONT_FILE and Path(out).is_file():
            return Path(out)
    raise SystemExit(
        f"{FONT_FILE} not found (looked in {', '.join(str(p.parent) for p in FONT_CANDIDATES)} "
        f"and fontconfig). Install the Debian package {DEBIAN_FONT_PACKAGE} "
        f"(apt-get install {DEBIAN_FONT_PACKAGE}) or pass --font PATH.")


class Renderer:
    """Draws one emoji as an RGB square of ``image_size`` px on a plain background.

    Every emoji is placed in the same square (the font's glyph cell plus a small pad) before the
    resize, so relative sizes survive: "small orange diamond" stays smaller than "large orange
    diamond". The drawn pixels are centred in that square.
    """

    def __init__(self, font_path: Path, image_size: int, background: tuple[int, int, int]):
        from PIL import ImageFont, features

        # Raqm (HarfBuzz) shapes ZWJ sequences, flags and keycaps into their single ligature
        # glyphs; the basic layout would draw their components side by side (skipped below).
        if features.check("raqm"):
            self.layout = "raqm"
            engine = ImageFont.Layout.RAQM
        else:
            self.layout = "basic"
            engine = ImageFont.Layout.BASIC
            log.warning("Pillow lacks raqm: ZWJ sequences and flags will not render as single "
                        "glyphs and are skipped; the set will be smaller than with raqm")
        self.font = ImageFont.truetype(str(font_path), FONT_SIZE, layout_engine=engine)
        left, top, right, bottom = self.font.getbbox("\U0001f600")
        self.cell = max(right - left, bottom - top)  # 136 px for Noto Color Emoji at 109
        self.side = self.cell + 2 * CELL_PAD
        self.image_size = image_size
        self.background = background
        unknown = self._draw(UNKNOWN_FLAG)
        self._unknown_flag = (unknown.size, unknown.tobytes()) if unknown is not None else None

    def _draw(self, e: str):
        """The drawn pixels of ``e`` cropped to their alpha box, or None if nothing is drawn."""
        from PIL import Image, ImageDraw

        # A canvas three cells wide: a sequence the font lacks draws its parts side by side and
        # overflows one cell, which render() detects.
        canvas = Image.new("RGBA", (3 * self.cell, 2 * self.cell), (0, 0, 0, 0))
        ImageDraw.Draw(canvas).text((self.cell, self.cell // 2), e, font=self.font,
                                    embedded_color=True)
        box = canvas.getchannel("A").getbbox()
        return canvas.crop(box) if box else None

    def render(self, e: str):
        """``(image, None)`` or ``(None, reason)`` with reason in empty/multi_glyph/unknown_flag."""
        from PIL import Image

        glyph = self._draw(e)
        if glyph is None:
            return None, "empty"
        if glyph.width > self.cell or glyph.height > self.cell:
            return None, "multi_glyph"
        if self._unknown_flag is not None and (glyph.size, glyph.tobytes()) == self._unknown_flag:
            return None, "unknown_flag"
        square = Image.new("RGBA", (self.side, self.side), (*self.background, 255))
        offset = ((self.side - glyph.width) // 2, (self.side - glyph.height) // 2)
        square.alpha_composite(glyph, offset)
        # Composite first, then resize: resizing straight (non-premultiplied) RGBA would bleed
        # the colour of transparent pixels into the emoji's edges.
        image = square.convert("RGB")
        size = (self.image_size, self.image_size)
        return image.resize(size, Image.Resampling.LANCZOS), None


def captions_for(entry: Entry, seed: int) -> list[dict[str, str]]:
    """One English and one Chinese caption; templates drawn from an RNG seeded per emoji.

    Seeding per emoji (not one stream) keeps an emoji's captions independent of ``--limit`` and
    of which other emoji the installed versions know.
    """
    rng = random.Random(f"{seed}:{entry.id}")
    return [{"text": rng.choice(TEMPLATES[lang]).format(name=name), "lang": lang}
            for lang, name in (("en", entry.en), ("zh", entry.zh))]


def all_captions_for(entry: Entry) -> list[dict[str, str]]:
    """Every template in both languages (``--train-captions all``): the trainer draws one per
    step, so the template varies between epochs and only the name stays tied to the image."""
    return [{"text": template.format(name=name), "lang": lang}
            for lang, name in (("en", entry.en), ("zh", entry.zh))
            for template in TEMPLATES[lang]]


def parse_split(spec: str) -> tuple[float, float, float]:
    """``'80,10,10'`` → fractions of train/validation/test (any positive total)."""
    try:
        parts = [float(p) for p in spec.split(",")]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"bad --split {spec!r}") from exc
    if len(parts) != 3 or min(parts) < 0 or parts[0] <= 0:
        raise argparse.ArgumentTypeError(
            f"--split needs train,validation,test weights (train > 0, none negative): {spec!r}")
    total = sum(parts)
    return tuple(p / total for p in parts)


def split_by_concept(entries: list[Entry], fractions, seed: int) -> dict[str, list[Entry]]:
    """Assign whole concepts (see :func:`concept_key`) to splits with a seeded shuffle.

    Concepts are counted, not emoji, so a split's emoji count is only roughly its fraction. Each
    split with a positive fraction gets at least one concept when there are enough of them.
    """
    groups: dict[str, list[Entry]] = {}
    for entry in entries:
        groups.setdefault(concept_key(entry.emoji), []).append(entry)
    keys = sorted(groups, key=lambda k: [ord(c) for c in k])
    random.Random(seed).shuffle(keys)
    n = len(keys)
    counts = [int(f * n) for f in fractions]
    # Largest remainders get the concepts that flooring left over.
    by_remainder = sorted(range(3), key=lambda i: (-(fractions[i] * n - counts[i]), i))
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    for i in range(1, 3):
        if fractions[i] > 0 and counts[i] == 0 and counts[0] > 1:
            counts[0] -= 1
            counts[i] += 1
    splits, start = {}, 0
    for name, count in zip(SPLITS, counts):
        chosen = keys[start:start + count]
        start += count
        members = [e for k in chosen for e in groups[k]]
        splits[name] = sorted(members, key=lambda x: [ord(c) for c in x.emoji])
    return splits


def write_split(work_dir: Path, name: str, records: list[dict]) -> Path:
    """Write ``{name}.jsonl`` (UTF-8, one JSON object per line, '\\n' line ends)."""
    path = work_dir / f"{name}.jsonl"
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return path


def render_all(entries, renderer: Renderer, work_dir: Path, seed: int):
    """Render every entry into ``work_dir/images``; return kept records by id and skip counts."""
    image_dir = work_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    records, skipped, png_bytes = {}, {"empty": 0, "multi_glyph": 0, "unknown_flag": 0}, 0
    for i, entry in enumerate(entries):
        image, reason = renderer.render(entry.emoji)
        if image is None:
            skipped[reason] += 1
            log.debug("skip %s (%s): %s", entry.id, entry.en, reason)
            continue
        rel = f"images/{entry.id}.png"
        # No metadata chunks and fixed settings: identical pixels give identical bytes.
        image.save(work_dir / rel, format="PNG", optimize=False)
        png_bytes += (work_dir / rel).stat().st_size
        records[entry.id] = {"image": rel, "captions": captions_for(entry, seed),
                             "id": entry.id, "emoji": entry.emoji}
        if (i + 1) % 500 == 0:
            log.info("rendered %d/%d", i + 1, len(entries))
    return records, skipped, png_bytes


def run_build(work_dir: Path, out_dir: Path, split_paths: dict[str, Path], args) -> None:
    """Train the tokenizer on the train captions, then pack every split into .bin/.idx."""
    train_tok, preprocess = TOOLS_DIR / "train_tokenizer.py", TOOLS_DIR / "preprocess_data.py"
    missing = [str(p) for p in (train_tok, preprocess) if not p.is_file()]
    if missing:
        raise SystemExit(f"cannot build the indexed dataset: missing {', '.join(missing)}; "
                         f"rerun with --skip-build to render the images and manifests only "
                         f"(kept in {work_dir})")
    # Train captions only: validation/test text must stay unseen, or the tokenizer would
    # memorise their names as pieces and leak them into training.
    commands = [[sys.executable, str(train_tok), "--input", str(split_paths["train"]),
                 "--model-prefix", str(out_dir / "tokenizer"),
                 "--vocab-size", str(args.vocab_size)]
                + (["--han-as-characters"] if args.han_as_characters else [])]
    for name, path in split_paths.items():
        commands.append([sys.executable, str(preprocess), "--input", str(path),
                         "--output-prefix", str(out_dir / name),
                         "--tokenizer-model", str(out_dir / "tokenizer.model"),
                         "--workers", "2", "--max-image-size", str(args.image_size),
                         "--reject-log", str(out_dir / f"{name}.rejects.jsonl"),
                         # Chunks left by an interrupted earlier build may come from other
                         # options (seed, size, tokenizer); a rebuild takes seconds anyway.
                         "--no-resume"])
    for cmd in commands:
        log.info("running %s", " ".join(cmd[1:]))
        result = subprocess.run(cmd, check=False)
        if result.returncode != 0:
            raise SystemExit(f"{Path(cmd[1]).name} failed (exit {result.returncode}); "
                             f"inputs kept in {work_dir}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def rebuild_command(args) -> str:
    """The command line that rebuilds this output (paths as given, defaults left out)."""
    parts = ["python tools/make_demo_dataset.py"]
    if args.output_dir is not None:
        parts.append(f"--output-dir {args.output_dir}")
    for flag, value, default in (("--image-size", args.image_size, 64),
                                 ("--seed", args.seed, 1234),
                                 ("--split", args.split_spec, "80,10,10"),
                                 ("--vocab-size", args.vocab_size, DEFAULT_VOCAB_SIZE),
                                 ("--background", args.background, DEFAULT_BACKGROUND)):
        if value != default:
            parts.append(f"{flag} {value}")
    if args.train_captions != DEFAULT_TRAIN_CAPTIONS:
        parts.append(f"--train-captions {args.train_captions}")
    if args.han_as_characters != DEFAULT_HAN_AS_CHARACTERS:
        parts.append("--han-as-characters" if args.han_as_characters
                     else "--no-han-as-characters")
    if args.limit is not None:
        parts.append(f"--limit {args.limit}")
    if args.skip_build:
        parts.append(f"--skip-build --work-dir {args.work_dir or 'DIR'}")
    return " ".join(parts)


def write_docs(out_dir: Path, stats: dict, args) -> None:
    """README.md (what, counts, how to rebuild) and LICENSE.md (where each part comes from)."""
    counts = stats["splits"]
    built = not args.skip_build
    files = (["`tokenizer.model`: SentencePiece model trained on the train captions only",
              "`{train,validation,test}.bin/.idx`: Megatron indexed datasets (tokenised captions "
              "and encoded images)", "`{split}.meta.json`: dataset cards (the tokenizer, text "
              "style and text length the captions were made with)",
              "`{split}.rejects.jsonl`: records the preprocessing rejected"] if built else
             [f"(built with `--skip-build`: the images and `{{split}}.jsonl` manifests are in "
              f"the work dir `{args.work_dir}`, no indexed dataset here)"])
    files += ["`stats.json`: counts, skips, seed and tool/font versions", "`LICENSE.md`"]
    rows = "\n".join(f"| {s} | {counts[s]['emoji']} | {counts[s]['concepts']} |" for s in SPLITS)
    filtered = ", ".join(f"{k}: {v}" for k, v in stats["filtered"].items())
    skipped = ", ".join(f"{k}: {v}" for k, v in stats["skipped"].items())
    size = stats["image_size"]
    readme = f"""# Emoji demo set (bilingual image–caption pairs)

{stats['rendered']} emoji rendered from the Noto Color Emoji font ({size}×{size} px RGB on a
plain {stats['background']} background), each with one English and one Chinese caption built
from its names in the `emoji` package (templates such as "an emoji of {{name}}" /
"{{name}}的表情符号"; flags read "{{place}} flag" / "{{place}}旗帜"). It is the default training
data of the project's demo job: small enough to train a tiny model on a CPU in minutes.

Split **by concept** with seed {stats['seed']} (weights {stats['split_weights']}): gender and
direction variants of one emoji ("man teacher", "woman teacher", "teacher") form one concept
and stay in one split, so validation/test images and names never occur in training. The
tokenizer is trained on the train captions only, for the same reason.

| split | emoji | concepts |
|---|---|---|
{rows}

Counts are before preprocessing (records it rejects are listed in `{{split}}.rejects.jsonl`).
Not included: skin-tone variants and emoji that are not fully qualified ({filtered}), and
emoji this font cannot draw as one glyph ({skipped}).

## Files

{chr(10).join('- ' + f for f in files)}

## Rebuild

```
apt-get install {DEBIAN_FONT_PACKAGE}   # font package {stats['font']['package_version']}
pip install 'emoji=={stats['versions']['emoji']}'
{rebuild_command(args)}
```

Byte-identical output needs the same font file (sha256 `{stats['font']['sha256'][:16]}…`),
`emoji` {stats['versions']['emoji']} and Pillow {stats['versions']['pillow']}.
"""
    license_md = f"""# Licences of the emoji demo set

- **Images**: rendered from *Noto Color Emoji* (Debian package `{DEBIAN_FONT_PACKAGE}`,
  © Google Inc., upstream https://github.com/googlefonts/noto-emoji), licensed under the
  **SIL Open Font License 1.1** (https://openfontlicense.org). Under the OFL, "the requirement
  for fonts to remain under this license does not apply to any document created using the
  fonts or their derivatives"; the images here are such output. The font itself is not
  included.
- **Names and captions**: the English and Chinese emoji names come from the Python package
  `emoji` {stats['versions']['emoji']} (© Taehoon Kim, Kevin Wurster; **BSD 3-Clause licence**).
  They derive from Unicode emoji data and CLDR annotations (© Unicode, Inc.,
  **Unicode License v3**, https://www.unicode.org/license.txt). The caption templates are this
  project's.
- **Tokenizer and indexed datasets**: derived from the above by this project's tools.

Included: {stats['rendered']} images with two captions each (English, Chinese), split into
train/validation/test as listed in `README.md` and `stats.json`.
"""
    (out_dir / "README.md").write_text(readme, encoding="utf-8")
    (out_dir / "LICENSE.md").write_text(license_md, encoding="utf-8")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output-dir", type=Path, default=None,
                   help=f"tokenizer, indexed datasets and docs (default {DEFAULT_OUTPUT_DIR})")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="images and {split}.jsonl manifests (default: a temporary dir, deleted "
                        "after a successful build, kept with --skip-build)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--split", dest="split_spec", default="80,10,10",
                   help="train,validation,test weights")
    p.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE,
                   help="SentencePiece pieces (a soft limit). 2,000 keeps English words in "
                        "sub-word pieces that held-out names share; the specials, byte pieces and "
                        "the captions' Chinese characters need about 1,570")
    p.add_argument("--han-as-characters", action=argparse.BooleanOptionalAction,
                   default=DEFAULT_HAN_AS_CHARACTERS,
                   help="tokenizer: Chinese one character per token (m2-train-tokenizer "
                        "--han-as-characters)")
    p.add_argument("--train-captions", choices=("one", "all"), default=DEFAULT_TRAIN_CAPTIONS,
                   help="captions of a train image: one per language (a template drawn per "
                        "emoji, as validation and test) or all of them (every template in both "
                        "languages; training draws one per step)")
    p.add_argument("--limit", type=int, default=None,
                   help="only the first N emoji in code-point order (for tests)")
    p.add_argument("--skip-build", action="store_true",
                   help="render images and manifests only; no tokenizer or indexed dataset")
    p.add_argument("--background", default=DEFAULT_BACKGROUND,
                   help="background colour (any Pillow colour; light grey keeps white and black "
                        "emoji visible)")
    p.add_argument("--font", default=None, help=f"path of {FONT_FILE} (default: search)")
    p.add_argument("-v", "--verbose", action="store_true", help="log every skipped emoji")
    args = p.parse_args(argv)
    try:
        args.split = parse_split(args.split_spec)
    except argparse.ArgumentTypeError as exc:
        p.error(str(exc))
    if args.image_size < 8:
        p.error("--image-size must be at least 8")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    import PIL
    from PIL import ImageColor

    background = ImageColor.getrgb(args.background)[:3]
    font_path = find_font(args.font)
    out_dir = (args.output_dir or DEFAULT_OUTPUT_DIR).resolve()
    temporary = args.work_dir is None
    work_dir = Path(tempfile.mkdtemp(prefix="emoji_demo_")) if temporary else args.work_dir
    work_dir.mkdir(parents=True, exist_ok=True)
    if temporary:
        args.work_dir = work_dir

    entries, filtered = load_catalog(args.limit)
    import emoji  # after load_catalog, which explains how to install it
    log.info("%d emoji with English and Chinese names (dropped: %s)", len(entries), filtered)
    renderer = Renderer(font_path, args.image_size, background)
    records, skipped, png_bytes = render_all(entries, renderer, work_dir, args.seed)
    kept = [e for e in entries if e.id in records]
    log.info("rendered %d, skipped %s", len(kept), skipped)
    if not kept:
        raise SystemExit("no emoji rendered; is the font a colour emoji font?")

    splits = split_by_concept(kept, args.split, args.seed)
    if args.train_captions == "all":
        for e in splits["train"]:
            records[e.id] = dict(records[e.id], captions=all_captions_for(e))
    split_paths = {name: write_split(work_dir, name, [records[e.id] for e in members])
                   for name, members in splits.items() if members}

    out_dir.mkdir(parents=True, exist_ok=True)
    if not args.skip_build:
        run_build(work_dir, out_dir, split_paths, args)

    stats = {
        "rendered": len(kept),
        "splits": {name: {"emoji": len(splits[name]),
                          "concepts": len({concept_key(e.emoji) for e in splits[name]})}
                   for name in SPLITS},
        "filtered": filtered,
        "skipped": skipped,
        "image_size": args.image_size,
        "png_bytes": png_bytes,
        "background": "#%02x%02x%02x" % background,
        "seed": args.seed,
        "split_weights": args.split_spec,
        "vocab_size": None if args.skip_build else args.vocab_size,
        "han_as_characters": None if args.skip_build else args.han_as_characters,
        "train_captions": args.train_captions,
        "limit": args.limit,
        "layout_engine": renderer.layout,
        "font": {"path": str(font_path), "sha256": _sha256(font_path),
                 "package_version": _font_package_version()},
        "versions": {"emoji": emoji.__version__, "pillow": PIL.__version__},
    }
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=2, ensure_ascii=False) + "\n",
                                        encoding="utf-8")
    write_docs(out_dir, stats, args)
    if temporary and not args.skip_build:
        shutil.rmtree(work_dir)  # everything needed is packed into the indexed datasets
        where = f"dataset in {out_dir}"
    else:
        where = f"images and manifests in {work_dir}; docs in {out_dir}"
    counts = ", ".join(f"{s} {stats['splits'][s]['emoji']}" for s in SPLITS)
    print(f"emoji demo set: {len(kept)} images ({counts}); skipped {sum(skipped.values())}; "
          f"{where}")
    return 0


def _font_package_version() -> str | None:
    """The installed Debian font package's version (for the README), or None elsewhere."""
    dpkg_query = shutil.which("dpkg-query")
    if not dpkg_query:
        return None
    out = subprocess.run([dpkg_query, "-W", "-f", "${Version}", DEBIAN_FONT_PACKAGE],
                         capture_output=True, text=True, check=False)
    return (out.stdout.strip() or None) if out.returncode == 0 else None


if __name__ == "__main__":
    sys.exit(main())
