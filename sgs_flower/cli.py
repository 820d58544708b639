"""The ``sgs-flower`` command line: ledger verification and plotting, site identities,
unmasking a model-confidential run's model, local deployment.

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
    um = sub.add_parser("unmask", help="recover the plaintext model of a model-confidential run with a site's key")
    um.add_argument("masked", type=Path, help="the masked model (.npz) the server saved")
    um.add_argument("output", type=Path, help="where to write the plaintext model (.npz, one entry per array)")
    um.add_argument("--key", type=Path, required=True,
                    help="the site's model-key file (<its state file>.model-key.json), or a folder to search")
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


def _unmask(args: argparse.Namespace) -> int:
    """Exit 0 with the model written; 1 when the file fails its MAC or the key does not
    fit; 2 on unreadable input."""
    import numpy as np

    from sgs_flower.confidential.masked_model import MaskedModel
    from sgs_flower.confidential.release import find_key_file, unmask_file
    from sgs_flower.secagg.errors import SecAggError

    try:
        key = args.key
        if key.is_dir():
            with np.load(args.masked, allow_pickle=False) as f:
                masked = MaskedModel.from_arrays({k: f[k] for k in f.files})
            found = find_key_file(masked, key)
            if found is None:
                print(f"error: no model-key file under {key} holds key {masked.key_id}", file=sys.stderr)
                return 1
            key = found
        arrays = unmask_file(args.masked, key)
    except (OSError, ValueError) as exc:
        if isinstance(exc, SecAggError):
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"error: cannot read {args.masked} or {args.key}: {exc}", file=sys.stderr)
        return 2
    except SecAggError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    args.output.parent.mkdir(parents=True, exist_ok=True)
    np.savez(args.output, **arrays)  # type: ignore[arg-type]
    print(f"unmasked {len(arrays)} arrays with {key} -> {args.output}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (also used by the console script)."""
    args = _parser().parse_args(argv)
    if args.command == "unmask":
        return _unmask(args)
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
