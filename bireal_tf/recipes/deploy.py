"""`--export`: turn a finished run into a verified .tflite and measure its own accuracy."""
import json
import os

from bireal_tf.data import load_dataset
from bireal_tf.utils import atomic_write_text


def export_and_evaluate(summary, output_dir, *, data_dir=None, limit_eval=None, verbose=True):
    """Export `summary["model"]` to `<output_dir>/model.tflite` and evaluate that file.

    The export checks that every binary conv became `LceBconv2d` and that the file's
    outputs match Keras on test images (bireal_tf.export); the .tflite is then run
    over the same test split as the Keras model, so the accuracy of the shipped file
    stands beside the Keras accuracy in `summary.json`.
    """
    from bireal_tf.evaluate import evaluate
    from bireal_tf.export import export_tflite

    out = os.path.abspath(output_dir)
    tflite_path = os.path.join(out, "model.tflite")
    dataset = summary["dataset"]
    samples = load_dataset(dataset["name"], "test", batch_size=16, image_size=dataset["image_size"],
                           data_dir=data_dir, shuffle=False, limit=16)
    report = export_tflite(summary["model"], tflite_path, sample_inputs=samples,
                           report_path=os.path.join(out, "export_report.json"))
    if verbose:
        print(report.format_table(), flush=True)
    spec = load_dataset(dataset["name"], "test", batch_size=64, image_size=dataset["image_size"],
                        data_dir=data_dir, shuffle=False, limit=limit_eval)
    lite = evaluate(tflite_path, spec)
    summary = dict(summary)
    summary["tflite"] = {
        "path": tflite_path,
        "top1": lite["top1"],
        "top5": lite["top5"],
        "num_examples": lite["num_examples"],
        "top1_minus_keras_top1": lite["top1"] - summary["top1"],
        "size_bytes": os.path.getsize(tflite_path),
        "report": os.path.join(out, "export_report.json"),
    }
    atomic_write_text(os.path.join(out, "summary.json"), json.dumps(summary, indent=2))
    if verbose:
        print(f".tflite top-1 {lite['top1']:.4f}  top-5 {lite['top5']:.4f}  "
              f"(Keras top-1 {summary['top1']:.4f}; {lite['num_examples']} images)", flush=True)
    return summary
