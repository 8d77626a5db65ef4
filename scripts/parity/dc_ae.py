#!/usr/bin/env python3
"""DC-AE (`AutoencoderDC`) parity references for sana/src/models/autoencoders (Rust), from diffusers itself.

Usage: dc_ae.py OUT_DIR   (make_reference.py calls write_dc_ae_cases(OUT_DIR))

Layout written, one folder per case:
  OUT_DIR/dc_ae_<case>/model/                config.json + diffusion_pytorch_model.safetensors (fp32)
  OUT_DIR/dc_ae_<case>/inputs.safetensors    image [2, 3, H, W] in [-1, 1] and latents [2, C, h, w] (fp32)
  OUT_DIR/dc_ae_<case>/outputs.safetensors   latent = encode(image).latent, sample = decode(latents).sample
                                             (in the case's dtype; inputs are cast to it first)
  OUT_DIR/dc_ae_<case>/case.json             dtype, and the `enable_tiling` arguments of tiled cases
  OUT_DIR/dc_ae_sana_layout/                 config.json of the full-size SANA DC-AE and keys.json
                                             ({state-dict key: {shape, dtype}}, built on the meta device)

The tiny configs keep the options of the published checkpoints with shapes shrunk:
  sana  SANA's dc-ae-f32c32-sana-1.0/-1.1: ResBlock stages then EfficientViT stages, "Conv" downsampling,
        "interpolate" upsampling, RMSNorm + SiLU decoder, multiscale qkv (one stage with two kernels). The
        image is small enough that the deepest EfficientViT stage takes the quadratic-attention branch
        (H*W <= attention_head_dim) while the one above takes the linear branch.
  mix   the dc-ae-*-in/mix-1.0 family: no layers in stage 0 (conv_in / conv_out become DC down/up blocks),
        pixel_unshuffle / pixel_shuffle, BatchNorm + ReLU in the decoder's early stages, no multiscale qkv.
  plain shortcuts off, other activations (gelu, mish, none) and a BatchNorm EfficientViT attention.
  tiled the `sana` layout with `enable_tiling` at tile sizes small enough to need several overlapping tiles;
        the encoder input is not a multiple of the tile stride, so the last tiles are padded.
  bf16  the `sana` layout in bfloat16.
"""

import json
import pathlib
import sys

import torch
from safetensors.torch import save_file

from diffusers import AutoencoderDC

SANA = dict(
    in_channels=3,
    latent_channels=4,
    attention_head_dim=8,
    encoder_block_types=["ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock"],
    decoder_block_types=["ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock"],
    encoder_block_out_channels=[8, 16, 16, 32],
    decoder_block_out_channels=[8, 16, 16, 32],
    encoder_layers_per_block=[1, 2, 1, 2],
    decoder_layers_per_block=[2, 1, 2, 1],
    encoder_qkv_multiscales=[[], [], [5], [3, 5]],
    decoder_qkv_multiscales=[[], [], [5], [3, 5]],
    downsample_block_type="Conv",
    upsample_block_type="interpolate",
    decoder_norm_types="rms_norm",
    decoder_act_fns="silu",
    scaling_factor=0.41407,
)

MIX = dict(
    in_channels=3,
    latent_channels=8,
    attention_head_dim=4,
    encoder_block_types=["ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock"],
    decoder_block_types=["ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock"],
    encoder_block_out_channels=[8, 16, 16, 32],
    decoder_block_out_channels=[8, 16, 16, 32],
    encoder_layers_per_block=[0, 2, 1, 1],
    decoder_layers_per_block=[0, 2, 1, 2],
    encoder_qkv_multiscales=[[], [], [], []],
    decoder_qkv_multiscales=[[], [], [], []],
    downsample_block_type="pixel_unshuffle",
    upsample_block_type="pixel_shuffle",
    decoder_norm_types=["batch_norm", "batch_norm", "rms_norm", "rms_norm"],
    decoder_act_fns=["relu", "relu", "silu", "silu"],
    scaling_factor=0.3189,
)

PLAIN = dict(
    in_channels=3,
    latent_channels=4,
    attention_head_dim=4,
    encoder_block_types="ResBlock",
    decoder_block_types=["ResBlock", "ResBlock", "EfficientViTBlock"],
    encoder_block_out_channels=[8, 16, 16],
    decoder_block_out_channels=[8, 8, 16],
    encoder_layers_per_block=[1, 1, 1],
    decoder_layers_per_block=[1, 2, 1],
    encoder_qkv_multiscales=[[], [], []],
    decoder_qkv_multiscales=[[], [], [3]],
    downsample_block_type="pixel_unshuffle",
    upsample_block_type="interpolate",
    decoder_norm_types=["rms_norm", "batch_norm", "batch_norm"],
    decoder_act_fns=["gelu", None, "mish"],
    encoder_out_shortcut=False,
    decoder_in_shortcut=False,
    decoder_conv_act_fn="silu",
    scaling_factor=1.0,
)

# name -> config, image (H, W), tiling kwargs, dtype
CASES = {
    "sana": dict(config=SANA, image=(16, 24)),
    "mix": dict(config=MIX, image=(24, 16)),
    "plain": dict(config=PLAIN, image=(12, 20)),
    "tiled": dict(
        config=dict(SANA, encoder_block_out_channels=[8, 16, 32], decoder_block_out_channels=[8, 16, 32],
                    encoder_block_types=["ResBlock", "EfficientViTBlock", "EfficientViTBlock"],
                    decoder_block_types=["ResBlock", "EfficientViTBlock", "EfficientViTBlock"],
                    encoder_layers_per_block=[1, 1, 2], decoder_layers_per_block=[1, 2, 1],
                    encoder_qkv_multiscales=[[], [5], [3]], decoder_qkv_multiscales=[[], [5], [3]]),
        # 26 is no multiple of the compression ratio 4: only the tiled encoder (which pads) accepts it.
        image=(26, 40),
        latents=(6, 10),
        tiling=dict(tile_sample_min_height=16, tile_sample_min_width=16,
                    tile_sample_stride_height=12, tile_sample_stride_width=8),
    ),
    "bf16": dict(config=SANA, image=(32, 16), dtype=torch.bfloat16),
}


def randomize_(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Default init leaves norms at 1/0 and batch-norm statistics at 0/1; perturb every parameter and
    buffer so that a mis-wired or unloaded tensor changes the output."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=gen) * 0.2)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=gen) + 0.5)
            elif name.endswith("num_batches_tracked"):
                b.fill_(7)


def write_dc_ae_case(out: pathlib.Path, name: str, case: dict, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = AutoencoderDC(**case["config"]).eval()
    randomize_(model, gen)
    d = out / f"dc_ae_{name}"
    model.save_pretrained(d / "model", safe_serialization=True)
    dtype = case.get("dtype", torch.float32)
    if dtype != torch.float32:
        model = model.to(dtype)
    tiling = case.get("tiling")
    if tiling:
        model.enable_tiling(**tiling)

    cfg = model.config
    r = model.spatial_compression_ratio
    h, w = case["image"]
    image = torch.rand(2, cfg.in_channels, h, w, generator=gen) * 2 - 1
    lh, lw = case.get("latents", (h // r, w // r))
    latents = torch.randn(2, cfg.latent_channels, lh, lw, generator=gen)
    with torch.no_grad():
        latent = model.encode(image.to(dtype)).latent
        sample = model.decode(latents.to(dtype)).sample
    save_file({"image": image.contiguous(), "latents": latents.contiguous()}, str(d / "inputs.safetensors"))
    save_file({"latent": latent.contiguous(), "sample": sample.contiguous()}, str(d / "outputs.safetensors"))
    meta = {"dtype": str(dtype).replace("torch.", "")}
    if tiling:
        meta["tiling"] = tiling
    (d / "case.json").write_text(json.dumps(meta))


# The published dc-ae-f32c32-sana-1.0-diffusers config (1.1 shares it; only its decoder weights differ).
SANA_FULL = dict(
    SANA,
    latent_channels=32,
    attention_head_dim=32,
    encoder_block_types=["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
    decoder_block_types=["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
    encoder_block_out_channels=[128, 256, 512, 512, 1024, 1024],
    decoder_block_out_channels=[128, 256, 512, 512, 1024, 1024],
    encoder_layers_per_block=[2, 2, 2, 3, 3, 3],
    decoder_layers_per_block=[3, 3, 3, 3, 3, 3],
    encoder_qkv_multiscales=[[], [], [], [5], [5], [5]],
    decoder_qkv_multiscales=[[], [], [], [5], [5], [5]],
)


def write_dc_ae_layout(out: pathlib.Path) -> None:
    """The full-size SANA DC-AE's config.json and every state-dict key with its shape and dtype, built on
    the meta device (no weights), so the Rust model's names and shapes can be checked at full size."""
    d = out / "dc_ae_sana_layout"
    with torch.device("meta"):
        model = AutoencoderDC(**SANA_FULL)
    model.save_config(d)
    keys = {k: dict(shape=list(v.shape), dtype=str(v.dtype).replace("torch.", ""))
            for k, v in model.state_dict().items()}
    (d / "keys.json").write_text(json.dumps(keys, indent=0, sort_keys=True))


def write_dc_ae_cases(out_dir: pathlib.Path) -> None:
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for i, (name, case) in enumerate(CASES.items()):
        write_dc_ae_case(out_dir, name, case, seed=4000 + i)
        print(f"dc_ae_{name}: ok")
    write_dc_ae_layout(out_dir)
    print("dc_ae_sana_layout: ok")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    torch.set_num_threads(1)
    write_dc_ae_cases(pathlib.Path(sys.argv[1]))
