"""Pretrained weights in: larq-zoo's ImageNet Bi-Real-18 and the authors' PyTorch checkpoints.

    from bireal_tf.interop import from_larq_zoo, from_pytorch
    model = from_larq_zoo()                          # larq-zoo's weights (fetched, cached)
    model = from_pytorch("checkpoint.pth.tar", 18)   # a checkpoint of the authors' train.py

or `python -m bireal_tf.interop CHECKPOINT --depth 18 -o model.keras --export model.tflite`.
Neither needs torch: PyTorch's zip format is read by a restricted reader that
runs no code (`read_torch_zip`); with torch installed, `torch.load(weights_only=True)`.
"""

from bireal_tf.interop.larq_zoo import WeightsUnavailableError, from_larq_zoo, load_larq_zoo_weights
from bireal_tf.interop.pytorch import checkpoint_info, from_pytorch, load_checkpoint
from bireal_tf.interop.torch_reader import CheckpointError, read_torch_zip

__all__ = [
    "CheckpointError",
    "WeightsUnavailableError",
    "checkpoint_info",
    "from_larq_zoo",
    "from_pytorch",
    "load_checkpoint",
    "load_larq_zoo_weights",
    "read_torch_zip",
]
