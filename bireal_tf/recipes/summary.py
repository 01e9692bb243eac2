"""The end of a run: the final model evaluated and saved, summary.json, the curves."""
import json
import sys

from bireal_tf.recipes.metrics_log import MetricsLog
from bireal_tf.utils import atomic_write_text, library_versions, save_model_atomic


def final_report(model, test_data, *, recipe, options, env, run_dir, throughput, wall, teacher=None):
    """Evaluate `model` (compiled by the caller for evaluation) on `test_data` (one-hot
    batches of `test_data.spec`), save it as the run's model.keras, write summary.json and
    curves.png; returns the summary.

    throughput: (training images, seconds in training steps) of the stages this process
    trained; teacher: (its path, the compiled teacher model) when the recipe distills.
    """
    spec, batches = test_data
    results = model.evaluate(batches, verbose=0, return_dict=True)
    final_model = run_dir.file("model.keras")
    save_model_atomic(model, final_model)
    scores = {}
    if teacher is not None:
        path, teacher_model = teacher
        measured = teacher_model.evaluate(batches, verbose=0, return_dict=True)
        scores = {"teacher": recipe.teacher, "teacher_model": path,
                  "teacher_top1": float(measured["top1"]), "teacher_top5": float(measured["top5"]),
                  "distill_weight": recipe.distill_weight, "teacher_input": recipe.teacher_input}
    images, seconds = throughput
    summary = {
        "recipe": recipe.name,
        "config": recipe.to_dict(),
        "learning_rates": {s.name: recipe.scaled_lr(s) for s in recipe.stages},
        "data_settings": options.data_settings,
        "dataset": {"name": recipe.dataset, "data_dir": options.data_dir,
                    "test_examples": spec.num_examples, "image_size": spec.image_size},
        "top1": float(results["top1"]),
        "top5": float(results["top5"]),
        "test_loss": float(results["loss"]),
        **scores,
        "wall_time_seconds": round(wall, 2),
        "train_images_per_second": round(images / seconds, 1) if seconds else None,
        "strategy": options.strategy,
        "replicas": env.strategy.num_replicas_in_sync,
        "mixed_precision": env.mixed_precision,
        "precision": f"mixed_{env.mixed_precision}" if env.mixed_precision else "float32",
        "precision_reason": env.precision_reason,
        "steps_per_execution": int(options.steps_per_execution),
        "deterministic": options.deterministic,
        "model": final_model,
        "versions": library_versions(),
        "command": " ".join(sys.argv),
    }
    # Printed in quiet runs too: it is the run's result, not progress.
    print(f"Test top-1 {summary['top1']:.4f}  top-5 {summary['top5']:.4f}  "
          f"({spec.num_examples} images)"
          + (f"; teacher top-1 {scores['teacher_top1']:.4f}" if scores else ""), flush=True)
    rows = MetricsLog(run_dir.file("metrics.csv")).rows()
    if rows:
        from bireal_tf.recipes.reports import plot_curves  # matplotlib: only when plotting

        plot_curves(rows, run_dir.file("curves.png"))
    atomic_write_text(run_dir.file("summary.json"), json.dumps(summary, indent=2))
    return summary

