"""The MLflow model signature of a logged CLIP model: what ``model(image, text)`` takes and returns.

The model is logged with the pytorch flavour (``mlflow.pytorch.load_model`` gives back the
open_clip module). Its forward takes a batch of preprocessed images (float32, N x 3 x H x W, the
checkpoint's val transform) and a batch of token ids (int64, N x context length, its tokenizer)
and returns L2-normalised ``image_features`` and ``text_features`` (float32, N x embed dim) and
``logit_scale`` (plus ``logit_bias`` for a SigLIP-style model). ``encode_image`` and
``encode_text`` give each tower's features alone. The signature is measured by one forward pass
on a batch of one, so it always matches the weights it is logged with.
"""

from __future__ import annotations

from typing import Any

OUTPUT_NAMES = ("image_features", "text_features", "logit_scale", "logit_bias")


def _image_hw(model: Any) -> tuple[int, int]:
    size = getattr(getattr(model, "visual", None), "image_size", None)
    if size is None:
        size = (getattr(model, "preprocess_cfg", None) or {}).get("size")
    if size is None:
        raise ValueError("the model has no visual.image_size: cannot tell what image size it takes")
    if isinstance(size, int):
        return size, size
    h, w = tuple(size)
    return int(h), int(w)


def _context_length(model: Any) -> int:
    n = getattr(model, "context_length", None) or getattr(getattr(model, "text", None), "context_length", None)
    if n is None:
        raise ValueError("the model has no context_length: cannot tell what text length it takes")
    return int(n)


def clip_signature(model: Any) -> Any:
    """The ``mlflow.models.ModelSignature`` of an open_clip model's ``forward(image, text)``."""
    import numpy as np
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    h, w = _image_hw(model)
    ctx = _context_length(model)
    device = next(model.parameters()).device
    image = torch.zeros(1, 3, h, w, device=device)
    text = torch.zeros(1, ctx, dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(image, text)
    finally:
        model.train(was_training)
    items = list(out.items()) if isinstance(out, dict) else list(zip(OUTPUT_NAMES, out))

    def spec(name: str, t: torch.Tensor, batch: bool) -> TensorSpec:
        arr = t.detach().float().cpu().numpy() if t.dtype == torch.bfloat16 else t.detach().cpu().numpy()
        shape = (-1, *arr.shape[1:]) if batch and arr.ndim else tuple(arr.shape)
        return TensorSpec(np.dtype(arr.dtype), shape, name)

    inputs = Schema([spec("image", image, True), spec("text", text, True)])
    outputs = Schema([spec(name, t, name.endswith("_features")) for name, t in items if torch.is_tensor(t)])
    return ModelSignature(inputs=inputs, outputs=outputs)
