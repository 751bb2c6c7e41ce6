#!/usr/bin/env python
"""Rebuild the zero-shot class-name and template JSON files in ``megatron_m2/eval/data/``.

The ImageNet-1k class names (English and Chinese) and prompt templates come from three public
PyPI wheels, fetched with ``pip download --no-deps`` at pinned versions and read straight out of
the wheel archives: nothing is installed, imported or executed (Python sources are parsed with
:mod:`ast`, and only literal lists and ``lambda c: f'...{c}...'`` templates are accepted).

* ``clip-benchmark`` (MIT): ``datasets/{en,cn}_classnames.json`` and
  ``datasets/{en,cn}_zeroshot_classification_templates.json``, key ``imagenet1k``: the primary
  source for both languages.
* ``open_clip_torch`` (MIT): ``open_clip/zero_shot_metadata.py`` (``IMAGENET_CLASSNAMES``,
  ``OPENAI_IMAGENET_TEMPLATES``): cross-check of the English lists.
* ``cn-clip`` (Chinese-CLIP, MIT): ``cn_clip/eval/imagenet_zeroshot_templates.py``
  (``imagenet_classnames``, ``openai_imagenet_template``): cross-check of the Chinese lists.

The Fashion-MNIST names are written out below (standard label order). Any disagreement between
a primary source and its cross-check is printed and is fatal unless ``--allow-differences``.

Usage::

    python tools/make_zeroshot_data.py                  # download wheels to a temp dir, write
    python tools/make_zeroshot_data.py --wheels DIR     # use (or download into) DIR
    python tools/make_zeroshot_data.py --check          # compare with the files in the repo
"""

from __future__ import annotations

import argparse
import ast
import collections
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Dict, List, Sequence

PACKAGES = {
    # distribution name: (version, wheel file-name prefix)
    "clip-benchmark": ("1.6.2", "clip_benchmark-1.6.2-"),
    "open_clip_torch": ("3.3.0", "open_clip_torch-3.3.0-"),
    "cn-clip": ("1.6.0", "cn_clip-1.6.0-"),
}

CB_DIR = "clip_benchmark/datasets/"
OPEN_CLIP_FILE = "open_clip/zero_shot_metadata.py"
CN_CLIP_FILE = "cn_clip/eval/imagenet_zeroshot_templates.py"

FASHION_MNIST = {
    "en": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
           "Bag", "Ankle boot"],
    "zh": ["T恤/上衣", "裤子", "套头衫", "连衣裙", "外套", "凉鞋", "衬衫", "运动鞋", "包", "短靴"],
}

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "megatron_m2" / "eval" / "data"


def find_wheels(wheel_dir: Path, download: bool) -> Dict[str, Path]:
    """Path of each pinned wheel in ``wheel_dir``, downloading the missing ones."""
    wheel_dir.mkdir(parents=True, exist_ok=True)

    def present() -> Dict[str, Path]:
        found = {}
        for name, (_, prefix) in PACKAGES.items():
            hits = sorted(wheel_dir.glob(prefix + "*.whl"))
            if hits:
                found[name] = hits[0]
        return found

    found = present()
    missing = [n for n in PACKAGES if n not in found]
    if missing and download:
        specs = [f"{n}=={PACKAGES[n][0]}" for n in missing]
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--dest", str(wheel_dir)] + specs
        print("+", " ".join(cmd), file=sys.stderr)
        subprocess.run(cmd, check=True)
        found = present()
        missing = [n for n in PACKAGES if n not in found]
    if missing:
        raise SystemExit(f"missing wheels in {wheel_dir}: {missing}")
    return found


def read_member(wheel: Path, member: str) -> str:
    with zipfile.ZipFile(wheel) as zf:
        return zf.read(member).decode("utf-8")


def _template_from_lambda(node: ast.Lambda, where: str) -> str:
    """``lambda c: f'a photo of a {c}.'`` -> ``'a photo of a {c}.'``."""
    args = node.args.args
    body = node.body
    if len(args) != 1 or not isinstance(body, ast.JoinedStr):
        raise SystemExit(f"{where}: line {node.lineno}: not a `lambda c: f'...'` template")
    var = args[0].arg
    out = []
    for part in body.values:
        if isinstance(part, ast.Constant) and isinstance(part.value, str):
            if "{c}" in part.value:
                raise SystemExit(f"{where}: line {node.lineno}: literal '{{c}}' in a template")
            out.append(part.value)
        elif (isinstance(part, ast.FormattedValue) and isinstance(part.value, ast.Name)
              and part.value.id == var and part.conversion == -1 and part.format_spec is None):
            out.append("{c}")
        else:
            raise SystemExit(f"{where}: line {node.lineno}: unsupported f-string part")
    return "".join(out)


def literal_lists(source: str, where: str) -> Dict[str, List[str]]:
    """Top-level ``NAME = [...]`` / ``(...)`` assignments of strings or template lambdas."""
    out = {}
    for node in ast.parse(source, filename=where).body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)
                and isinstance(node.value, (ast.List, ast.Tuple))):
            continue
        items = []
        for elt in node.value.elts:
            if isinstance(elt, ast.Constant) and isinstance(elt.value, str):
                items.append(elt.value)
            elif isinstance(elt, ast.Lambda):
                items.append(_template_from_lambda(elt, where))
            else:
                raise SystemExit(f"{where}: line {elt.lineno}: not a string or template")
        out[node.targets[0].id] = items
    return out


def compare(label: str, primary: Sequence[str], other: Sequence[str]) -> List[str]:
    """Human-readable differences between two lists (empty when equal)."""
    diffs = []
    if len(primary) != len(other):
        diffs.append(f"{label}: lengths differ ({len(primary)} vs {len(other)})")
    for i, (a, b) in enumerate(zip(primary, other)):
        if a != b:
            diffs.append(f"{label}: [{i}] {a!r} vs {b!r}")
    return diffs


def duplicates(items: Sequence[str]) -> Dict[str, List[int]]:
    """``{item: [indices]}`` of every item that occurs more than once."""
    where = collections.defaultdict(list)
    for i, item in enumerate(items):
        where[item].append(i)
    return {k: v for k, v in where.items() if len(v) > 1}


def build(wheels: Dict[str, Path]) -> tuple:
    """The three JSON objects and the list of source disagreements."""
    cb = wheels["clip-benchmark"]

    def cb_json(name: str) -> dict:
        return json.loads(read_member(cb, CB_DIR + name))

    names = {"en": cb_json("en_classnames.json")["imagenet1k"],
             "zh": cb_json("cn_classnames.json")["imagenet1k"]}
    templates = {
        "en": cb_json("en_zeroshot_classification_templates.json")["imagenet1k"],
        "zh": cb_json("cn_zeroshot_classification_templates.json")["imagenet1k"],
    }
    oc = literal_lists(read_member(wheels["open_clip_torch"], OPEN_CLIP_FILE), OPEN_CLIP_FILE)
    cn = literal_lists(read_member(wheels["cn-clip"], CN_CLIP_FILE), CN_CLIP_FILE)
    diffs = (compare("en names: clip-benchmark vs open_clip", names["en"],
                     oc["IMAGENET_CLASSNAMES"])
             + compare("en templates: clip-benchmark vs open_clip", templates["en"],
                       oc["OPENAI_IMAGENET_TEMPLATES"])
             + compare("zh names: clip-benchmark vs cn-clip", names["zh"],
                       cn["imagenet_classnames"])
             + compare("zh templates: clip-benchmark vs cn-clip", templates["zh"],
                       cn["openai_imagenet_template"]))
    for lang in ("en", "zh"):
        for item in names[lang] + templates[lang]:
            if not isinstance(item, str) or not item.strip():
                raise SystemExit(f"{lang}: empty or non-string entry {item!r}")
        for t in templates[lang]:
            if t.count("{c}") != 1:
                raise SystemExit(f"{lang}: template without exactly one {{c}}: {t!r}")
    return ({"en": names["en"], "zh": names["zh"]},
            {"en": templates["en"], "zh": templates["zh"]},
            dict(FASHION_MNIST), diffs)


def dump(obj) -> str:
    """One entry per line, UTF-8 (not \\u escapes), trailing newline."""
    return json.dumps(obj, ensure_ascii=False, indent=1) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--wheels", type=Path, help="directory holding (or to receive) the wheels; "
                   "default: a temporary directory")
    p.add_argument("--no-download", action="store_true",
                   help="fail instead of running pip when a wheel is missing")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    p.add_argument("--check", action="store_true",
                   help="write nothing; exit 1 if the files in --out differ from the sources")
    p.add_argument("--allow-differences", action="store_true",
                   help="write even if a source and its cross-check disagree")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        wheel_dir = args.wheels if args.wheels is not None else Path(tmp)
        wheels = find_wheels(wheel_dir, download=not args.no_download)
        names, templates, fashion, diffs = build(wheels)

    for lang in ("en", "zh"):
        print(f"{lang}: {len(names[lang])} ImageNet names, {len(templates[lang])} templates, "
              f"{len(fashion[lang])} Fashion-MNIST names")
        print(f"  duplicate names: {duplicates(names[lang]) or 'none'}")
        print(f"  duplicate templates: {duplicates(templates[lang]) or 'none'}")
    for d in diffs:
        print("DIFFERENCE", d)
    if diffs and not args.allow_differences:
        print(f"{len(diffs)} difference(s) between sources; see above", file=sys.stderr)
        return 1
    print("sources agree" if not diffs else f"{len(diffs)} difference(s) allowed")

    files = {"imagenet_classnames.json": dump(names), "templates.json": dump(templates),
             "fashion_mnist_classnames.json": dump(fashion)}
    if args.check:
        stale = [n for n, text in files.items()
                 if not (args.out / n).is_file()
                 or (args.out / n).read_text(encoding="utf-8") != text]
        print("up to date" if not stale else f"out of date: {stale}")
        return 1 if stale else 0
    args.out.mkdir(parents=True, exist_ok=True)
    for n, text in files.items():
        (args.out / n).write_text(text, encoding="utf-8")
        print("wrote", args.out / n)
    return 0


if __name__ == "__main__":
    sys.exit(main())
