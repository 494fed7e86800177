"""`msdd` command line. Run `msdd <command> --help` for the options of each command."""

from __future__ import annotations

import argparse
import sys
import warnings

import msdd
from msdd import malloc
from msdd.cli import decoding, generation, models, training

# (sub-parser builder) in the order `msdd --help` lists the commands
COMMANDS = (training.add_train, training.add_distill, decoding.add_reconstruct, decoding.add_eval, models.add_info,
            models.add_latent_stats, models.add_export, training.add_demo, training.add_fidelity,
            models.add_fetch_weights, models.add_push, decoding.add_bench, generation.add_gen_train,
            generation.add_generate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="msdd", description=__doc__)
    parser.add_argument("--version", action="version", version=f"msdd {msdd.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    malloc.tune()  # CPU decodes stop faulting their activations' pages in again (msdd.malloc; MSDD_MALLOC=glibc: off)
    formatwarning = warnings.formatwarning
    warnings.formatwarning = _one_line_warning
    try:
        return args.func(args) or 0
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a path the file system refused (the commands check theirs first; this catches the rest)
        print(f"error: {_os_message(e)}", file=sys.stderr)
        return 2
    except ImportError as e:  # an optional extra that is not installed: its message names the pip command
        if "pip install" not in str(e):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = formatwarning


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """A warning as the command line shows it: "warning: <message>", not Python's source file, line and code."""
    return f"warning: {message}\n"


def _os_message(e: OSError) -> str:
    """An OSError as one line that names the path: "/sys/x: Operation not permitted (check the path and its
    permissions, or choose another)"."""
    if e.filename is None or e.strerror is None:
        return str(e)
    return f"{e.filename}: {e.strerror} (check the path and its permissions, or choose another)"


__all__ = ["build_parser", "main"]
