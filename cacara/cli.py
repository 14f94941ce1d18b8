"""The ``cacara`` command: one subcommand per pipeline step, each a thin shell around the step function.

dvc stages call these subcommands; kfp components call the same functions directly.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Callable, Sequence

from cacara.params import load_params

log = logging.getLogger("cacara")


def _parse_set(values: Sequence[str]) -> dict[str, object]:
    """``--set split.seed=3`` overrides, values parsed as YAML scalars (so numbers stay numbers)."""
    import yaml

    out: dict[str, object] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        out[key] = yaml.safe_load(value)
    return out


def _params(args: argparse.Namespace) -> dict:
    return load_params(args.params, _parse_set(args.set))


def cmd_ingest(args: argparse.Namespace) -> int:
    from components.ingest import ingest

    params = _params(args)
    result = ingest(args.source or params["data"]["source"], args.out, params, fmt=args.format)
    print(result.summary())
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from components.validate import validate

    result = validate(args.dataset, args.reports, _params(args))
    print(result.summary() if hasattr(result, "summary") else result)
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    """What ``make run`` prints at the end: the reports of every stage that has run."""
    from cacara.summary import print_summary

    print_summary(Path(args.work), _params(args))
    return 0


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], str]] = {
    "ingest": (cmd_ingest, "source dataset -> canonical 16 kHz dataset + quarantine report"),
    "validate": (cmd_validate, "Great Expectations suite over the canonical dataset"),
    "summary": (cmd_summary, "print the results of the last run"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cacara", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str) -> argparse.ArgumentParser:
        fn, help_text = COMMANDS[name]
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--params", default=None, help="params.yaml to read (default: the project's)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a parameter, e.g. --set split.seed=3")
        p.set_defaults(func=fn)
        return p

    p = add("ingest")
    p.add_argument("--source", default=None, help="folder, file or fsspec URL (default: params data.source)")
    p.add_argument("--format", default=None, help="auto|canonical|clotho|audiocaps|manifest")
    p.add_argument("--out", default="work/dataset", help="output folder for the canonical dataset")
    p = add("validate")
    p.add_argument("--dataset", default="work/dataset")
    p.add_argument("--reports", default="reports/validation")
    p = add("summary")
    p.add_argument("--work", default=".", help="project folder holding work/ and reports/")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return args.func(args)
    except (ValueError, RuntimeError, FileNotFoundError) as exc:
        log.error("%s failed: %s", args.command, exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
