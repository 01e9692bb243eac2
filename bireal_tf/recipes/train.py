"""`python -m bireal_tf.recipes.train RECIPE [options]`: train, evaluate, save.

Examples:

    python -m bireal_tf.recipes.train --list
    python -m bireal_tf.recipes.train r18_adam --data-dir ~/tensorflow_datasets
    python -m bireal_tf.recipes.train r18_paper --dataset folder --data-dir /data/imagenet
    python -m bireal_tf.recipes.train r18_adam --demo          # what `make demo` runs
    python -m bireal_tf.recipes.train r18_react --teacher resnet50.keras --teacher-input caffe

Rerunning the same command resumes the run in its output directory.
"""
import argparse
import os
import sys

# `--demo` (`make demo` runs r18_adam with it): the embedded Fashion-MNIST subset, about six
# epochs of training in all, shared by the stages that train (r18_adam: one stage of 6;
# r18_react: twin, step 1 and step 2 of 2 each; the paper pipeline: 1 each), then the export.
# The batch, learning rate, augmentation and padding are the small-image settings every
# recipe takes on such data (Recipe.fit_to_data).
DEMO_DATASET = "fashion_mnist_embedded"
DEMO_EPOCHS = 6


def demo_settings(recipe):
    """The options `--demo` sets for `recipe` (options given on the command line win)."""
    training = [s for s in recipe.stages if not s.train_only_batchnorm]
    return dict(
        dataset=DEMO_DATASET,
        epochs=max(1, DEMO_EPOCHS // len(training)),
        output_dir=os.path.join("runs", "demo" if recipe.name == "r18_adam"
                                else f"demo_{recipe.name}"),
        export=True,
    )


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m bireal_tf.recipes.train",
        description="Train a Bi-Real Net recipe, evaluate top-1/top-5 and save the model.",
        epilog="Rerun the same command to resume a stopped run from its output directory.",
    )
    p.add_argument("recipe", nargs="?", help="recipe name (see --list)")
    p.add_argument("--list", action="store_true", help="print the recipes, one line each")
    p.add_argument("--demo", action="store_true",
                   help="the demo setting for any recipe: embedded Fashion-MNIST, about 6 "
                        "epochs shared by the stages, export; output in runs/demo (r18_adam) "
                        "or runs/demo_RECIPE; other options still override it")
    data = p.add_argument_group("data")
    data.add_argument("--dataset", help="imagenet2012, folder, fashion_mnist, fashion_mnist_embedded")
    data.add_argument("--data-dir", help="TFDS data dir, the folder tree, or the IDX files' folder")
    data.add_argument("--image-size", type=int, help="training and evaluation crop size")
    data.add_argument("--limit-train", type=int, help="use only the first N training examples")
    data.add_argument("--limit-eval", type=int, help="use only the first N test examples")
    data.add_argument("--on-corrupt", choices=("skip", "fail"), default="skip",
                      help="--dataset folder: skip files that are not images (default; each is "
                           "named in a warning) or fail on the first one")
    hp = p.add_argument_group("hyper-parameters (stage fields apply to every stage but the "
                              "BatchNorm retrain, which takes only --augmentation)")
    hp.add_argument("--epochs", type=int)
    hp.add_argument("--batch-size", type=int)
    hp.add_argument("--lr", type=float,
                    help="learning rate used at --batch-size (default: the recipe's, scaled "
                         "linearly with the batch size)")
    hp.add_argument("--optimizer", choices=("adam", "sgd"))
    hp.add_argument("--schedule", choices=("linear", "step", "constant"))
    hp.add_argument("--weight-decay", type=float)
    hp.add_argument("--label-smoothing", type=float)
    hp.add_argument("--augmentation", choices=("adam", "paper", "none"))
    hp.add_argument("--activation", choices=("binary", "relu", "leaky_clip", "clip"),
                    help="the network variant every stage trains: relu trains the recipe's "
                         "real-valued twin (e.g. a teacher for --teacher PATH)")
    hp.add_argument("--reestimate-batchnorm", action=argparse.BooleanOptionalAction,
                    help="re-estimate BatchNorm's statistics on 2,048 training images after "
                         "each epoch, before validation and checkpoint (default: the recipe's; "
                         "on in ReActNet's step 2, whose moving averages lag its weights)")
    hp.add_argument("--steps-per-epoch", type=int)
    hp.add_argument("--seed", type=int)
    hp.add_argument("--padding", choices=("same", "symmetric"))
    hp.add_argument("--pad-values", type=float, choices=(0.0, 1.0),
                    help="what binary convs pad with: 0 (the authors) or 1 (LCE's fast kernels; "
                         "needed for a correct .tflite below 65x65 inputs)")
    kd = p.add_argument_group(
        "distillation", "loss = W * CE(teacher's softmax, student) + (1 - W) * CE(labels, student), "
        "the teacher in inference mode on the same augmented batch; the label term takes the "
        "stage's label smoothing, the teacher's none. Top-1/top-5 and val_loss compare the "
        "student with the labels.")
    kd.add_argument("--teacher", metavar="PATH|twin|none",
                    help="PATH: a Keras classifier file (.keras, .h5, SavedModel) of the same "
                         "classes and input size; twin: train the network's real-valued twin "
                         "(ReLU) first, as stage 'twin' of this run, and distil from it; none: "
                         "train on the labels. Default: none; r18_react/r34_react: twin")
    kd.add_argument("--distill-weight", type=float, metavar="W",
                    help="W in [0, 1] in the loss above (default 1: the teacher only, no labels, "
                         "ReActNet's distribution loss; 0: labels only)")
    kd.add_argument("--teacher-input", choices=("ours", "pixels", "caffe", "tf", "torch"),
                    help="the input convention of a --teacher PATH: ours (default: images as "
                         "this pipeline normalises them, e.g. our own models), pixels (RGB "
                         "0-255), or the Keras Applications preprocess_input mode (caffe: "
                         "ResNet50/101/152, tf: ResNet50V2/MobileNet, torch: DenseNet)")
    run = p.add_argument_group("run")
    run.add_argument("--stage", help="start at this stage (the stages before it are skipped)")
    run.add_argument("--init-weights",
                     help="weights to start from: a .keras model or weights file (e.g. a trained "
                          "real-valued network for --stage leaky_clip), or larq_zoo for "
                          "larq-zoo's ImageNet Bi-Real-18 (fetched and hash-checked by larq-zoo)")
    run.add_argument("--output-dir", help="default: runs/<recipe>")
    run.add_argument("--overwrite", action="store_true",
                     help="delete the run found in --output-dir (never the workers' "
                          "worker-<i>/ folders: each worker clears its own)")
    run.add_argument("--strategy", default="default",
                     help="default, one_device, mirrored, multi_worker (TF_CONFIG), tpu")
    run.add_argument("--tpu", help="TPU name or address for --strategy tpu")
    run.add_argument("--mixed-precision", choices=("auto", "float32", "float16", "bfloat16"),
                     default="auto",
                     help="auto (default): bfloat16 on CPUs with AVX512_BF16/AMX for inputs "
                          "above 64 px (1.45-1.56x faster training there, accuracy within the "
                          "float32 seeds' spread: BENCHMARKS.md), float32 elsewhere. float16 "
                          "for GPUs. The .tflite is exported from the float32 twin either way")
    run.add_argument("--steps-per-execution", type=int,
                     help="train steps per call of the train function (default 4: less "
                          "overhead, the same steps; 1 calls callbacks after every step)")
    run.add_argument("--deterministic", action="store_true",
                     help="deterministic TF ops (reproducible, slower)")
    run.add_argument("--no-validate", action="store_true", help="skip per-epoch validation")
    run.add_argument("--export", action="store_true",
                     help="export a verified LCE .tflite at the end and evaluate it")
    run.add_argument("--int8-epochs", type=int, default=0, metavar="N",
                     help="after training, finetune N epochs with fake int8 quantization "
                          "(model_int8.keras); with --export also model_int8.tflite (int8 "
                          "layers beside the binary ones), verified and evaluated")
    run.add_argument("--checkpoint-every", type=int, metavar="N",
                     help="also checkpoint every N training steps, for machines that die "
                          "without a signal (SIGTERM and Ctrl-C always checkpoint the step "
                          "they stop at)")
    run.add_argument("--quiet", action="store_true",
                     help="no progress bars (the lines about the run's state still print)")
    args = p.parse_args(argv)
    if not args.list and not args.recipe:
        p.error("give a RECIPE, or --list to see them")
    return args


# Command-line options that override recipe or stage fields of the same name (None: keep).
CLI_OVERRIDES = ("dataset", "batch_size", "image_size", "steps_per_epoch", "seed", "padding",
                 "pad_values", "epochs", "optimizer", "schedule", "weight_decay",
                 "label_smoothing", "augmentation", "activation", "teacher", "distill_weight",
                 "teacher_input", "reestimate_batchnorm")


def build_recipe(args):
    from bireal_tf.recipes.recipe import get_recipe

    recipe = get_recipe(args.recipe)
    if args.demo:  # the stages it shares its epochs with include a --teacher twin's
        staged = recipe if args.teacher is None else recipe.with_teacher(args.teacher)
        for key, value in demo_settings(staged).items():
            if getattr(args, key, None) in (None, False):
                setattr(args, key, value)
    recipe, fitted = recipe.fit_to_data(args.dataset, args.image_size)
    batch = args.batch_size or recipe.batch_size
    lr = None
    if args.lr is not None:  # given at the batch used: undo the linear scaling
        lr = args.lr * recipe.base_batch_size / batch
    given = {name: getattr(args, name) for name in CLI_OVERRIDES}
    recipe = recipe.with_overrides(stage=None, lr=lr, **given)
    # What the small-image settings decided: an option given on the command line won.
    fitted = {key: value for key, value in fitted.items()
              if getattr(args, key, None) is None}
    return recipe, fitted


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import bireal_tf  # noqa: F401  (Keras 2 before TensorFlow is used)
    import tensorflow as tf

    # Larq's QuantizedVariable makes AutoGraph warn once per model; it is harmless.
    tf.get_logger().setLevel("ERROR")
    from bireal_tf.data import DataError
    from bireal_tf.export import ExportError
    from bireal_tf.recipes.loop import (STEPS_PER_EXECUTION, TrainingError, input_size,
                                       resolve_mixed_precision, train_recipe)
    from bireal_tf.recipes.preemption import Preempted
    from bireal_tf.recipes.recipe import RECIPES
    from bireal_tf.utils import EXIT_WRITE_ERROR, OutputWriteError

    if args.int8_epochs < 0:
        print(f"error: --int8-epochs must be >= 0, got {args.int8_epochs}.", file=sys.stderr)
        return 2
    if args.list:
        for name, r in RECIPES.items():
            stages = " -> ".join(f"{s.name}({s.epochs})" for s in r.stages)
            print(f"{name:10s} {r.description}; batch {r.batch_size}; stages {stages}"
                  + (f"; teacher {r.teacher}" if r.teacher else ""))
        return 0
    try:
        recipe, fitted = build_recipe(args)
        if args.int8_epochs and not recipe.pad_values:
            raise ValueError("--int8-epochs needs binary convs that pad with +1: add --pad-values 1 "
                             "(LCE's int8 binary conv has no zero padding).")
        precision, why = resolve_mixed_precision(args.mixed_precision, args.strategy, input_size(recipe))
        print(f"precision: {'mixed_' + precision if precision else 'float32'} ({why})", flush=True)
        if fitted:
            print(f"{recipe.dataset} settings: "
                  + ", ".join(f"{k} {v}" for k, v in fitted.items())
                  + " (small images; options given on the command line win)", flush=True)
        output_dir = args.output_dir or os.path.join("runs", recipe.name)
        summary = train_recipe(
            recipe,
            output_dir,
            data_dir=args.data_dir,
            start_stage=args.stage,
            init_weights=args.init_weights,
            overwrite=args.overwrite,
            strategy=args.strategy,
            tpu=args.tpu,
            mixed_precision=args.mixed_precision,  # resolved again, the same way, for summary.json
            steps_per_execution=(STEPS_PER_EXECUTION if args.steps_per_execution is None
                                 else args.steps_per_execution),
            deterministic=args.deterministic,
            limit_train=args.limit_train,
            limit_eval=args.limit_eval,
            on_corrupt=args.on_corrupt,
            validate=not args.no_validate,
            verbose=0 if args.quiet else 1,
            data_settings=fitted,
            checkpoint_every=args.checkpoint_every,
        )
        if args.export:
            from bireal_tf.recipes.deploy import export_and_evaluate

            summary = export_and_evaluate(summary, output_dir, data_dir=args.data_dir,
                                          limit_eval=args.limit_eval)
        if args.int8_epochs:
            from bireal_tf.recipes.int8 import int8_stage

            print(f"int8 finetune, {args.int8_epochs} epoch(s) (the float model is saved)", flush=True)
            int8 = int8_stage(output_dir, args.int8_epochs, data_dir=args.data_dir,
                              limit_train=args.limit_train, export=args.export,
                              verbose=0 if args.quiet else 2)
            print("int8: fake-quant Keras top-1 {:.2%}".format(int8["val_top1"])
                  + (", .tflite top-1 {:.2%}".format(int8["tflite_top1"]) if "tflite_top1" in int8 else ""))
    except Preempted as stop:
        print(stop, file=sys.stderr, flush=True)
        return stop.status
    except OutputWriteError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_WRITE_ERROR
    except (ValueError, TrainingError, DataError, ExportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outside training steps (loading, evaluating, exporting)
        print("\nInterrupted. Rerun the same command to resume from the last checkpoint.",
              file=sys.stderr)
        return 130
    out = os.path.abspath(output_dir)
    print(f"\nEverything is in {out}:")
    for name in ("model.keras", "model.tflite",
                 "summary.json", "metrics.csv", "curves.png",
                 "export_report.json", "model_int8.keras", "model_int8.tflite",
                 "export_report_int8.json", "int8_summary.json", "logs"):
        if os.path.exists(os.path.join(out, name)):
            print(f"  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
