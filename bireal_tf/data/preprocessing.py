"""Image preprocessing: the papers' augmentations, the evaluation transform, normalisation.

All transforms take one uint8 image [H, W, C] (C = 1 or 3) and return float32
[S, S, 3]: grayscale is tiled to three channels so that the ImageNet-shaped stem
works unchanged. Values are put on the [0, 1] scale first (as torchvision's
ToTensor does), transformed, then normalised per channel, x' = (x - mean) / std.

Three modes, from the papers and the authors' code (docs/design.md, "Recipe
hyper-parameters"), with ratio r = 256/224 = 8/7:

- "none" (evaluation): resize the shorter side to round(r*S), take the central
  S x S crop.
- "paper" (ECCV training): resize the shorter side to round(r*S), random S x S
  crop, random horizontal flip.
- "adam" (the authors' PyTorch training): random-resized crop -- a box of area
  a*H*W with a ~ U(0.08, 1) and aspect ratio (w/h) ~ U(3/4, 4/3), resized to
  S x S (tf.image.sample_distorted_bounding_box draws it; after 10 failed draws
  it takes the whole image) --, random flip, then AlexNet's PCA lighting noise:
  x += V (alpha * lambda), alpha ~ N(0, 0.1^2) per component, with the
  eigenvalues lambda and eigenvectors V of ImageNet's RGB covariance. The noise
  is added on the [0, 1] scale and not clipped, as in the authors' code.

Small images (Fashion-MNIST, 28 x 28, the object fills the frame) keep the same
ratio r but never crop the object away:

- "none": resize to S x S (no crop: a 7/8 centre crop would cut off the
  sleeves and soles the classes differ by).
- "paper": resize to S x S, zero-pad by round(S/14) on each side (to about
  r*S, the background of Fashion-MNIST is 0) and take a random S x S crop, i.e.
  a random shift of up to S/14 pixels; random flip.
- "adam": random-resized crop with area a ~ U(0.25, 1) rather than U(0.08, 1):
  8% of a 28 x 28 image is an 8 x 8 patch, too little of a garment to name it.
  The lighting noise keeps only the first ImageNet component (the achromatic
  one, V[:, 0] ~ -(1, 1, 1)/sqrt(3)) as a brightness shift; the two chromatic
  components would tint a gray image.

Randomness is stateless: every random transform takes a seed tensor [2] and is
a pure function of (image, seed), so a pipeline that draws the seeds from a
seeded stream is reproducible however many threads run the map.
"""
import math
from dataclasses import dataclass
from typing import Tuple

import tensorflow as tf

AUGMENTATIONS = ("none", "paper", "adam")

# Per-channel statistics on the [0, 1] scale (those of torchvision, which the authors use).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Fashion-MNIST's own, over the 60,000 training images (computed from the IDX files).
FASHION_MNIST_MEAN = (0.2860, 0.2860, 0.2860)
FASHION_MNIST_STD = (0.3530, 0.3530, 0.3530)

# PCA of ImageNet's RGB pixel covariance (Krizhevsky et al. 2012; the numbers of
# fb.resnet.torch, used by the authors' Lighting transform). Columns of EIGVEC are
# the principal components, EIGVAL their eigenvalues, on the [0, 1] scale.
IMAGENET_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_EIGVEC = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)
_GRAY = 1.0 / math.sqrt(3.0)

RESIZE_RATIO = 256 / 224  # shorter side before the crop, relative to the crop
LIGHTING_STD = 0.1
ASPECT_RANGE = (3 / 4, 4 / 3)


@dataclass(frozen=True)
class Profile:
    """What the transforms need to know about a dataset's images."""

    name: str
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    default_size: int
    small_images: bool  # the object fills a tiny frame: never crop it away (see module doc)
    min_area: float  # lower bound of the random-resized crop's area fraction
    eigval: Tuple[float, ...]
    eigvec: Tuple[Tuple[float, ...], ...]  # [3, len(eigval)]


IMAGENET = Profile(
    name="imagenet",
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    default_size=224,
    small_images=False,
    min_area=0.08,
    eigval=IMAGENET_EIGVAL,
    eigvec=IMAGENET_EIGVEC,
)
FASHION_MNIST = Profile(
    name="fashion_mnist",
    mean=FASHION_MNIST_MEAN,
    std=FASHION_MNIST_STD,
    default_size=32,
    small_images=True,
    min_area=0.25,
    eigval=IMAGENET_EIGVAL[:1],
    eigvec=((_GRAY,), (_GRAY,), (_GRAY,)),
)


def to_float_rgb(image):
    """uint8 [H, W, 1 or 3] -> float32 [H, W, 3] on [0, 1]; gray is tiled to RGB."""
    image = tf.image.convert_image_dtype(image, tf.float32)
    if image.shape[-1] == 1:
        image = tf.image.grayscale_to_rgb(image)
    return image


def resize_shorter_side(image, target):
    """Scale so that min(H, W) == target, keeping the aspect ratio (torchvision's Resize(int))."""
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = tf.cast(target, tf.float32) / tf.reduce_min(shape)
    new_shape = tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), target)
    return tf.image.resize(image, new_shape, method="bilinear", antialias=True)


def center_crop(image, size):
    """The central size x size window."""
    shape = tf.shape(image)
    top, left = (shape[0] - size) // 2, (shape[1] - size) // 2
    return image[top : top + size, left : left + size]


def random_resized_crop(image, size, seed, *, min_area, aspect_range=ASPECT_RANGE):
    """Random box of area fraction U(min_area, 1) and aspect U(aspect_range), resized to size x size."""
    begin, box_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image),
        bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        seed=seed,
        min_object_covered=0.0,
        aspect_ratio_range=aspect_range,
        area_range=(min_area, 1.0),
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    crop = tf.slice(image, begin, box_size)
    return tf.image.resize(crop, (size, size), method="bilinear", antialias=True)


def lighting(image, seed, *, eigval, eigvec, alpha_std=LIGHTING_STD):
    """AlexNet PCA noise: add V (alpha * lambda) to every pixel, alpha ~ N(0, alpha_std^2) per component."""
    eigval = tf.constant(eigval, tf.float32)
    alpha = tf.random.stateless_normal(eigval.shape, seed, stddev=alpha_std)
    shift = tf.linalg.matvec(tf.constant(eigvec, tf.float32), alpha * eigval)  # [3]
    return image + shift


def normalize(image, profile):
    """(x - mean) / std per channel."""
    return (image - tf.constant(profile.mean, tf.float32)) / tf.constant(profile.std, tf.float32)


def eval_transform(image, size, profile):
    """Deterministic: resize + centre crop (large images) or plain resize (small images)."""
    image = to_float_rgb(image)
    if profile.small_images:
        image = tf.image.resize(image, (size, size), method="bilinear", antialias=True)
    else:
        image = center_crop(resize_shorter_side(image, round(size * RESIZE_RATIO)), size)
    return normalize(image, profile)


def paper_transform(image, size, seed, profile):
    """ECCV training: resize (shorter side r*S) or pad (small images), random crop S, random flip."""
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    image = to_float_rgb(image)
    if profile.small_images:
        pad = round(size / 14)
        image = tf.image.resize(image, (size, size), method="bilinear", antialias=True)
        image = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
    else:
        image = resize_shorter_side(image, round(size * RESIZE_RATIO))
    image = tf.image.stateless_random_crop(image, (size, size, 3), seed=crop_seed)
    image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
    return normalize(image, profile)


def adam_transform(image, size, seed, profile):
    """The authors' PyTorch training: random-resized crop, random flip, PCA lighting noise."""
    crop_seed, flip_seed, light_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    image = random_resized_crop(to_float_rgb(image), size, crop_seed, min_area=profile.min_area)
    image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
    image = lighting(image, light_seed, eigval=profile.eigval, eigvec=profile.eigvec)
    return normalize(image, profile)


def preprocess(image, *, augmentation, size, profile, seed=None):
    """Dispatch on `augmentation`; returns float32 [size, size, 3]. `seed` [2] is needed unless "none"."""
    if augmentation == "none":
        out = eval_transform(image, size, profile)
    elif augmentation == "paper":
        out = paper_transform(image, size, seed, profile)
    elif augmentation == "adam":
        out = adam_transform(image, size, seed, profile)
    else:
        raise ValueError(f"augmentation must be one of {AUGMENTATIONS}, not {augmentation!r}")
    return tf.ensure_shape(out, (size, size, 3))
