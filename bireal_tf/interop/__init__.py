"""Foreign formats in: checkpoints of the authors' PyTorch code (Bi-Real Net, ReActNet).

    from bireal_tf.interop import from_pytorch
    model = from_pytorch("checkpoint.pth.tar", 18)   # a checkpoint of Bi-Real's train.py
    model = from_pytorch("checkpoint.pth.tar", 18, arch="reactnet")   # of ReActNet's (step 2)

or `python -m bireal_tf.interop CHECKPOINT --depth 18 [--arch reactnet] -o model.keras
--export model.tflite`.
No torch needed: both of torch.save's formats (zip, and the legacy one of torch < 1.6)
are read by a restricted reader that runs no code and reads at most the file
(`read_torch_checkpoint`); with torch installed, `torch.load(weights_only=True)`.

larq-zoo's weights are a Keras file and load beside the builders
(`BiRealNet18(weights="larq_zoo")`, `bireal_tf.models.from_larq_zoo`).
"""

from bireal_tf.interop.pytorch import checkpoint_info, from_pytorch, load_checkpoint
from bireal_tf.interop.torch_reader import CheckpointError, read_torch_checkpoint, read_torch_zip

__all__ = [
    "CheckpointError",
    "checkpoint_info",
    "from_pytorch",
    "load_checkpoint",
    "read_torch_checkpoint",
    "read_torch_zip",
]
