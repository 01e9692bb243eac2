"""`python -m bireal_tf.interop CHECKPOINT --depth 18 [--arch reactnet] [-o model.keras]
[--export model.tflite]`."""

import argparse
import os
import sys

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m bireal_tf.interop",
        description="A checkpoint of the authors' PyTorch Bi-Real Net or ReActNet (its "
                    "Bi-Real-based net) -> Keras model [-> verified LCE .tflite]. Runs no "
                    "code from the checkpoint.",
    )
    p.add_argument("checkpoint", help=".pth / .pth.tar file saved by the authors' train.py "
                                      "or a state dict saved with torch.save")
    p.add_argument("--depth", type=int, required=True, choices=(18, 34, 50))
    p.add_argument("--arch", choices=("bireal", "reactnet", "auto"), default="bireal",
                   help="bireal (liuzechun/Bi-Real-net, the default), reactnet "
                        "(liuzechun/ReActNet, 18/34), or auto: told from the checkpoint's keys")
    p.add_argument("--step", type=int, choices=(1, 2), default=2,
                   help="ReActNet's training step of the checkpoint: 2 (binary weights, "
                        "default) or 1 (real 3x3 weights; cannot be exported)")
    p.add_argument("-o", "--output", help="the Keras model to write (.keras)")
    p.add_argument("--export", metavar="TFLITE", help="export a verified LCE .tflite")
    p.add_argument("--report", help="with --export: write the export report JSON there")
    p.add_argument("--input-size", type=int, default=224,
                   help="input height and width (default 224; below 65 the export refuses "
                        "the authors' zero padding: LCE computes it wrongly there)")
    return p


def _refusal(args):
    """Why the arguments cannot work, before anything is read or built; or None."""
    if not args.output and not args.export:
        return "nothing to write: pass -o MODEL.keras and/or --export MODEL.tflite."
    if args.export and args.step == 1:
        return ("--export needs binary weights: ReActNet's step 1 keeps the 3x3 weights real, "
                "so LCE has no binary conv to make; export the step-2 checkpoint trained from it.")
    if args.report and not args.export:
        return "--report describes the export: pass --export MODEL.tflite with it."
    for path in (args.output, args.export, args.report):
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            return f"the directory of {path} does not exist."
    return None


def main(argv=None):
    args = build_parser().parse_args(argv)
    refusal = _refusal(args)
    if refusal:
        print(f"error: {refusal}", file=sys.stderr)
        return 2
    import bireal_tf  # noqa: F401  (Keras 2 before TensorFlow)
    from bireal_tf.interop import CheckpointError, checkpoint_info, from_pytorch, load_checkpoint
    from bireal_tf.interop.pytorch import net_name
    from bireal_tf.utils import save_model_atomic

    try:
        state = load_checkpoint(args.checkpoint)
        info = checkpoint_info(state)
        size, channels = args.input_size, info["channels"] or 3
        model = from_pytorch(state, args.depth, arch=args.arch, step=args.step,
                             input_shape=(size, size, channels))
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    arch = info["arch"] if args.arch == "auto" else args.arch
    step = f", step {args.step}" if arch == "reactnet" else ""
    print(f"{args.checkpoint}: {net_name(arch, args.depth)}{step}, {info['num_classes']} classes, "
          f"input {size}x{size}x{channels}" + (f" -> {args.output}" if args.output else ""))
    if args.output:
        save_model_atomic(model, args.output)
    if args.export:
        from bireal_tf.export import ExportError, export_tflite

        try:
            report = export_tflite(model, args.export, report_path=args.report)
        except ExportError as e:
            print(f"error: export refused: {e}", file=sys.stderr)
            return 1
        print(report.format_table())
        print(f"-> {args.export}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
