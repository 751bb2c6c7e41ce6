"""Build-time check of the image: the base image's torch is untouched and its Transformer Engine
lies in the range megatron-core was tested with. Stdlib + packaging only; imports no CUDA code
(there is no GPU during ``docker build``).

    python docker/check_image.py --torch-before 2.10.0a0+abc --te-spec '>=2.9.0a0,<2.12.0'
"""

import argparse
import importlib.metadata as md
import sys

from packaging.specifiers import SpecifierSet


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--torch-before", required=True, help="torch version before the pip installs")
    p.add_argument("--te-spec", required=True, help="allowed transformer_engine versions")
    args = p.parse_args(argv)
    errors = []
    torch_now = md.version("torch")
    if torch_now != args.torch_before:
        errors.append(f"pip replaced the image's torch {args.torch_before} by {torch_now}")
    try:
        te = md.version("transformer_engine")
    except md.PackageNotFoundError:
        te = None
        errors.append("Transformer Engine is not installed: use an NGC PyTorch base image")
    if te is not None and not SpecifierSet(args.te_spec).contains(te, prereleases=True):
        errors.append(f"Transformer Engine {te} is outside {args.te_spec}, the range "
                      f"megatron-core {md.version('megatron-core')} was tested with: pick "
                      f"another BASE_IMAGE (or TE_SPEC)")
    for e in errors:
        sys.stderr.write(f"check_image: error: {e}\n")
    if errors:
        return 1
    sys.stdout.write(f"torch {torch_now} | transformer_engine {te} | megatron-core "
                     f"{md.version('megatron-core')}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
