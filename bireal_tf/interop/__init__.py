"""Foreign formats in: checkpoints of the authors' PyTorch code.

    from bireal_tf.interop import from_pytorch
    model = from_pytorch("checkpoint.pth.tar", 18)   # a checkpoint of the authors' train.py

or `python -m bireal_tf.interop CHECKPOINT --depth 18 -o model.keras --export model.tflite`.
No torch needed: PyTorch's zip format is read by a restricted reader that runs no
code (`read_torch_zip`); with torch installed, `torch.load(weights_only=True)`.

larq-zoo's weights are a Keras file and load beside the builders
(`BiRealNet18(weights="larq_zoo")`, `bireal_tf.models.from_larq_zoo`).
"""

from bireal_tf.interop.pytorch import checkpoint_info, from_pytorch, load_checkpoint
from bireal_tf.interop.torch_reader import CheckpointError, read_torch_zip

__all__ = [
    "CheckpointError",
    "checkpoint_info",
    "from_pytorch",
    "load_checkpoint",
    "read_torch_zip",
]
