//! `jpeg_incompressibility` and `jpeg_compressibility` (DDPO, Flow-GRPO): the
//! size of each image saved as JPEG at quality 95.
//!
//! The reference is PIL's `Image.save(buf, format="JPEG", quality=95)`, which
//! runs libjpeg-turbo with 4:2:0 chroma subsampling for RGB, grayscale for `L`,
//! baseline Huffman tables and the integer DCT. libjpeg-turbo (the `turbojpeg`
//! crate, built from its vendored source) with those settings writes the same
//! bytes; `tests/jpeg_matches_pil.rs` checks that against PIL.

use super::{Reward, RewardError, Scores};
use crate::body::{Enqueue, MediaType};
use serde_json::Value;
use std::cell::RefCell;
use turbojpeg::{Compressor, Image, PixelFormat, Subsamp};

/// Which of the two rewards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JpegKind {
    /// Size in kB (bytes / 1000).
    Incompressibility,
    /// `-size_kB / 500`.
    Compressibility,
}

impl JpegKind {
    pub fn name(self) -> &'static str {
        match self {
            JpegKind::Incompressibility => "jpeg_incompressibility",
            JpegKind::Compressibility => "jpeg_compressibility",
        }
    }

    /// The score for one image (or the mean size over a video's frames), from
    /// its JPEG size in kB, computed as the Python reference does.
    pub fn score_from_kb(self, size_kb: f64) -> f64 {
        match self {
            JpegKind::Incompressibility => size_kb,
            JpegKind::Compressibility => -size_kb / 500.0,
        }
    }
}

/// A configured JPEG reward; the name it answers to is the kind's name.
#[derive(Debug, Clone)]
pub struct JpegReward {
    kind: JpegKind,
}

impl JpegReward {
    pub fn new(kind: JpegKind) -> Self {
        JpegReward { kind }
    }
}

thread_local! {
    // A TurboJPEG handle is not Sync; one per compute thread avoids re-creating it per image.
    static COMPRESSOR: RefCell<Option<Compressor>> = const { RefCell::new(None) };
}

/// JPEG-encode one HWC uint8 image (1 or 3 channels) at quality 95 the way PIL
/// does, returning the encoded bytes.
pub fn encode_like_pil(
    pixels: &[u8],
    width: usize,
    height: usize,
    channels: usize,
) -> Result<Vec<u8>, RewardError> {
    let (format, subsamp) = match channels {
        3 => (PixelFormat::RGB, Subsamp::Sub2x2),
        1 => (PixelFormat::GRAY, Subsamp::Gray),
        c => {
            return Err(RewardError::Input(format!(
                "JPEG rewards take 1 or 3 channels, got {c}"
            )))
        }
    };
    if pixels.len() != width * height * channels {
        return Err(RewardError::Input(format!(
            "{} bytes for a {width}x{height}x{channels} image",
            pixels.len()
        )));
    }
    COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(Compressor::new().map_err(jpeg_err)?);
        }
        let c = slot.as_mut().expect("just set");
        c.set_quality(95).map_err(jpeg_err)?;
        c.set_subsamp(subsamp).map_err(jpeg_err)?;
        c.set_optimize(false).map_err(jpeg_err)?;
        c.set_progressive(false).map_err(jpeg_err)?;
        c.compress_to_vec(Image {
            pixels,
            width,
            pitch: width * channels,
            height,
            format,
        })
        .map_err(jpeg_err)
    })
}

fn jpeg_err(e: turbojpeg::Error) -> RewardError {
    RewardError::Compute(format!("libjpeg-turbo: {e}"))
}

/// The size in kB of each item: images `[B, H, W, C]` directly; videos
/// `[B, C, T, H, W]` as the mean over their frames.
pub fn item_sizes_kb(req: &Enqueue) -> Result<Vec<f64>, RewardError> {
    let s = &req.array.shape;
    let data = &req.array.data[..];
    match req.media_type {
        MediaType::Image => {
            let (b, h, w, c) = (s[0], s[1], s[2], s[3]);
            let n = h * w * c;
            (0..b)
                .map(|i| {
                    let bytes = encode_like_pil(&data[i * n..(i + 1) * n], w, h, c)?;
                    Ok(bytes.len() as f64 / 1000.0)
                })
                .collect()
        }
        MediaType::Video => {
            let (b, c, t, h, w) = (s[0], s[1], s[2], s[3], s[4]);
            let plane = h * w;
            let mut frame = vec![0u8; plane * c];
            let mut out = Vec::with_capacity(b);
            for i in 0..b {
                let mut total = 0.0;
                for f in 0..t {
                    // Planar CTHW to interleaved HWC for this frame.
                    for ch in 0..c {
                        let src = ((i * c + ch) * t + f) * plane;
                        for (p, &v) in data[src..src + plane].iter().enumerate() {
                            frame[p * c + ch] = v;
                        }
                    }
                    total += encode_like_pil(&frame, w, h, c)?.len() as f64 / 1000.0;
                }
                out.push(total / t as f64);
            }
            Ok(out)
        }
        MediaType::Latent => Err(RewardError::Input(
            "JPEG rewards score pixels; this service has no VAE to decode latents".into(),
        )),
    }
}

impl Reward for JpegReward {
    fn name(&self) -> &str {
        self.kind.name()
    }

    fn check(&self, req: &Enqueue) -> Result<(), String> {
        let s = &req.array.shape;
        let channels = match req.media_type {
            MediaType::Image => s[3],
            MediaType::Video => s[1],
            MediaType::Latent => {
                return Err(format!(
                    "{} scores images and videos; media_type \"latent\" needs a VAE this service does not have",
                    self.name()
                ))
            }
        };
        if channels != 1 && channels != 3 {
            return Err(format!(
                "{} takes 1 (grayscale) or 3 (RGB) channels, got {channels} in shape {s:?}",
                self.name()
            ));
        }
        Ok(())
    }

    fn score(&self, req: &Enqueue) -> Result<Scores, RewardError> {
        let scores: Vec<Value> = item_sizes_kb(req)?
            .into_iter()
            .map(|kb| Value::from(self.kind.score_from_kb(kb)))
            .collect();
        let mut out = Scores::new();
        out.insert(self.name().to_string(), Value::Array(scores));
        Ok(out)
    }
}
