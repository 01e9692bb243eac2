"""The int8 finetune: quantization-aware training of a trained Bi-Real Net.

    from bireal_tf.recipes.int8 import finetune_int8
    qmodel = finetune_int8(model, train_spec.dataset, epochs=1)
    qmodel.save("model_int8.keras")      # export: python -m bireal_tf.export model_int8.keras --int8 -o m.tflite

or `python -m bireal_tf.recipes.int8 MODEL.keras -o MODEL_int8.keras --epochs 1`.

`int8_model` adds the fake-quant layers (same weights); training then moves
their ranges to the activations (moving averages) while the weights adapt to
int8 rounding. Post-training ranges are not offered: LCE's maintainers report
that they lose accuracy, since values near zero become +1 after the sign.
"""

import argparse
import sys

import tensorflow as tf

from bireal_tf.models.int8 import fake_quant_layers, int8_model

__all__ = ["finetune_int8", "int8_stage", "main"]


def _from_logits(model) -> bool:
    act = getattr(model.layers[-1], "activation", None)
    return getattr(act, "__name__", "") != "softmax"


def finetune_int8(model, train, *, epochs: int = 1, learning_rate: float = 1e-5, steps_per_epoch=None,
                  validation=None, verbose: int = 1, pad_with_ones: bool = False):
    """`int8_model(model)` (or `model` itself if it has fake-quant ops), trained `epochs`
    epochs with Adam on `train` (a tf.data.Dataset of (images, sparse labels)), the
    learning rate decayed linearly from `learning_rate` to 0 when the length is known.

    The ranges start at [-6, 6] and the first training batch sets each one, so even
    one short epoch gives usable ranges; a small learning rate keeps the trained
    weights close. On full Fashion-MNIST (R18 at 91.00%, 1 epoch, batch 64) Adam at a
    constant 1e-4 lost 0.8 points in Keras and in the .tflite (90.24 / 90.20).
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}.")
    qmodel = model if fake_quant_layers(model) else int8_model(model, pad_with_ones=pad_with_ones)
    steps = steps_per_epoch or int(train.cardinality())
    if steps > 0:  # known length: decay linearly to 0, as the recipes end their training
        learning_rate = tf.keras.optimizers.schedules.PolynomialDecay(learning_rate, epochs * steps, 0.0)
    qmodel.compile(
        optimizer=tf.keras.optimizers.Adam(learning_rate),
        loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=_from_logits(qmodel)),
        metrics=[tf.keras.metrics.SparseCategoricalAccuracy(name="top1")],
    )
    qmodel.fit(train, epochs=epochs, steps_per_epoch=steps_per_epoch, validation_data=validation,
               verbose=verbose)
    return qmodel


def int8_stage(output_dir, epochs: int, *, learning_rate: float = 1e-5, data_dir=None,
               limit_train=None, export: bool = False, verbose: int = 2) -> dict:
    """Finetune a finished training run's model.keras with
    fake quantization on the run's dataset and write model_int8.keras (and, with
    `export`, model_int8.tflite with int8 I/O, its report and its test accuracy).

    Returns {"model": path, "val_top1": Keras fake-quant top-1[, "tflite", "tflite_top1"]}.
    """
    import json
    import os

    from bireal_tf.data import load_dataset
    from bireal_tf.export.files import load_keras_model
    from bireal_tf.utils import atomic_write_text, save_model_atomic

    with open(os.path.join(output_dir, "summary.json")) as f:
        data = json.load(f)["dataset"]
    model = load_keras_model(os.path.join(output_dir, "model.keras"))
    size = int(model.inputs[0].shape[1])
    data_dir = data_dir or data.get("data_dir")
    train = load_dataset(data["name"], "train", batch_size=64, image_size=size, data_dir=data_dir,
                         seed=0, limit=limit_train)
    test = load_dataset(data["name"], "test", batch_size=64, image_size=size, data_dir=data_dir)
    qmodel = finetune_int8(model, train.dataset, epochs=epochs, learning_rate=learning_rate,
                           validation=test.dataset, verbose=verbose)
    out = {"model": os.path.join(output_dir, "model_int8.keras"),
           "val_top1": float(qmodel.history.history["val_top1"][-1])}
    save_model_atomic(qmodel, out["model"])
    if export:
        from bireal_tf.evaluate import evaluate
        from bireal_tf.export import export_tflite

        out["tflite"] = os.path.join(output_dir, "model_int8.tflite")
        export_tflite(qmodel, out["tflite"], sample_inputs=test, io_type="int8", latency=None,
                      report_path=os.path.join(output_dir, "export_report_int8.json"))
        out["tflite_top1"] = evaluate(out["tflite"], data["name"], data_dir=data_dir,
                                     image_size=size)["top1"]
    atomic_write_text(os.path.join(output_dir, "int8_summary.json"), json.dumps(out, indent=2) + "\n")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bireal_tf.recipes.int8",
                                description="int8 finetune (fake quantization) of a trained model.")
    p.add_argument("model", help="trained Keras model (.keras)")
    p.add_argument("-o", "--output", required=True, help="the fake-quant model to write (.keras)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-5, help="Adam learning rate, decayed linearly to 0 (default 1e-5)")
    p.add_argument("--steps", type=int, default=None, help="steps per epoch (default: one pass)")
    p.add_argument("--dataset", default="fashion_mnist_embedded")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--pad-with-ones", action="store_true",
                   help="switch binary convs that pad with 0 to +1 padding (LCE's int8 binary "
                        "conv has no zero padding); the finetune adapts")
    args = p.parse_args(argv)

    from bireal_tf.data import load_dataset
    from bireal_tf.export.files import ExportError, ModelFileError, load_keras_model
    from bireal_tf.utils import save_model_atomic

    try:
        model = load_keras_model(args.model)
    except (ModelFileError, ExportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    size = int(model.inputs[0].shape[1])
    train = load_dataset(args.dataset, "train", batch_size=args.batch_size, image_size=size,
                         data_dir=args.data_dir, seed=0)
    test = load_dataset(args.dataset, "test", batch_size=args.batch_size, image_size=size,
                        data_dir=args.data_dir)
    try:
        qmodel = finetune_int8(model, train.dataset, epochs=args.epochs, learning_rate=args.lr,
                               steps_per_epoch=args.steps, validation=test.dataset, verbose=2,
                               pad_with_ones=args.pad_with_ones)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    save_model_atomic(qmodel, args.output)
    print(f"int8 finetune model written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
