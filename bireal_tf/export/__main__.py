"""CLI: python -m bireal_tf.export MODEL -o out.tflite [--portable] [--report report.json] ...

Converts a saved Keras model (.keras, .h5 or SavedModel directory) with Larq
Compute Engine, verifies the .tflite (every binary conv is an LceBconv2d, the
outputs agree with Keras), prints the report as a table and, with --report,
writes it as JSON (atomically). With --portable the file holds builtin ops only
(stock LiteRT runs it: `pip install ai-edge-litert`), is checked through LiteRT and
against the LCE file, and gets `<out>.json` (labels, preprocessing) and
`predict.py` beside it. Exit status: 0 exported, 1 refused or failed (the reason
on one line), 2 bad arguments or files.
"""

import argparse
import sys
import warnings


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bireal_tf.export",
        description="Convert a Bi-Real Net to an LCE .tflite, verify it and report on it.")
    p.add_argument("model", help="saved Keras model: .keras / .h5 file or SavedModel directory")
    p.add_argument("-o", "--output", required=True, help="the .tflite to write (its directory must exist)")
    p.add_argument("--report", help="also write the report as JSON to this file")
    p.add_argument("--allow-float-convs", action="store_true",
                   help="export even if binary convs stay float (or there are none); the report warns")
    p.add_argument("--allow-mismatch", action="store_true",
                   help="export even if the .tflite outputs disagree with Keras; the report warns")
    p.add_argument("--portable", action="store_true",
                   help="builtin ops only (no LCE custom op), for stock LiteRT / TFLite on a Raspberry "
                        "Pi or Android: binary convs as int8 +-1 hybrid CONV_2D, exact (an int8 "
                        "model: a fully int8 file)")
    p.add_argument("--dataset", help="the dataset the model was trained on, for the predictor's labels "
                                     "and preprocessing (default: from the run's summary.json)")
    p.add_argument("--data-dir", help="where that dataset lives (for its class names)")
    p.add_argument("--labels", metavar="FILE", help="class names, one per line (instead of the dataset's)")
    p.add_argument("--no-predictor", dest="predictor", action="store_false", default=None,
                   help="do not write <out>.json and predict.py beside a portable file")
    p.add_argument("--with-predictor", dest="predictor", action="store_true",
                   help="write <out>.json and predict.py beside an LCE file too")
    p.add_argument("--no-lce-check", dest="compare_lce", action="store_false",
                   help="portable: skip the comparison with the LCE file of the same model")
    p.add_argument("--lce-output", metavar="FILE",
                   help="portable: also write the LCE file it was compared with")
    p.add_argument("--int8", action="store_true",
                   help="int8 input and output (a model made by bireal_tf.models.int8_model and "
                        "finetuned with fake quantization; refused otherwise)")
    p.add_argument("--no-benchmark", dest="benchmark", action="store_false",
                   help="skip the host latency measurement")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], metavar="N",
                   help="thread counts to time (default: 1 2)")
    p.add_argument("--latency-runs", type=int, default=10, metavar="N",
                   help="timed runs per thread count (default 10, after 2 warm-up runs)")
    p.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"),
                   help="fix the input size of a model saved with free height/width")
    p.add_argument("--parity-samples", type=int, default=16, metavar="N",
                   help="random normal inputs for the Keras-vs-.tflite check (default 16)")
    p.add_argument("--parity-pool", type=int, default=1, metavar="K",
                   help="draw K x N candidates and keep the N whose activations are furthest "
                        "from the sign threshold (default 1: no selection)")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if min(args.threads) < 1 or args.latency_runs < 1 or args.parity_samples < 1 or args.parity_pool < 1:
        build_parser().error("--threads, --latency-runs, --parity-samples and --parity-pool "
                             "take positive integers")
    from bireal_tf.export import (ExportError, ExportWarning, LatencySettings, ModelFileError,
                                  ParitySettings, export_tflite)

    from bireal_tf.utils import EXIT_WRITE_ERROR, OutputWriteError

    warnings.simplefilter("ignore", ExportWarning)  # the table lists them
    try:
        labels = None
        if args.labels:
            try:
                with open(args.labels, encoding="utf-8") as f:
                    labels = [line.strip() for line in f if line.strip()]
            except OSError as err:
                raise ModelFileError(f"Cannot read the labels file '{args.labels}' ({err}).") from err
        report = export_tflite(
            args.model, args.output,
            allow_float_convs=args.allow_float_convs,
            allow_mismatch=args.allow_mismatch,
            parity=ParitySettings(samples=args.parity_samples, pool=args.parity_pool),
            latency=LatencySettings(tuple(args.threads), args.latency_runs) if args.benchmark else None,
            input_shape=(*args.input_size, 3) if args.input_size else None,
            io_type="int8" if args.int8 else "float32",
            report_path=args.report,
            target="portable" if args.portable else "lce",
            dataset=args.dataset, data_dir=args.data_dir, labels=labels,
            write_predictor=args.predictor, compare_lce=args.compare_lce, lce_path=args.lce_output,
        )
    except ModelFileError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OutputWriteError as err:  # a full disk, a read-only directory
        print(f"error: {err}", file=sys.stderr)
        return EXIT_WRITE_ERROR
    except (ExportError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(report.to_json() if args.json else report.format_table())
    if args.report:
        print(f"report written to {args.report}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
