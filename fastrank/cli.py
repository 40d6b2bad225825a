"""`fastrank` command line: data build / stats / validate, agent-eval, gcd coupling / train, export.

A mistake in the input (a bad record, a missing file or checkpoint, an unknown config key) ends the run
with one `fastrank: error: ...` line and exit code 2; --debug (or FASTRANK_DEBUG=1) shows the traceback.
"""
from __future__ import annotations

import argparse
import json
import sys

from fastrank.data.record import CandidateSet, ReadReport, read_records
from fastrank.entry import call, split_debug


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every option's default in --help, and descriptions / epilogs (usage examples, key lists) kept as written."""


def use_formatter(parser: argparse.ArgumentParser, formatter=HelpFormatter) -> None:
    """Give `parser` and all its subcommand parsers `formatter` (add_parser does not inherit it)."""
    parser.formatter_class = formatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                use_formatter(sub, formatter)


def _cmd_stats(args: argparse.Namespace) -> int:
    from fastrank.data.bundle import format_stats, stats

    for path in args.paths:
        rep = ReadReport(path)
        sets = read_records(path, CandidateSet, skip_invalid=args.skip_invalid, max_candidates=args.max_candidates,
                            report=rep)
        st = stats(sets)
        print(json.dumps(st, indent=1) if args.json else format_stats(path, st))
        if rep.skipped:
            print(rep, file=sys.stderr)
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    bad = 0
    for path in args.paths:
        rep = ReadReport(path)
        read_records(path, CandidateSet, skip_invalid=True, max_candidates=args.max_candidates, report=rep)
        print(rep)
        bad += len(rep.skipped)
    return 1 if bad else 0


def _cmd_build(args: argparse.Namespace) -> int:
    from fastrank.data.build import build_from_args

    build_from_args(args)
    return 0


def _cmd_agent_eval(args: argparse.Namespace) -> int:
    from fastrank.agent_eval import agent_eval_from_args

    return agent_eval_from_args(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastrank", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="build, inspect and validate candidate-set datasets")
    dsub = data.add_subparsers(dest="data_command", required=True)

    st = dsub.add_parser("stats", help="per-environment counts and set-size histogram")
    st.add_argument("paths", nargs="+", help="candidate-set JSONL(.gz) files")
    st.add_argument("--json", action="store_true", help="print the counts as JSON")
    st.add_argument("--skip-invalid", action="store_true", help="count and report bad records instead of failing")
    st.add_argument("--max-candidates", type=int, default=20, help="a set with more candidates is invalid")
    st.set_defaults(func=_cmd_stats)

    va = dsub.add_parser("validate", help="check every record; exit 1 if any is invalid")
    va.add_argument("paths", nargs="+", help="candidate-set JSONL(.gz) files")
    va.add_argument("--max-candidates", type=int, default=20, help="a set with more candidates is invalid")
    va.set_defaults(func=_cmd_validate)

    from fastrank.data.build import add_build_args

    bu = dsub.add_parser("build", help="build candidate-set datasets from the environments' real data")
    add_build_args(bu)
    bu.set_defaults(func=_cmd_build)

    from fastrank.agent_eval import add_agent_eval_args
    from fastrank.gcd.cli import add_gcd_args

    ae = sub.add_parser("agent-eval", help="run a reranker as the agent in ALFWorld / ScienceWorld")
    add_agent_eval_args(ae)
    ae.set_defaults(func=_cmd_agent_eval)
    add_gcd_args(sub)
    from fastrank.export import add_export_args

    add_export_args(sub)  # fastrank export CHECKPOINT OUT --to sentence-transformers
    p.add_argument("--debug", action="store_true",
                   help="show the traceback of an input error (anywhere on the line; also FASTRANK_DEBUG=1)")
    use_formatter(p)
    return p


def main(argv: list[str] | None = None) -> int:
    argv, debug = split_debug(sys.argv[1:] if argv is None else argv)

    def run(rest: list[str]) -> int:
        args = build_parser().parse_args(rest)
        return args.func(args)

    return call(run, argv, debug=debug)


if __name__ == "__main__":
    sys.exit(main())
