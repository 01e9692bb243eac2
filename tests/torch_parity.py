"""Our nets against PyTorch nets (torch installed only): logits on inputs clear of the sign threshold.

torch's sign(0) is 0 and ours +1 (as LCE's), so an input is compared only if every
activation a sign module binarizes is at least `margin` x that layer's max away from zero.
"""
import numpy as np


def logits_and_clear_inputs(net, sign_type, x, margin):
    """(torch logits of `net` on x, mask of the inputs clear of the sign threshold,
    how many `sign_type` modules ran)."""
    import torch

    margins = []

    def record(module, inputs, output):
        v = inputs[0].abs().flatten(1)
        margins.append(v.min(1).values / v.max(1).values)

    hooks = [m.register_forward_hook(record) for m in net.modules() if isinstance(m, sign_type)]
    try:
        with torch.no_grad():
            logits = net(x).numpy()
    finally:
        for h in hooks:
            h.remove()
    clear = (torch.stack(margins).min(0).values > margin).numpy()
    assert clear.sum() >= 4, f"{int(clear.sum())} clear inputs"
    return logits, clear, len(margins)


def assert_logits_match(model, x, logits, clear, label, capsys):
    """Our model's logits on torch's NCHW inputs x against torch's, on the clear inputs:
    max relative difference < 1e-4 and top-1 agreement 1.0 (printed)."""
    ours = model(x.numpy().transpose(0, 2, 3, 1), training=False).numpy()
    rel = np.abs(ours - logits)[clear].max() / np.abs(logits[clear]).max()
    top1 = (ours[clear].argmax(1) == logits[clear].argmax(1)).mean()
    with capsys.disabled():
        print(f"\n[torch parity] {label}: {int(clear.sum())}/{len(clear)} clear inputs, "
              f"max relative difference {rel:.2e}, top-1 agreement {top1:.3f}")
    assert rel < 1e-4 and top1 == 1.0


def assert_same_state(a, b):
    """Two state dicts of NumPy arrays hold the same keys and values."""
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
