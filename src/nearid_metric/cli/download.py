"""``nearid-score download``: fetch a scorer's weights and check their sha256
(:func:`nearid_metric.hub.download_checkpoint`)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from nearid_metric.cli.common import (
    EXIT_NOTHING_SCORED,
    EXIT_OK,
    command_parser,
    default_weights,
    logger,
    parse_models,
    run_command,
)
from nearid_metric.hub import ChecksumError, Download, HubUnreachableError, download_checkpoint, registry
from nearid_metric.scorers import TEXT_SCORERS, list_scorers, resolve_layout


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser(
        "nearid-score download",
        "Fetch a scorer's weights into the Hugging Face cache (or --to DIR), check each file's sha256 "
        "against the registry (or print it when none is recorded) and print the --model value that "
        "loads them offline.", version=False,
    )
    parser.add_argument("--model", default="nearid",
                        help=f"comma-separated scorers ({', '.join(list_scorers())}); NAME=WEIGHTS for a registry "
                             f"name or Hub repo id; a bare repo id means nearid with those weights (default: nearid)")
    parser.add_argument("--revision", help="Hub revision (branch, tag or commit); one model only")
    parser.add_argument("--to", type=Path, metavar="DIR",
                        help="also copy the files into DIR and record their hashes in DIR/nearid-weights.json "
                             "(one model only)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``nearid-score download``: 0 when every model's files are there and match what is recorded, else 1."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)} (to score a reference folder named 'download', "
                     f"write ./download)")
    try:
        models = parse_models(args.model)
    except ValueError as e:
        parser.error(str(e))
    if len(models) > 1 and (args.revision or args.to):
        parser.error("--revision and --to apply to one model; download the models one at a time")

    def command() -> int:
        code = EXIT_OK
        for column, name, weights in models:
            source = weights or default_weights(name)
            try:
                if name in TEXT_SCORERS:  # clip-t: the CLIP checkpoint with its tokenizer files
                    from nearid_metric.text import TEXT_FILES

                    files = TEXT_FILES
                else:
                    files = resolve_layout(name, source, args.revision)[1].files  # the layout the source is in
                fetched = download_checkpoint(source, revision=args.revision, files=files, to=args.to)
            except ChecksumError as e:
                logger.error("%s: %s", column, e)
                code = EXIT_NOTHING_SCORED
                continue
            except HubUnreachableError as e:
                logger.error("%s: cannot download %s: %s Connect to the network (and unset HF_HUB_OFFLINE), then "
                             "run this again", column, source, e)
                code = EXIT_NOTHING_SCORED
                continue
            except (FileNotFoundError, ValueError, OSError) as e:
                logger.error("%s: cannot download %s: %s", column, source, e)
                code = EXIT_NOTHING_SCORED
                continue
            print_download(name, source, fetched, args.revision)
        return code

    return run_command("nearid-score download", command)


def print_download(name: str, source: str, fetched: Download, revision: str | None = None) -> None:
    """The files, their hashes and status, how to pin unrecorded hashes, and the --model value to use."""
    checkpoint = fetched.checkpoint
    print(f"{name}: {checkpoint.source}@{checkpoint.revision} in {checkpoint.folder}")
    width = max(map(len, fetched.sha256))
    for file, digest in fetched.sha256.items():
        if file in fetched.recorded:
            status = "verified against the registry"
        elif fetched.record_file is not None:
            status = f"not in the registry; recorded in {fetched.record_file.name}"
        else:
            status = "not recorded in the registry"
        print(f"  {file.ljust(width)}  sha256 {digest}  {status}")
    missing = [file for file in fetched.sha256 if file not in fetched.recorded]
    if missing:
        pin = {"revision": checkpoint.revision, "sha256": fetched.sha256}
        entry = f'"{source}"' if source in registry() else f"of {checkpoint.source} (add one)"
        print(f"{name}: to pin these files, set in the registry entry {entry} (weights/registry.json): "
              f"{json.dumps(pin)}")
    print(f"{name}: use --model {shlex.quote(f'{name}={checkpoint.folder}')}")
    if fetched.record_file is None:
        by_name = name if source == default_weights(name) else f"{name}={source}"
        pinned = f" --revision {shlex.quote(revision)}" if revision else ""
        print(f"{name}: or, from the cache with HF_HUB_OFFLINE=1: --model {shlex.quote(by_name)}{pinned}")


if __name__ == "__main__":
    sys.exit(main())
