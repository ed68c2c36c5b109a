"""Frozen vision encoders V_theta (REFERENCE §3): images -> patch tokens + one global (CLS) vector.

Every encoder has the same face:

    enc.feature_dim            # h_v
    enc.num_patches            # L_p at the configured image size
    patches, cls = enc(pixel_values)   # [N, L_p, h_v], [N, h_v]
    patches, cls = enc(features=(patches, cls))   # precomputed (the feature cache): checked, passed on

`pixel_values` is uint8 [N, 3, S, S] in 0-255 or float already in 0-1; each encoder applies its
own mean/std. Encoders are frozen for good: parameters never require grad, `train()` cannot take
them out of eval mode (BatchNorm statistics stay ImageNet's) and the forward runs under no_grad.

Implementations:
- `MobileNetV2Encoder`: ImageNet MobileNetV2 written in plain torch with torchvision's parameter
  names, so torchvision's `.pth` loads strictly without importing torchvision. The final
  1280-channel map (7 x 7 at 224) gives 49 patch tokens; its global average is the CLS vector.
- `HFVisionEncoder`: any transformers vision tower (CLIP, SigLIP, ViT); CLS is token 0 when the
  model prepends one, the patch mean otherwise.
- `TinyCNNEncoder`, `TinyViTEncoder`: random-init encoders (~15k parameters) for tests.
"""

from __future__ import annotations

import copy
import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class FrozenVisionEncoder(nn.Module):
    """Base class: input normalisation, freezing and the no-grad forward.

    Subclasses build their layers, call `self._finish_init()` last, and implement `encode`.
    """

    feature_dim: int
    num_patches: int

    def __init__(self, image_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.image_size = int(image_size)
        # Non-persistent: the state dict stays exactly the pretrained checkpoint's layout.
        self.register_buffer("pixel_mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def _finish_init(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "FrozenVisionEncoder":
        # A frozen encoder is always in eval mode: BatchNorm must keep its pretrained statistics
        # and dropout must stay off even while the rest of NoteLLM2 trains.
        return super().train(False)

    def encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised float pixels [N, 3, S, S] -> (patches [N, L_p, h_v], cls [N, h_v])."""
        raise NotImplementedError

    def preprocess(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """uint8 0-255 or float 0-1 [N, 3, H, W] -> normalised [N, 3, S, S] in the weights' dtype."""
        x = pixel_values
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        if x.shape[-2:] != (self.image_size, self.image_size):
            # Keeps num_patches true for callers that hand over a different size.
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True, align_corners=False)
        x = (x - self.pixel_mean) / self.pixel_std
        param = next(self.parameters(), None)
        return x if param is None else x.to(param.dtype)

    def forward(self, pixel_values: torch.Tensor | None = None, *,
                features: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Images -> (patches [N, L_p, h_v], cls [N, h_v]), both without grad.

        Args:
            pixel_values: images to encode.
            features: instead of images, this encoder's own outputs computed earlier
                (`core.data.features`): checked against its patch count and width, returned as they are.
        """
        if (pixel_values is None) == (features is None):
            raise ValueError("pass either pixel_values or features to the vision encoder")
        if features is not None:
            patches, cls = features
            if patches.shape[1:] != (self.num_patches, self.feature_dim) or cls.shape[1:] != (self.feature_dim,):
                raise ValueError(f"precomputed vision features {tuple(patches.shape)} / {tuple(cls.shape)} do not fit this "
                                 f"encoder ([N, {self.num_patches}, {self.feature_dim}] / [N, {self.feature_dim}]); "
                                 "rebuild the feature cache")
            return patches.detach(), cls.detach()
        with torch.no_grad():
            return self.encode(self.preprocess(pixel_values))


def _conv_bn_relu6(inp: int, out: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    # torchvision's Conv2dNormActivation is a Sequential: [0] conv, [1] BN, [2] ReLU6.
    return nn.Sequential(
        nn.Conv2d(inp, out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """MobileNetV2 block; the `conv` Sequential mirrors torchvision's indices."""

    def __init__(self, inp: int, out: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = inp * expand_ratio
        self.use_residual = stride == 1 and inp == out
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(_conv_bn_relu6(inp, hidden, kernel=1))
        layers += [
            _conv_bn_relu6(hidden, hidden, stride=stride, groups=hidden),  # depthwise
            nn.Conv2d(hidden, out, 1, 1, 0, bias=False),  # linear bottleneck
            nn.BatchNorm2d(out),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


# (expansion t, output channels c, repeats n, first stride s) of MobileNetV2 at width 1.0
_MOBILENET_V2_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


class MobileNetV2Encoder(FrozenVisionEncoder):
    """ImageNet MobileNetV2 features: 1280 channels on an S/32 grid (49 patches at 224)."""

    def __init__(self, image_size: int = 224, weights: str | None = None):
        """
        Args:
            image_size: side S of the input images.
            weights: torchvision-layout `.pth` state dict; None keeps the random init (tests).
        """
        super().__init__(image_size)
        layers: list[nn.Module] = [_conv_bn_relu6(3, 32, stride=2)]
        channels = 32
        for t, c, n, s in _MOBILENET_V2_SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(channels, c, s if i == 0 else 1, t))
                channels = c
        layers.append(_conv_bn_relu6(channels, 1280, kernel=1))
        self.features = nn.Sequential(*layers)
        self.feature_dim = 1280
        side = image_size
        for _ in range(5):  # five stride-2 convs with 'same' padding: ceil(side / 2) each
            side = math.ceil(side / 2)
        self.num_patches = side * side
        if weights is not None:
            self.load_torchvision_weights(weights)
        self._finish_init()

    def load_torchvision_weights(self, path) -> None:
        """Load torchvision's MobileNetV2 `.pth` strictly; its ImageNet classifier is not used."""
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
        self.load_state_dict(state, strict=True)

    def encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fmap = self._inference_features()(pixels.contiguous(memory_format=torch.channels_last))  # [N, 1280, S/32, S/32]
        patches = fmap.flatten(2).transpose(1, 2)  # [N, L_p, 1280]
        return patches, patches.mean(dim=1)  # CLS = global average pool, as the ImageNet head uses

    def _inference_features(self) -> nn.Module:
        """`self.features` with every BatchNorm folded into its conv, in channels-last layout.

        The encoder is frozen and always in eval mode, so BN is a fixed affine map: folding it
        and running channels-last measured 2-2.5x faster on CPU (52 BN passes were a third of
        the time). The folded copy lives outside the module tree (the state dict keeps the
        pretrained layout) and is rebuilt when the weights' device or dtype changes or new
        weights are loaded. Under ZeRO-3 the parameters are partitioned placeholders, so the
        plain modules run instead.
        """
        params = list(self.features.parameters())
        if any(hasattr(p, "ds_id") for p in params):
            return self.features
        key = (params[0].device, params[0].dtype)
        cached = self.__dict__.get("_folded")
        if cached is None or cached[0] != key:
            folded = copy.deepcopy(self.features)
            _fold_batchnorms(folded)
            self.__dict__["_folded"] = (key, folded.to(memory_format=torch.channels_last))
        return self.__dict__["_folded"][1]

    def _load_from_state_dict(self, *args, **kwargs):
        self.__dict__.pop("_folded", None)  # new weights: fold again on the next forward
        super()._load_from_state_dict(*args, **kwargs)


def _fold_batchnorms(module: nn.Module) -> None:
    """Replace each (Conv2d, BatchNorm2d) pair inside Sequentials by one eval-mode fused conv."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    for child in module.children():
        _fold_batchnorms(child)
    if isinstance(module, nn.Sequential):
        items = list(module)
        for i in range(len(items) - 1):
            if isinstance(items[i], nn.Conv2d) and isinstance(items[i + 1], nn.BatchNorm2d):
                module[i] = fuse_conv_bn_eval(items[i].eval(), items[i + 1].eval())
                module[i + 1] = nn.Identity()


class HFVisionEncoder(FrozenVisionEncoder):
    """A transformers vision tower: last_hidden_state -> CLS + patch tokens.

    CLIP and ViT prepend a class token (CLS = token 0, patches = the rest); SigLIP has none
    (CLS = mean of the patches, patches = all tokens). Which case holds is read off one dummy
    forward at construction, which also fixes `num_patches`.
    """

    def __init__(self, model: nn.Module, image_size: int, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)):
        """
        Args:
            model: a transformers vision model; a dual-encoder's `.vision_model` is taken when present.
            image_size: side S the model expects.
            mean, std: the checkpoint's image normalisation (its image processor's values).
        """
        super().__init__(image_size, mean, std)
        self.model = getattr(model, "vision_model", model)
        config = getattr(self.model, "config", None)
        self.feature_dim = int(config.hidden_size)
        patch = getattr(config, "patch_size", None)
        grid = (image_size // patch) ** 2 if patch else None
        self._finish_init()
        with torch.no_grad():
            probe = self.model(pixel_values=torch.zeros(1, 3, image_size, image_size, dtype=next(self.parameters()).dtype))
        tokens = probe.last_hidden_state.shape[1]
        # A token count of exactly the patch grid means no class token (SigLIP-style).
        self.has_cls_token = not (grid is not None and tokens == grid)
        self.num_patches = tokens - 1 if self.has_cls_token else tokens

    @classmethod
    def from_pretrained(cls, path: str, image_size: int) -> "HFVisionEncoder":
        """Load `path` with AutoModel; mean/std come from its image processor when it has one."""
        from transformers import AutoImageProcessor, AutoModel

        model = AutoModel.from_pretrained(path)
        mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
        try:
            proc = AutoImageProcessor.from_pretrained(path)
            mean, std = tuple(proc.image_mean), tuple(proc.image_std)
        except (OSError, ValueError, AttributeError, TypeError):
            log.warning("%s has no image processor config; normalising with mean=std=0.5", path)
        return cls(model, image_size, mean, std)

    def encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.model(pixel_values=pixels).last_hidden_state  # [N, tokens, h_v]
        if self.has_cls_token:
            return hidden[:, 1:], hidden[:, 0]
        return hidden, hidden.mean(dim=1)


class TinyCNNEncoder(FrozenVisionEncoder):
    """Random-init 3-conv CNN (tests): S/8 grid of 32-d patches, CLS = their mean."""

    def __init__(self, image_size: int = 32, dim: int = 32):
        super().__init__(image_size)
        self.net = nn.Sequential(
            nn.Conv2d(3, 16, 3, 2, 1), nn.GELU(),
            nn.Conv2d(16, dim, 3, 2, 1), nn.GELU(),
            nn.Conv2d(dim, dim, 3, 2, 1),
        )
        self.feature_dim = dim
        self.num_patches = math.ceil(math.ceil(math.ceil(image_size / 2) / 2) / 2) ** 2
        self._finish_init()

    def encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        patches = self.net(pixels).flatten(2).transpose(1, 2)  # [N, L_p, dim]
        return patches, patches.mean(dim=1)


class TinyViTEncoder(FrozenVisionEncoder):
    """Random-init one-layer ViT (tests): 8x8 patches + a class token, CLS = token 0."""

    def __init__(self, image_size: int = 32, dim: int = 32, patch: int = 8, heads: int = 2):
        super().__init__(image_size)
        if image_size % patch:
            raise ValueError(f"tiny-vit needs image_size divisible by {patch}, got {image_size}")
        self.num_patches = (image_size // patch) ** 2
        self.feature_dim = dim
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, self.num_patches + 1, dim) * 0.02)
        self.block = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.norm = nn.LayerNorm(dim)
        self._finish_init()

    def encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.patch_embed(pixels).flatten(2).transpose(1, 2)  # [N, L_p, dim]
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed  # [N, 1 + L_p, dim]
        x = self.norm(self.block(x))
        return x[:, 1:], x[:, 0]
