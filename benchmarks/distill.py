"""What a teacher costs: training throughput of a student with and without distillation.

`make bench` section "distill". The student is our Bi-Real-18, compiled and timed as the
training section times it (the r18_adam stage, Keras' train function on one in-memory
batch). With a teacher, the same student trains inside the loop's `Distiller`, which
calls the teacher in inference mode on every batch; the teacher is saved to a file and
loaded by `load_teacher`, as `--teacher PATH` loads it. Teachers:

- "twin": the student's real-valued twin (ReLU, the same network), what `--teacher twin` trains;
- "resnet50": Keras Applications' ResNet50 (weights=None: the cost does not depend on the
  values), through the caffe input conversion, the ImageNet teacher docs/training.md suggests
  in place of ReActNet's torchvision ResNet-34.

Each group (size, batch, classes) runs its cases in one round robin;
ratio = images/s with the teacher / images/s without it.
"""
import tempfile
from dataclasses import asdict, replace

from benchmarks.common import f1, log, round_robin, spread, summarize, table, times
from benchmarks.training import TrainCase, TrainConfig, verdict

TITLE = "Distillation: training images/s with and without a teacher"


def save_teacher(kind, size, classes, directory):
    """The teacher `kind` as a model file in `directory`; (path, its input convention)."""
    import tensorflow as tf

    from bireal_tf.models import bireal_net

    if kind == "twin":
        model, convention = bireal_net(18, input_shape=(size, size, 3), num_classes=classes,
                                       activation="relu"), "ours"
    elif kind == "resnet50":
        model, convention = tf.keras.applications.ResNet50(
            weights=None, input_shape=(size, size, 3), classes=classes), "caffe"
    else:
        raise ValueError(f"unknown teacher {kind!r}; valid: twin, resnet50.")
    path = f"{directory}/{kind}_{size}.keras"
    model.save(path)
    return path, convention


def distiller_wrap(path, convention, size, classes):
    """A function that puts a student inside the loop's Distiller with that teacher."""
    from bireal_tf.data.preprocessing import IMAGENET_MEAN, IMAGENET_STD
    from bireal_tf.recipes.distill import Distiller, load_teacher

    def wrap(student):
        teacher = load_teacher(path, num_classes=classes, image_size=size, mean=IMAGENET_MEAN,
                               std=IMAGENET_STD, teacher_input=convention)
        return Distiller(student, teacher)

    return wrap


def run(settings, sections=None) -> dict:
    import tensorflow as tf

    groups = []
    with tempfile.TemporaryDirectory(prefix="bireal_bench_teachers_") as directory:
        for size, batch, classes, teachers in settings.distill_groups:
            base = TrainConfig("student", "ours", size, batch)
            cases = {"student": TrainCase(base, classes, settings.repeat_seconds)}
            for kind in teachers:
                path, convention = save_teacher(kind, size, classes, directory)
                cfg = replace(base, name=f"student+{kind}")
                cases[cfg.name] = TrainCase(cfg, classes, settings.repeat_seconds,
                                            wrap=distiller_wrap(path, convention, size, classes))
            for name, case in cases.items():
                log(f"distill {size}x{size} batch {batch}: built {name}, trace + first step "
                    f"{case.info['first_call_seconds']} s, {case.info['steps_per_repeat']} steps/repeat")
            samples = round_robin({n: c.run for n, c in cases.items()}, settings.repeats,
                                  settings.warmup)
            groups.append({
                "size": size, "batch": batch, "classes": classes,
                "cases": {n: {"config": asdict(c.cfg), **c.info,
                              "images_per_second": summarize(samples[n])}
                          for n, c in cases.items()},
                "ratios": {kind: verdict(samples[f"student+{kind}"], samples["student"])
                           for kind in teachers},
            })
            del cases
            tf.keras.backend.clear_session()
    return {"repeats": settings.repeats, "warmup_rounds": settings.warmup, "groups": groups}


def _median(group, name):
    return group["cases"][name]["images_per_second"]["median"]


def markdown(r: dict) -> str:
    rows = [[f"{g['size']}x{g['size']}", g["batch"], g["classes"], kind, f1(_median(g, "student")),
             f1(_median(g, f"student+{kind}")), times(ratio["ratio"], 3),
             f"{ratio['paired_min']:.2f}-{ratio['paired_max']:.2f}"]
            for g in r["groups"] for kind, ratio in g["ratios"].items()]
    cases = [[f"{g['size']}x{g['size']}", name, f1(c["images_per_second"]["median"]),
              spread(c["images_per_second"]), c["steps_per_repeat"], f1(c["first_call_seconds"])]
             for g in r["groups"] for name, c in g["cases"].items()]
    return "\n\n".join([
        "Our Bi-Real-18 student (the r18_adam stage, float32) trained by Keras' train function "
        "on one in-memory batch, alone and inside the training loop's Distiller with a teacher "
        "file loaded by `load_teacher` (called in inference mode on every batch). twin: the "
        f"student's real-valued twin; resnet50: Keras' ResNet50 with caffe input. "
        f"{r['repeats']} timed repeats after {r['warmup_rounds']} warm-up round(s), the cases "
        "of a size in one round robin; ratio = with / without the teacher (< 1: slower).",
        table(["input", "batch", "classes", "teacher", "student alone img/s",
               "with the teacher img/s", "ratio", "per-round ratios"], rows),
        "<details><summary>Every case</summary>",
        table(["size", "case", "median img/s", "min-max", "steps/repeat", "trace + first step s"],
              cases),
        "</details>",
    ])


def findings(r: dict) -> list:
    return [f"Distillation at {g['size']}x{g['size']}, batch {g['batch']}: with the {kind} teacher "
            f"{_median(g, 'student+' + kind):.1f} vs {_median(g, 'student'):.1f} images/s alone "
            f"= {ratio['ratio']:.2f}x."
            for g in r["groups"] for kind, ratio in g["ratios"].items()]
