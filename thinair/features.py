"""Pluggable feature extractors for the distribution metrics: uint8 images (N, H, W, C), C = 1 or 3, in;
float32 features (N, D) out.

* ``domain``: a classifier trained on the real data (``thinair.classifier``), its penultimate features.
* ``inception``: clean-fid's "clean" mode (PIL bicubic resize to 299 x 299 in float, Inception-v3
  torchscript, 2048-d). Reads clean-fid's weights file from the fixed path clean-fid caches it at
  (``inception_weights_path()``), downloading it there first when it is absent and the network allows.
* ``clip``: ``image_embeds`` of a local Hugging Face CLIP directory (never downloaded).

``check_available`` fails fast, before any heavy work, with ``FeaturesUnavailable`` naming the fix.
Writes nothing except clean-fid's weights file when a download succeeds.
"""
from __future__ import annotations

import json
import os
import platform
import threading
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from thinair.errors import FeaturesUnavailable  # noqa: F401 - raised here; defined in thinair/errors.py

KINDS = ("domain", "inception", "clip")
INCEPTION_FILE = "inception-2015-12-05.pt"
Extractor = Callable[[np.ndarray], np.ndarray]  # uint8 (N, H, W, C) -> float32 (N, D)


def _rgb(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, C) with C in (1, 3) -> (N, H, W, 3); grayscale is replicated like PIL's convert("RGB")."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"expected images (N, H, W, C) with C = 1 or 3, got shape {images.shape}")
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


# ---------------------------------------------------------------- inception (clean-fid)

def inception_url() -> str:
    from cleanfid.downloads_helper import inception_url as url

    return url


def inception_weights_path() -> Path:
    """Where clean-fid loads (and downloads) its Inception weights: a fixed folder, not configurable.

    ``cleanfid.features.feature_extractor`` uses "/tmp" ("./" on Windows) + ``inception-2015-12-05.pt``.
    """
    return Path("./" if platform.system() == "Windows" else "/tmp") / INCEPTION_FILE


def _download(url: str, dest: Path, opened: threading.Event, errors: list, timeout: float) -> None:
    """Stream `url` to `dest` via a temporary name (never a truncated file where clean-fid would load it)."""
    part = dest.with_name(f"{dest.name}.part{os.getpid()}")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            opened.set()
            with open(part, "wb") as f:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
        os.replace(part, dest)
    except Exception as err:  # noqa: BLE001 - any failure means "unavailable"; reported to the caller
        errors.append(err)
        part.unlink(missing_ok=True)
    finally:
        opened.set()


def _ensure_inception(download: bool, timeout: float) -> Path:
    path, url = inception_weights_path(), inception_url()
    if path.is_file():
        return path
    fix = f"place {INCEPTION_FILE} from {url} at {path}"
    if not download:
        raise FeaturesUnavailable(f"clean-fid's Inception weights are missing and downloading is off: {fix}")
    opened, errors = threading.Event(), []
    worker = threading.Thread(target=_download, args=(url, path, opened, errors, timeout), daemon=True)
    worker.start()
    if not opened.wait(timeout):  # DNS + connect + headers; a daemon thread cannot block the exit
        raise FeaturesUnavailable(f"clean-fid's Inception weights are missing and {url} did not answer within "
                                  f"{timeout:.0f} s (offline?): {fix}")
    worker.join()
    if errors or not path.is_file():
        raise FeaturesUnavailable(f"clean-fid's Inception weights are missing and could not be downloaded "
                                  f"({errors[0] if errors else 'no file written'}): {fix}")
    return path


def inception_extractor(device: str = "cpu", batch_size: int = 64) -> Extractor:
    """clean-fid "clean" mode features (N, 2048), as ``cleanfid.fid.get_folder_features`` computes them.

    Per image: grayscale -> RGB, ``make_resizer("PIL", False, "bicubic", (299, 299))`` (float32 in [0, 255],
    per channel), then clean-fid's torchscript Inception (it normalises (x - 128) / 128 itself).
    """
    check_available("inception")
    from cleanfid.features import build_feature_extractor
    from cleanfid.resize import make_resizer

    model = build_feature_extractor("clean", torch.device(device), use_dataparallel=False)
    resize = make_resizer("PIL", False, "bicubic", (299, 299))

    @torch.no_grad()
    def extract(images: np.ndarray) -> np.ndarray:
        images, out = _rgb(images), []
        for s in range(0, len(images), batch_size):
            batch = np.stack([resize(im) for im in images[s:s + batch_size]])  # (B, 299, 299, 3) float32
            out.append(model(torch.from_numpy(batch).permute(0, 3, 1, 2).to(device)).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 2048), np.float32)

    return extract


# ---------------------------------------------------------------- CLIP (local Hugging Face directory)

def _check_clip(path) -> Path:
    if path is None:
        raise FeaturesUnavailable("features 'clip' needs a local CLIP model directory (clip_model); e.g. "
                                  "`hf download openai/clip-vit-base-patch32 --local-dir <dir>` on a machine with "
                                  "network, then point clip_model at <dir>")
    path = Path(path)
    if not path.is_dir():
        raise FeaturesUnavailable(f"CLIP model directory {path} does not exist: download a CLIP checkpoint there "
                                  f"(e.g. `hf download openai/clip-vit-base-patch32 --local-dir {path}`)")
    missing = [n for n in ("config.json", "preprocessor_config.json") if not (path / n).is_file()]
    if missing:
        raise FeaturesUnavailable(f"{path} is not a Hugging Face CLIP directory: {', '.join(missing)} missing")
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type not in ("clip", "clip_vision_model"):
        raise FeaturesUnavailable(f"{path} holds a {model_type!r} model, not CLIP (model_type 'clip' or "
                                  "'clip_vision_model')")
    return path


def clip_extractor(path, device: str = "cpu", batch_size: int = 64) -> Extractor:
    """CLIP ``image_embeds`` (N, projection_dim) from a local directory; its own image processor resizes."""
    path = _check_clip(path)
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    model = CLIPVisionModelWithProjection.from_pretrained(path, local_files_only=True).to(device).eval()
    processor = CLIPImageProcessor.from_pretrained(path, local_files_only=True)

    @torch.no_grad()
    def extract(images: np.ndarray) -> np.ndarray:
        images, out = _rgb(images), []
        for s in range(0, len(images), batch_size):
            pixels = processor(images=list(images[s:s + batch_size]), input_data_format="channels_last",
                               return_tensors="pt")["pixel_values"]  # (B, 3, crop, crop)
            out.append(model(pixel_values=pixels.to(device, model.dtype)).image_embeds.float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, model.config.projection_dim), np.float32)

    return extract


# ---------------------------------------------------------------- domain classifier

def domain_extractor(net: torch.nn.Module, batch_size: int = 512) -> Extractor:
    """``net.features`` (N, D) on images normalised by ``thinair.classifier.to_tensor``, on net's device."""
    from thinair import classifier

    if not callable(getattr(net, "features", None)):
        raise TypeError(f"domain features need a module with a .features(x) method, got {type(net).__name__}")

    def extract(images: np.ndarray) -> np.ndarray:
        device = next(net.parameters()).device
        return classifier.features(net, classifier.to_tensor(images), batch=batch_size, device=device)

    return extract


# ---------------------------------------------------------------- dispatch

def check_available(kind: str, clip_model=None, *, download: bool | None = None, timeout: float = 10.0) -> None:
    """Raise FeaturesUnavailable now if `kind` cannot be built here; cheap unless a download is needed.

    inception: the weights file present = available; absent = one download attempt into clean-fid's path
    (`download` defaults to env THINAIR_INCEPTION_DOWNLOAD != "0"; `timeout` bounds connecting and each read).
    clip: `clip_model` is a CLIP directory. domain: always available (the net is trained by the caller).
    """
    if kind == "inception":
        if download is None:
            download = os.environ.get("THINAIR_INCEPTION_DOWNLOAD", "1") != "0"
        _ensure_inception(download, timeout)
    elif kind == "clip":
        _check_clip(clip_model)
    elif kind != "domain":
        raise ValueError(f"unknown feature kind {kind!r}; choose one of {', '.join(KINDS)}")


def build(kind: str, *, device: str = "cpu", clip_model=None, domain_net: torch.nn.Module | None = None) -> Extractor:
    """The extractor for `kind` (one of KINDS): a callable uint8 (N, H, W, C) -> float32 (N, D)."""
    check_available(kind, clip_model)
    if kind == "domain":
        if domain_net is None:
            raise ValueError("features 'domain' needs domain_net (a classifier with a .features method)")
        return domain_extractor(domain_net)
    if kind == "inception":
        return inception_extractor(device)
    return clip_extractor(clip_model, device)
