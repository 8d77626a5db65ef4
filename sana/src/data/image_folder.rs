//! SFT's local folder format, as Cosmos-RL's `LocalDiffusersDataset` reads it:
//! `name.json` (an object with `"prompt"`) beside `name.jpg` (or `.jpeg`,
//! `.png`), paired by file stem. Images are preprocessed as Cosmos-RL does:
//! short side resized to the training height (bilinear, antialiased), center
//! crop to a square, scaled to [-1, 1]. A sample that cannot be read, and an
//! image without its `name.json`, is skipped and counted (and named in the
//! log), never a crash mid-epoch.

use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};

use crate::{Result, SanaError};

#[derive(Debug, Clone, PartialEq)]
pub struct SftSample {
    pub id: String,
    pub prompt: String,
    pub image: PathBuf,
}

#[derive(Debug, Clone)]
pub struct ImageFolder {
    pub dir: PathBuf,
    pub samples: Vec<SftSample>,
    /// JSON files without an image or a readable `"prompt"`, and images without a JSON.
    pub unpaired: usize,
}

const IMAGE_EXTENSIONS: [&str; 6] = ["jpg", "jpeg", "png", "JPG", "JPEG", "PNG"];

impl ImageFolder {
    /// Lists the pairs (sorted by name, so every process sees the same order).
    pub fn open(dir: &Path) -> Result<Self> {
        let media_of = |j: &Path| {
            IMAGE_EXTENSIONS
                .iter()
                .map(|e| j.with_extension(e))
                .find(|p| p.exists())
        };
        let kind = super::MediaKind {
            media_of: &media_of,
            orphans: &IMAGE_EXTENSIONS,
            noun: "image",
            orphan_noun: "an image",
            layout: "name.jpg/.png",
        };
        let (pairs, unpaired) = super::list_pairs(dir, &kind)?;
        let samples = pairs
            .into_iter()
            .map(|p| SftSample {
                id: p.id,
                prompt: p.prompt,
                image: p.media,
            })
            .collect();
        Ok(Self {
            dir: dir.to_path_buf(),
            samples,
            unpaired,
        })
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }
}

/// Decodes and preprocesses one image to `[3, size, size]` in [-1, 1].
pub fn load_image(path: &Path, size: i64) -> Result<Tensor> {
    let img = image::open(path)
        .map_err(|e| SanaError::input("image", format!("{}: {e}", path.display())))?
        .to_rgb8();
    let (w, h) = (img.width() as i64, img.height() as i64);
    let t = Tensor::from_slice(img.as_raw())
        .view([h, w, 3])
        .permute([2, 0, 1])
        .to_kind(Kind::Float)
        .unsqueeze(0)
        / 255.0;
    // torchvision Resize(size): the short side becomes `size`, the long side int(size * long / short).
    let (nh, nw) = if h <= w {
        (size, (size as f64 * w as f64 / h as f64) as i64)
    } else {
        ((size as f64 * h as f64 / w as f64) as i64, size)
    };
    let resized = t.internal_upsample_bilinear2d_aa([nh, nw], false, None, None);
    // CenterCrop(size): torchvision rounds the offsets.
    let top = ((nh - size) as f64 / 2.0).round() as i64;
    let left = ((nw - size) as f64 / 2.0).round() as i64;
    let crop = resized
        .narrow(2, top, size)
        .narrow(3, left, size)
        .squeeze_dim(0);
    Ok((crop.clamp(0.0, 1.0) - 0.5) / 0.5)
}

/// Loads the samples at `indices`, skipping unreadable ones: the batch
/// `[N, 3, size, size]`, their prompts, and how many were skipped.
pub fn load_batch(
    folder: &ImageFolder,
    indices: &[usize],
    size: i64,
) -> (Option<Tensor>, Vec<String>, usize) {
    let (mut images, mut prompts, mut skipped) = (Vec::new(), Vec::new(), 0usize);
    for &i in indices {
        let Some(s) = folder.samples.get(i) else {
            skipped += 1;
            continue;
        };
        match load_image(&s.image, size) {
            Ok(t) => {
                images.push(t);
                prompts.push(s.prompt.clone());
            }
            Err(e) => {
                skipped += 1;
                tracing::warn!("skipping an unreadable SFT image: {e}");
            }
        }
    }
    let batch = (!images.is_empty()).then(|| Tensor::stack(&images, 0).to_device(Device::Cpu));
    (batch, prompts, skipped)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_rgb(path: &Path, w: u32, h: u32) {
        let img =
            image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 7) as u8, (y * 5) as u8, 128]));
        img.save(path).unwrap();
    }

    #[test]
    fn pairs_by_stem_and_skips_what_it_cannot_read() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        write_rgb(&p.join("a.png"), 40, 20);
        std::fs::write(p.join("a.json"), r#"{"prompt": "a gradient"}"#).unwrap();
        write_rgb(&p.join("b.jpg"), 20, 30);
        std::fs::write(p.join("b.json"), r#"{"prompt": "tall"}"#).unwrap();
        std::fs::write(p.join("c.json"), r#"{"prompt": "no image"}"#).unwrap();
        std::fs::write(p.join("d.png"), b"not a png").unwrap();
        std::fs::write(p.join("d.json"), r#"{"prompt": "corrupt"}"#).unwrap();
        write_rgb(&p.join("e.jpg"), 8, 8); // no sidecar
        write_rgb(&p.join("f.PNG"), 8, 8); // no sidecar
        let f = ImageFolder::open(p).unwrap();
        assert_eq!(
            (f.len(), f.unpaired),
            (3, 3),
            "c.json, e.jpg and f.PNG are unpaired"
        );
        let (batch, prompts, skipped) = load_batch(&f, &[0, 1, 2, 9], 16);
        let batch = batch.unwrap();
        assert_eq!(batch.size(), vec![2, 3, 16, 16]);
        assert_eq!(prompts, vec!["a gradient", "tall"]);
        assert_eq!(skipped, 2, "the corrupt image and the index past the end");
        assert!(f.samples.iter().all(|s| s.id != "e" && s.id != "f"));
        let (lo, hi) = (batch.min().double_value(&[]), batch.max().double_value(&[]));
        assert!(lo >= -1.0 && hi <= 1.0 && hi > lo);
    }
}
