"""`python -m bireal_tf.interop CHECKPOINT --depth 18 -o model.keras [--export model.tflite]`."""

import argparse
import os
import sys

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m bireal_tf.interop",
        description="A checkpoint of the authors' PyTorch Bi-Real Net -> Keras model "
                    "[-> verified LCE .tflite]. Runs no code from the checkpoint.",
    )
    p.add_argument("checkpoint", help=".pth / .pth.tar file saved by the authors' train.py "
                                      "or a state dict saved with torch.save")
    p.add_argument("--depth", type=int, required=True, choices=(18, 34, 50))
    p.add_argument("-o", "--output", required=True, help="the Keras model to write (.keras)")
    p.add_argument("--export", metavar="TFLITE", help="also export a verified LCE .tflite")
    p.add_argument("--report", help="with --export: write the export report JSON there")
    p.add_argument("--input-size", type=int, default=224,
                   help="input height and width (default 224; below 65 the export refuses "
                        "the authors' zero padding: LCE computes it wrongly there)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    import bireal_tf  # noqa: F401  (Keras 2 before TensorFlow)
    from bireal_tf.interop import CheckpointError, checkpoint_info, from_pytorch, load_checkpoint
    from bireal_tf.utils import save_model_atomic

    for path in (args.output, args.export, args.report):
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            print(f"error: the directory of {path} does not exist.", file=sys.stderr)
            return 2
    try:
        state = load_checkpoint(args.checkpoint)
        info = checkpoint_info(state)
        size = args.input_size
        model = from_pytorch(state, args.depth, input_shape=(size, size, info["channels"] or 3))
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    save_model_atomic(model, args.output)
    print(f"{args.checkpoint}: Bi-Real Net {args.depth}, {info['num_classes']} classes, "
          f"input {size}x{size}x{info['channels'] or 3} -> {args.output}")
    if args.export:
        from bireal_tf.export import ExportError, export_tflite

        try:
            if args.report:
                report = export_tflite(model, args.export, report_path=args.report)
            else:
                report = export_tflite(model, args.export)
        except ExportError as e:
            print(f"error: export refused: {e}", file=sys.stderr)
            return 1
        print(report.format_table())
        print(f"-> {args.export}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
