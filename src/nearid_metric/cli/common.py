"""What the console commands share: exit codes, logging on stderr, the error boundary, and the
argument builders of the model, device, batching and confidence-interval flags.

Only the commands import this module; the library never does. Nothing here imports torch or a model
library until a scorer is built (:func:`load_scorers`), so ``--help``, ``--version`` and usage errors are quick.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from nearid_metric._version import __version__
from nearid_metric.hub import ChecksumError, HubUnreachableError, registry
from nearid_metric.options import PRECISION_DTYPES, auto_num_workers
from nearid_metric.preprocess import PreprocessConfig
from nearid_metric.scorers import TEXT_SCORERS, create_scorer, list_scorers, scorer_info
from nearid_metric.stats import BOOTSTRAP_RESAMPLES

if TYPE_CHECKING:
    from nearid_metric.scorer import Scorer
    from nearid_metric.text import TextScorer

logger = logging.getLogger("nearid_metric")

EXIT_OK, EXIT_NOTHING_SCORED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
"""Exit codes: done; nothing scored (or, with ``--strict``, something failed); a usage error; Ctrl-C."""


@contextmanager
def stderr_logging(prog: str) -> Iterator[logging.Logger]:
    """Show the package's INFO+ records on stderr as ``prog: message`` while one command runs."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{prog}: %(message)s"))
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # a root handler (open_clip adds one) would print every line twice
    try:
        yield logger
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def command_parser(prog: str, description: str, *, version: bool = True) -> argparse.ArgumentParser:
    """A command's parser, with ``--version`` (printing ``prog`` and the package version) unless ``version=False``."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    if version:
        parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def run_command(prog: str, command: Callable[[], int], *, error_code: int = EXIT_USAGE,
                error_prefix: str = "") -> int:
    """The error boundary of one command: runs ``command`` with the package's log records on stderr.

    The package's own exceptions (``ValueError``, ``OSError``, ``ImportError``: their messages
    name the file and what to do) become one line, ``prog: <error_prefix><message>``, and the
    exit code ``error_code``; any other exception is a bug and keeps its traceback.
    """
    with stderr_logging(prog):
        try:
            return command()
        except (OSError, ValueError, ImportError) as e:
            logger.error("%s%s", error_prefix, e)
            return error_code
        except KeyboardInterrupt:  # finished work (cache parts) was flushed on the way out
            logger.error("interrupted")
            return EXIT_INTERRUPTED


def check_output_folder(folder: Path, flag: str, parser: argparse.ArgumentParser) -> None:
    """``parser.error`` unless ``folder`` is, or can be created as, a folder this process may write in."""
    if folder.exists() and not folder.is_dir():
        parser.error(f"{flag} {folder} is an existing file, not a folder")
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        parser.error(f"{flag} {folder}: {existing} is a file, so the folder cannot be created")
    if not os.access(existing, os.W_OK | os.X_OK):
        parser.error(f"{flag} {folder}: no permission to write in {existing}")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def worker_count(text: str) -> int:
    """argparse type of ``--num-workers``: ``auto`` (one per available core, :func:`auto_num_workers`) or an integer >= 0."""
    return auto_num_workers() if text == "auto" else non_negative_int(text)


def add_ci_arguments(parser: argparse.ArgumentParser, *, groups: bool) -> None:
    """``--ci``, ``--ci-resamples``, ``--ci-seed`` (and ``--ci-groups`` where pairs can be grouped)."""
    ci = parser.add_argument_group("confidence intervals (95%)")
    ci.add_argument("--ci", choices=["bootstrap", "none"], default="bootstrap",
                    help="percentile bootstrap interval of each mean / rate (default), or none")
    ci.add_argument("--ci-resamples", type=positive_int, default=BOOTSTRAP_RESAMPLES, metavar="N",
                    help=f"bootstrap resamples (default {BOOTSTRAP_RESAMPLES})")
    ci.add_argument("--ci-seed", type=int, default=0, metavar="SEED", help="seed of the resampling (default 0)")
    if groups:
        ci.add_argument("--ci-groups", default="none", metavar="none|ref|COLUMN",
                        help="what is resampled: none = single pairs (default); ref = all pairs of one reference "
                             "image together; COLUMN = a column of --manifest (e.g. prompt) whose rows with one "
                             "value are resampled together")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model, device and batching flags shared by every command that embeds images."""
    parser.add_argument("--model", default="nearid",
                        help=f"comma-separated scorers: {', '.join(list_scorers())} (nearid-score also: "
                             f"{', '.join(TEXT_SCORERS)}); NAME=WEIGHTS picks other weights (local folder, registry "
                             f"name or Hub repo id); a bare folder or repo id means nearid with those weights "
                             f"(default: nearid)")
    parser.add_argument("--revision", help="Hub revision (branch, tag or commit) of the weights; one model only")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--precision", choices=sorted(PRECISION_DTYPES), default="fp32")
    parser.add_argument("--compile", action="store_true", help="run the models through torch.compile")
    parser.add_argument("--batch-size", type=positive_int,
                        help="images per forward pass (default: sized to the device; on CUDA it starts large and "
                             "halves on out-of-memory errors)")
    parser.add_argument("--num-workers", type=worker_count, default="auto", metavar="N|auto",
                        help="image decoding processes; auto (default): one per CPU core this process may use, "
                             "at most 16")
    parser.add_argument("--cache", type=Path, metavar="DIR",
                        help="embedding cache folder: embeddings of images seen before (same content, same model, "
                             "weights, precision, preprocessing and package version) are reused, new ones stored")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def parse_models(spec: str, *, text: bool = True) -> list[tuple[str, str, str | None]]:
    """``--model`` -> ``[(column, scorer name, weights or None)]``.

    Items are ``NAME``, ``NAME=WEIGHTS`` or (for NearID) a bare folder / repo id. The column
    is the scorer name, or the item as written when one scorer appears more than once. ``text=False``:
    text scorers (clip-t), which score an image against a prompt, are refused.
    """
    items = [item.strip() for item in spec.split(",") if item.strip()]
    if not items:
        raise ValueError("--model is empty")
    models = []
    for item in items:
        name, _, weights = item.partition("=")
        if name in TEXT_SCORERS and not text:
            raise ValueError(f"{name} scores a generation against its prompt; this command scores image pairs only "
                             f"(nearid-score reads prompts)")
        if name in known_scorers():
            models.append((item, name, weights or None))
        elif "=" in item or not _names_weights(item):
            raise ValueError(unknown_scorer_message(name))
        else:
            models.append((item, "nearid", item))
    names = [name for _, name, _ in models]
    models = [(name if names.count(name) == 1 else item, name, weights) for item, name, weights in models]
    if len({column for column, _, _ in models}) != len(models):
        raise ValueError(f"--model lists a model twice: {spec!r}")
    return models


def known_scorers() -> list[str]:
    """Every ``--model`` scorer name: the image scorers, then the text (clip-t) scorers."""
    return [*list_scorers(), *TEXT_SCORERS]


def _names_weights(item: str) -> bool:
    """Whether a bare ``--model`` item that is not a scorer name names NearID weights: an existing path, a path
    (``.``, ``/`` or ``~`` first), a Hub repo id (``org/name``) or a registry name."""
    return "/" in item or item.startswith((".", "~")) or Path(item).expanduser().exists() or item in registry()


def unknown_scorer_message(name: str) -> str:
    """``unknown scorer 'dino' in --model; did you mean 'dinov2'? Scorers: ...`` (closest match by difflib)."""
    close = difflib.get_close_matches(name, [*known_scorers(), *registry()], n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ";"
    return (f"unknown scorer {name!r} in --model{hint} scorers: {', '.join(known_scorers())} "
            f"(or weights: a folder, a registry name or a Hub repo id org/name)")


def build_scorer(args: argparse.Namespace, name: str, weights: str | None,
                 preprocess: PreprocessConfig | None) -> Scorer | TextScorer:
    """One ``--model`` scorer with the device, precision and compile flags of ``args``."""
    options = dict(pretrained=weights, revision=args.revision, device=args.device, precision=args.precision)
    if preprocess is not None:  # a protocol's own transform in place of the weights'
        options["preprocess"] = preprocess
    if name in TEXT_SCORERS:
        from nearid_metric.text import create_text_scorer

        return create_text_scorer(name, **options)
    return create_scorer(name, compile=args.compile, **options)


def default_weights(name: str) -> str:
    """The registry entry a scorer name (image or text) loads by default."""
    return TEXT_SCORERS[name] if name in TEXT_SCORERS else scorer_info(name).weights


def load_scorers(args: argparse.Namespace, parser: argparse.ArgumentParser,
                 preprocess: Mapping[str, PreprocessConfig] | None = None, *,
                 text: bool = False) -> dict[str, Scorer | TextScorer]:
    """Build the ``--model`` scorers, by column name; bad specs are usage errors, refused weights exit 1.
    ``preprocess``: scorer name -> a preprocessing replacing its weights' own (a protocol's); ``text``: accept
    text scorers (clip-t)."""
    try:
        models = parse_models(args.model, text=text)
    except ValueError as e:
        parser.error(str(e))
    if args.revision is not None and len(models) > 1:
        parser.error("--revision applies to one model; pin each model's weights with NAME=FOLDER instead")
    preprocess = preprocess or {}
    sources = {column: weights or default_weights(name) for column, name, weights in models}
    try:
        built: dict[str, Scorer | TextScorer] = {}
        text_scorers: dict[str, TextScorer] = {}
        for column, name, weights in sorted(models, key=lambda model: model[1] not in TEXT_SCORERS):  # text first
            # clip-i beside clip-t on the same weights and preprocessing is the text scorer's image tower: loaded once
            twin = next((scorer.image_scorer for other, scorer in text_scorers.items()
                         if scorer.image_scorer.name == name and sources[other] == sources[column]
                         and preprocess.get(name) == preprocess.get(scorer.name)), None)
            built[column] = twin or build_scorer(args, name, weights, preprocess.get(name))
            if name in TEXT_SCORERS:
                text_scorers[column] = built[column]
        return {column: built[column] for column, _, _ in models}
    except ChecksumError as e:  # weights that differ from the recorded hash: a message, not a traceback
        logger.error("%s", e)
        raise SystemExit(EXIT_NOTHING_SCORED) from None
    except HubUnreachableError as e:
        raise HubUnreachableError(f"{e} Fetch the weights once where the Hub is reachable (nearid-score download "
                                  f"--model ...), or pass a local checkpoint folder") from None
