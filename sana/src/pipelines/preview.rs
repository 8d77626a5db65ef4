//! A viewable picture of latents (before a VAE exists to decode them): the first
//! three channels, each min-max normalised, upscaled by nearest neighbour.

use std::path::Path;

use tch::{Kind, Tensor};

use crate::{Result, SanaError};

/// Writes `[C, H, W]` latents (C ≥ 1) as an RGB PNG, each latent cell `scale`×`scale` pixels.
pub fn write_latent_preview(latent: &Tensor, path: &Path, scale: usize) -> Result<()> {
    let size = latent.size();
    if size.len() != 3 {
        return Err(SanaError::input(
            "latent",
            format!("expected [C, H, W], got {size:?}"),
        ));
    }
    let (c, h, w) = (size[0], size[1] as usize, size[2] as usize);
    let chans: Vec<Tensor> = (0..3)
        .map(|i| latent.get(i.min(c - 1)).to_kind(Kind::Float))
        .collect();
    let norm: Vec<Vec<f32>> = chans
        .iter()
        .map(|t| {
            let (lo, hi) = (t.min().double_value(&[]), t.max().double_value(&[]));
            let t = (t - lo) / (hi - lo).max(1e-12);
            Vec::<f32>::try_from(t.flatten(0, -1)).expect("float tensor")
        })
        .collect();
    let (pw, ph) = (w * scale, h * scale);
    let mut pixels = vec![0u8; pw * ph * 3];
    for y in 0..ph {
        for x in 0..pw {
            let src = (y / scale) * w + x / scale;
            for ch in 0..3 {
                pixels[(y * pw + x) * 3 + ch] =
                    (norm[ch][src] * 255.0).round().clamp(0.0, 255.0) as u8;
            }
        }
    }
    let file = std::fs::File::create(path).map_err(|e| SanaError::io(path, e))?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), pw as u32, ph as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let io = |e: png::EncodingError| SanaError::io(path, std::io::Error::other(e));
    enc.write_header()
        .map_err(io)?
        .write_image_data(&pixels)
        .map_err(io)?;
    Ok(())
}
