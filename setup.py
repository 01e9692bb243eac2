"""Packaging for bireal_tf: Bi-Real Net on Larq, from training to a verified LCE .tflite."""
from setuptools import find_packages, setup

# Pins (docs/design.md, "The pinned stack"): LCE 0.16 is built on TF 2.16; Larq needs
# Keras 2 (tf-keras) and numpy < 2; larq-zoo 2.4 pins protobuf < 3.21.
INSTALL_REQUIRES = [
    "tensorflow==2.16.2",
    "tf-keras==2.16.0",
    "larq==0.14.0",
    "larq-zoo==2.4.0",
    "larq-compute-engine==0.16.0",
    # Stock LiteRT runs portable exports (python -m bireal_tf.export --portable) and the
    # predictor; it needs only numpy >= 1.23.2, so it sits beside TF 2.16.2 and numpy 1.26.
    "ai-edge-litert==2.3.0",
    "pillow",
    "tensorflow-datasets",
    "numpy<2",
    "matplotlib",
]

EXTRAS = {
    "test": ["pytest", "pytest-xdist", "dill", "nbclient", "ipykernel", "nbformat", "hypothesis"],
}

setup(
    name="bireal_tf",
    version="0.1.0",
    description="Bi-Real Net 18/34/50 on Larq: paper recipes, Adam recipe, verified LCE export",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["bireal_tf", "bireal_tf.*"]),
    package_data={"bireal_tf.data": ["embedded/*"]},
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
