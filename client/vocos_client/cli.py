"""``vocos-client``: wav in -> wav out, ``.npy`` codes or mel in -> wav out, through a Triton server.

Usage::

    vocos-client [--url HOST:PORT] [--timeout S] resynth IN.wav [IN.wav ...] -o OUT [--bandwidth KBPS]
    vocos-client [--url HOST:PORT] codes IN.npy [IN.npy ...] -o OUT [--bandwidth KBPS] [--stream [--chunk-frames N]]
    vocos-client [--url HOST:PORT] mel IN.npy [IN.npy ...] -o OUT [--stream [--chunk-frames N]]
    vocos-client [--url HOST:PORT] ready
    vocos-client [--url HOST:PORT] --list-variants

* ``--variant NAME``: synthesize with the server's variant NAME (default: the default variant); a named
  variant serves one kind, mel or EnCodec. ``--list-variants`` prints the variants the server holds, one
  line each: name, kind, sample rate, input channels, hop, padding, streaming lookahead, bandwidths.
* ``resynth``: any rate soundfile reads (resampled to the variant's rate with soxr); several channels are
  averaged to mono. Without ``--bandwidth`` through the mel vocoder, with it through EnCodec at that bandwidth.
* ``codes``: (K, T) integer EnCodec codes, K = 2/4/8/16 (the bandwidth follows from K unless given).
* ``mel``: (C, T) log-mel features, C the variant's mel bins (100 for the default variant).
* Connection: ``--api-key-file PATH`` (or ``$VOCOS_API_KEY``) for a server that requires an API key,
  ``--ssl`` [``--root-certificates CA.pem``] for TLS.
* ``OUT`` is a ``.wav`` file for one input, otherwise a directory (created) that gets ``<input stem>.wav``.
  Output is mono at the variant's sample rate as the server publishes it (24 kHz for the charactr
  checkpoints); ``--subtype FLOAT`` (default: 32-bit float, the exact model output) or
  ``PCM_16``/``PCM_24`` (clipped to [-1, 1]).

``--stream`` (``mel`` and ``codes``) synthesizes each input through the streaming models instead, one
input after the other, and writes its wav progressively: every audio piece is appended to the file as it
arrives. For each input it prints the time to first audio to stderr (``IN: first audio after 31.2 ms;
10.00 s of audio in 0.41 s``). ``--chunk-frames N`` sends the input in chunks of N frames (default: one
request). A stream that fails leaves no partial file behind.

Many inputs are sent concurrently (``--concurrency``, default 8) so that the server batches them;
a progress bar goes to stderr when it is a terminal (``--quiet`` turns it off). Nothing is written
unless every input succeeds. Errors print one line, ``vocos-client: error: <message>``, and exit with
2 (invalid input or arguments), 3 (server unavailable) or 1 (anything else).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from vocos_triton.contract import Access

from ._client import VocosClient
from ._common import read_api_key
from ._errors import InvalidInputError, ServerUnavailableError, VocosError

PROG = "vocos-client"
EXIT_OK, EXIT_OTHER, EXIT_INVALID, EXIT_UNAVAILABLE = 0, 1, 2, 3
SUBTYPES = ("FLOAT", "PCM_16", "PCM_24")
COMMANDS = ("resynth", "codes", "mel", "ready")
_COMMANDS_METAVAR = "{" + ",".join(COMMANDS) + "}"

log = logging.getLogger("vocos_client.cli")


class CliError(Exception):
    """An error to report in one line with an exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    # argparse prints the usage and exits; we want one line and main() to return the code.
    def error(self, message: str) -> None:  # type: ignore[override]
        raise CliError(message, EXIT_INVALID)


def _common(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """Connection options, accepted before and after the subcommand (the latter must not reset them)."""
    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument("--url", metavar="HOST:PORT", default=default("localhost:8001"),
                        help="Triton's gRPC endpoint (default localhost:8001)")
    parser.add_argument("--timeout", metavar="S", type=float, default=default(60.0),
                        help="seconds per input, retries included (default 60)")
    parser.add_argument("--retries", metavar="N", type=int, default=default(None),
                        help="retries while the server is unavailable or busy (default: as many as --timeout allows)")
    parser.add_argument("--api-key-file", metavar="PATH", type=Path, default=default(None),
                        help=f"file holding the server's API key (default: ${Access.API_KEY_ENV}, else none)")
    parser.add_argument("--ssl", action="store_true", default=default(False), help="connect with TLS")
    parser.add_argument("--root-certificates", metavar="PEM", default=default(None),
                        help="CA certificate to verify the server with (--ssl; default: the system's roots)")
    parser.add_argument("--concurrency", metavar="N", type=int, default=default(8),
                        help="requests in flight (default 8)")
    parser.add_argument("-q", "--quiet", action="store_true", default=default(False),
                        help="no progress bar, no list of written files")
    parser.add_argument("-v", "--verbose", action="store_true", default=default(False),
                        help="log retries and warnings (e.g. a stereo input averaged to mono)")
    parser.add_argument("--variant", metavar="NAME", default=default(None),
                        help="the server's variant to synthesize with (default: the default variant)")
    parser.add_argument("--list-variants", action="store_true", default=default(False),
                        help="print the server's variants, one line each (name, kind, rate, channels, hop, "
                             "padding, lookahead, bandwidths), and exit")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Synthesize audio with Vocos on a Triton server.")
    _common(parser, suppress=False)
    # not required by argparse: --list-variants runs without one (_run checks the others have one)
    commands = parser.add_subparsers(dest="command", required=False, metavar=_COMMANDS_METAVAR,
                                     parser_class=_Parser)

    def command(name: str, help_text: str, pattern: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("inputs", nargs="+", metavar=pattern, type=Path)
        sub.add_argument("-o", "--output", required=True, type=Path,
                         help="OUT.wav for one input, else a directory for <stem>.wav files")
        sub.add_argument("--subtype", choices=SUBTYPES, default="FLOAT", help="wav sample format (default FLOAT)")
        _common(sub, suppress=True)
        return sub

    command("resynth", "audio files -> resynthesized wav at the variant's rate (mel, or EnCodec with --bandwidth)",
            "IN.wav") \
        .add_argument("--bandwidth", metavar="KBPS", type=float,
                      help="EnCodec kbps: 1.5, 3, 6 or 12 (default: mel path)")
    codes = command("codes", "(K, T) EnCodec codes .npy -> wav", "IN.npy")
    codes.add_argument("--bandwidth", metavar="KBPS", type=float, help="kbps (default: from K: 2/4/8/16 -> 1.5/3/6/12)")
    mel = command("mel", "(C, T) log-mel .npy -> wav (C: the variant's mel bins, 100 by default)", "IN.npy")
    for sub in (codes, mel):
        sub.add_argument("--stream", action="store_true",
                         help="stream: write the wav as audio pieces arrive, print the time to first audio")
        sub.add_argument("--chunk-frames", metavar="N", type=int, default=None,
                         help="with --stream: send the input in chunks of N frames (default: one request)")
    ready = commands.add_parser("ready", help="exit 0 when the server and the models are ready, else 3")
    _common(ready, suppress=True)
    return parser


def _read_audio(path: Path) -> Dict[str, Any]:
    import soundfile as sf

    try:
        audio, rate = sf.read(str(path), dtype="float32", always_2d=True)  # (frames, channels)
    except (OSError, RuntimeError) as exc:  # soundfile's LibsndfileError is a RuntimeError
        raise CliError(f"{path}: cannot read audio: {exc}", EXIT_INVALID) from None
    if audio.shape[1] > 1:
        log.warning("%s: %d channels averaged to mono", path, audio.shape[1])
    return {"audio": audio.mean(axis=1, dtype=np.float32) if audio.shape[1] > 1 else audio[:, 0], "sample_rate": rate}


def _read_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise CliError(f"{path}: cannot read a .npy array: {exc}", EXIT_INVALID) from None


def _outputs(inputs: Sequence[Path], output: Path) -> List[Path]:
    """Where each input's result goes: ``output`` itself for one input to a .wav, else ``output/<stem>.wav``."""
    if len(inputs) == 1 and output.suffix.lower() == ".wav" and not output.is_dir():
        return [output]
    if output.suffix.lower() == ".wav" and not output.is_dir():
        raise CliError(f"-o {output}: {len(inputs)} inputs need an output directory, not a .wav file", EXIT_INVALID)
    paths = [output / f"{path.stem}.wav" for path in inputs]
    seen: Dict[Path, Path] = {}
    for source, target in zip(inputs, paths):
        if target in seen:
            raise CliError(f"{seen[target]} and {source} would both be written to {target}", EXIT_INVALID)
        seen[target] = source
    return paths


def _items(args: argparse.Namespace) -> List[Dict[str, Any]]:
    items = []
    for path in args.inputs:
        if args.command == "resynth":
            item = _read_audio(path)
            if args.bandwidth is not None:
                item["bandwidth"] = args.bandwidth
        elif args.command == "codes":
            item = {"codes": _read_npy(path)}
            if args.bandwidth is not None:
                item["bandwidth"] = args.bandwidth
        else:
            item = {"mel": _read_npy(path)}
        items.append(item)
    return items


def _kind(args: argparse.Namespace) -> str:
    """The kind of vocoder the command uses (so the variant's sample rate to write at)."""
    if args.command == "mel" or (args.command == "resynth" and args.bandwidth is None):
        return "mel"
    return "encodec"


def _sample_rate(client: VocosClient, args: argparse.Namespace) -> int:
    """The variant's sample rate as the server publishes it (the charactr 24 kHz for the default variant of
    a server that publishes none)."""
    try:
        return client.sample_rate_of(args.variant, _kind(args), timeout=args.timeout)
    except VocosError as exc:
        raise CliError(str(exc), _exit_code(exc)) from None


def _list_variants(client: VocosClient, args: argparse.Namespace) -> int:
    try:
        variants = client.variants(timeout=args.timeout)
    except VocosError as exc:
        raise CliError(f"{args.url}: {exc}", _exit_code(exc)) from None
    for line in format_variants(variants):
        print(line)
    return EXIT_OK


def format_variants(variants: Sequence[Any]) -> List[str]:
    """One aligned line per variant: name, kind, rate, channels, hop, padding, lookahead, bandwidths."""
    rows = [[v.name, v.kind, f"{v.sample_rate} Hz", f"{v.input_channels} ch", f"hop {v.hop_length}", v.padding,
             "lookahead " + ("-" if v.lookahead_frames is None else str(v.lookahead_frames)),
             "bandwidths " + (",".join(f"{b:g}" for b in v.bandwidths) or "-")] for v in variants]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))] if rows else []
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]


def _write(paths: Sequence[Path], waveforms: Sequence[np.ndarray], subtype: str, sample_rate: int) -> None:
    import soundfile as sf

    for path, waveform in zip(paths, waveforms):
        if subtype != "FLOAT":
            waveform = np.clip(waveform, -1.0, 1.0)  # integer PCM cannot hold more; do not let it wrap
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            sf.write(str(path), waveform, sample_rate, subtype=subtype)
        except (OSError, RuntimeError) as exc:
            raise CliError(f"{path}: cannot write: {exc}", EXIT_OTHER) from None


def _describe(exc: VocosError, inputs: Sequence[Path]) -> str:
    """A batch error names the file, not the item index."""
    if exc.item is not None and 0 <= exc.item < len(inputs):
        original = exc.__cause__ if isinstance(exc.__cause__, VocosError) else exc
        return f"{inputs[exc.item]}: {original}"
    return str(exc)


def _exit_code(exc: VocosError) -> int:
    if isinstance(exc, InvalidInputError):
        return EXIT_INVALID
    if isinstance(exc, ServerUnavailableError):
        return EXIT_UNAVAILABLE
    return EXIT_OTHER


def _stream_one(client: VocosClient, source: Path, item: Dict[str, Any], path: Path, subtype: str,
                chunk_frames: Optional[int], quiet: bool, variant: Optional[str], sample_rate: int) -> None:
    """Stream one input into ``path``, appending each piece as it arrives; no partial file on failure."""
    import soundfile as sf

    started = time.perf_counter()
    first: Optional[float] = None
    samples = 0
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with sf.SoundFile(str(path), "w", samplerate=sample_rate, channels=1, subtype=subtype) as sink:
            for piece in client.stream(chunk_frames=chunk_frames, variant=variant, **item):
                if first is None:
                    first = time.perf_counter() - started
                sink.write(np.clip(piece, -1.0, 1.0) if subtype != "FLOAT" else piece)
                sink.flush()  # progressive: a reader (a player) sees the audio as it comes
                samples += piece.shape[0]
    except VocosError as exc:
        path.unlink(missing_ok=True)
        raise CliError(f"{source}: {exc}", _exit_code(exc)) from None
    except (OSError, RuntimeError) as exc:  # soundfile's LibsndfileError is a RuntimeError
        path.unlink(missing_ok=True)
        raise CliError(f"{path}: cannot write: {exc}", EXIT_OTHER) from None
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    if not quiet:
        total = time.perf_counter() - started
        ttfa = f"{first * 1000:.1f} ms" if first is not None else "never (no audio)"
        print(f"{source}: first audio after {ttfa}; {samples / sample_rate:.2f} s of audio in {total:.2f} s",
              file=sys.stderr)


def _run_stream(client: VocosClient, args: argparse.Namespace, paths: Sequence[Path]) -> None:
    if args.chunk_frames is not None and args.chunk_frames < 1:
        raise CliError(f"--chunk-frames: expected >= 1, got {args.chunk_frames}", EXIT_INVALID)
    items = _items(args)
    sample_rate = _sample_rate(client, args)
    for source, item, path in zip(args.inputs, items, paths):
        _stream_one(client, source, item, path, args.subtype, args.chunk_frames, args.quiet, args.variant,
                    sample_rate)


def _run(args: argparse.Namespace) -> int:
    if args.list_variants and args.command is not None:
        raise CliError(f"--list-variants takes no command (got {args.command})", EXIT_INVALID)
    if not args.list_variants and args.command is None:
        raise CliError(f"the following arguments are required: {_COMMANDS_METAVAR}", EXIT_INVALID)
    if args.concurrency < 1:
        raise CliError(f"--concurrency: expected >= 1, got {args.concurrency}", EXIT_INVALID)
    if getattr(args, "chunk_frames", None) is not None and not args.stream:
        raise CliError("--chunk-frames applies only with --stream", EXIT_INVALID)
    try:
        client = VocosClient(args.url, timeout=args.timeout, retries=args.retries,
                             api_key=read_api_key(args.api_key_file),
                             ssl=args.ssl or args.root_certificates is not None,
                             root_certificates=args.root_certificates)
    except OSError as exc:  # a key or certificate file that cannot be read
        raise CliError(f"{exc.filename or ''}: {exc.strerror or exc}", EXIT_INVALID) from None
    except ValueError as exc:
        raise CliError(str(exc), EXIT_INVALID) from None
    with client:
        if args.list_variants:
            return _list_variants(client, args)
        if args.command == "ready":
            if client.ready(timeout=args.timeout):
                return EXIT_OK
            raise CliError(f"{args.url}: server or models not ready", EXIT_UNAVAILABLE)
        paths = _outputs(args.inputs, args.output)
        if getattr(args, "stream", False):
            _run_stream(client, args, paths)
            if not args.quiet:
                for path in paths:
                    print(path)
            return EXIT_OK
        items = _items(args)
        from tqdm import tqdm

        show = not args.quiet and sys.stderr.isatty()
        with tqdm(total=len(items), unit="file", file=sys.stderr, disable=not show) as bar:
            try:
                waveforms = client.synthesize_batch(items, variant=args.variant, max_concurrency=args.concurrency,
                                                    progress=lambda _: bar.update(1))
            except VocosError as exc:
                raise CliError(_describe(exc, args.inputs), _exit_code(exc)) from None
        sample_rate = _sample_rate(client, args)  # learnt by the batch; asked again only for an old server
    _write(paths, waveforms, args.subtype, sample_rate)
    if not args.quiet:
        for path in paths:
            print(path)
    return EXIT_OK


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``vocos-client``; returns the exit code (0 ok, 1 other, 2 invalid input, 3 unavailable)."""
    try:
        args = build_parser().parse_args(argv)
        # Retries are logged as warnings by the SDK; the CLI shows them only with -v, so that a
        # failure reads as exactly one line.
        logging.basicConfig(level=logging.INFO if args.verbose else logging.ERROR,
                            format=f"{PROG}: %(levelname)s: %(message)s", stream=sys.stderr)
        return _run(args)
    except CliError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return exc.code
    except VocosError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return _exit_code(exc)
    except SystemExit as exc:  # --help: argparse exits 0 after printing it
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    except KeyboardInterrupt:
        print(f"{PROG}: error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
