"""The ``sgs-flower`` command line: ledger verification and plotting, site identities,
local deployment.

``ledger`` exit codes: 0 = OK, 1 = the ledger is bad (the message names the first bad
record), 2 = usage error or unreadable file. ``deploy local`` exits 0 when the run
completed (and its ledger verifies), else 1.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sgs-flower", description="sgs-flower tools")
    sub = parser.add_subparsers(dest="command", required=True)
    ledger = sub.add_parser("ledger", help="privacy ledger tools")
    lsub = ledger.add_subparsers(dest="ledger_command", required=True)
    ver = lsub.add_parser("verify", help="check the hash chain and the recorded epsilons")
    ver.add_argument("file", type=Path)
    ver.add_argument("--no-replay", action="store_true", help="only check the hash chain")
    plot = lsub.add_parser("plot", help="PNG of epsilon (both views) and accuracy per round")
    plot.add_argument("file", type=Path)
    plot.add_argument("-o", "--output", type=Path, default=None, help="default: FILE with .png")
    ident = sub.add_parser("identity", help="a site's Ed25519 identity key and the federation roster")
    isub = ident.add_subparsers(dest="identity_command", required=True)
    new = isub.add_parser("new", help="create a key file (mode 0600) and print its public key")
    new.add_argument("file", type=Path)
    pub = isub.add_parser("public", help="print the public key of a key file (one roster line)")
    pub.add_argument("file", type=Path)
    pub.add_argument("--name", default="", help="site name written after the key")
    deploy = sub.add_parser("deploy", help="run the app on a local Flower deployment")
    dsub = deploy.add_subparsers(dest="deploy_command", required=True)
    from sgs_flower.deploy.cli import DESCRIPTION, add_local_arguments

    local = dsub.add_parser(
        "local",
        help="SuperLink + N SuperNodes on 127.0.0.1 with TLS and SuperNode authentication",
        description=DESCRIPTION,
    )
    add_local_arguments(local)
    return parser


def _identity(args: argparse.Namespace) -> int:
    from sgs_flower.secagg.errors import ConfigurationError
    from sgs_flower.secagg.identity import identity_public, read_identity, write_identity

    try:
        if args.identity_command == "new":
            print(write_identity(args.file).hex())
            return 0
        line = identity_public(read_identity(args.file)).hex()
        print(f"{line} {args.name}".rstrip())
        return 0
    except ConfigurationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (also used by the console script)."""
    args = _parser().parse_args(argv)
    if args.command == "identity":
        return _identity(args)
    if args.command == "deploy":
        from sgs_flower.deploy.cli import run_local

        return run_local(args)
    if args.command == "ledger":
        from sgs_flower.dp.ledger_accounting import verify
        from sgs_flower.ledger import LedgerCorruptError

        if not args.file.is_file():
            print(f"error: {args.file} is not a file", file=sys.stderr)
            return 2
        if args.ledger_command == "verify":
            result = verify(args.file, replay=not args.no_replay)
            if result.ok:
                print(f"{args.file}: {result.summary()}")
                return 0
            print(f"{args.file}: {result.summary()}", file=sys.stderr)
            return 1
        if args.ledger_command == "plot":
            from sgs_flower.ledger.plot import plot_ledger

            out = args.output or args.file.with_suffix(".png")
            try:
                plot_ledger(args.file, out)
            except LedgerCorruptError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
            print(f"wrote {out}")
            return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
