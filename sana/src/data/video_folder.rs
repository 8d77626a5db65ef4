//! Video SFT's local folder format, as Cosmos-RL's `LocalDiffusersDataset`
//! reads it with `is_video`: `name.json` (an object with `"prompt"`) beside
//! `name.mp4`, paired by file stem. A clip gives `train_frames` consecutive
//! frames from a random start, each resized to exactly the training
//! height × width (bilinear, antialiased; Cosmos-RL does not keep the aspect
//! ratio) and scaled to [-1, 1]. Clips that are missing their sidecar, damaged
//! or too short are skipped and counted (Cosmos-RL raises on a short clip).

use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};

use crate::video_io::{read_mp4, ClipInfo};
use crate::{Result, SanaError};

#[derive(Debug, Clone, PartialEq)]
pub struct VideoSample {
    pub id: String,
    pub prompt: String,
    pub video: PathBuf,
}

#[derive(Debug, Clone)]
pub struct VideoFolder {
    pub dir: PathBuf,
    pub samples: Vec<VideoSample>,
    /// JSON files without an mp4 or a readable `"prompt"`, and mp4s without a JSON.
    pub unpaired: usize,
}

impl VideoFolder {
    /// Lists the pairs, sorted by name so every process sees the same order.
    pub fn open(dir: &Path) -> Result<Self> {
        let media_of = |j: &Path| Some(j.with_extension("mp4")).filter(|p| p.exists());
        let kind = super::MediaKind {
            media_of: &media_of,
            orphans: &["mp4"],
            noun: "mp4",
            orphan_noun: "a clip",
            layout: "name.mp4",
        };
        let (pairs, unpaired) = super::list_pairs(dir, &kind)?;
        let samples = pairs
            .into_iter()
            .map(|p| VideoSample {
                id: p.id,
                prompt: p.prompt,
                video: p.media,
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

/// How to cut and size the clips of one batch.
#[derive(Debug, Clone, Copy)]
pub struct ClipSpec {
    pub frames: usize,
    pub height: i64,
    pub width: i64,
    /// Seeds each clip's start frame (with the sample index), so a resumed run
    /// cuts the same windows.
    pub seed: u64,
    /// Clips decoded at once (each with one FFmpeg thread).
    pub threads: usize,
}

fn start_frame(seed: u64, index: usize, range: usize) -> usize {
    // SplitMix64 of (seed, index).
    let mut z = seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((z ^ (z >> 31)) % range as u64) as usize
}

/// One clip → `[3, frames, height, width]` in [-1, 1], and the container's facts.
pub fn load_clip(path: &Path, index: usize, spec: &ClipSpec) -> Result<(Tensor, ClipInfo)> {
    let too_short = |have: i64| SanaError::Media {
        path: path.to_path_buf(),
        msg: format!("{have} frames, fewer than train_frames = {}", spec.frames),
    };
    let window = |n: usize| {
        let range = n - spec.frames;
        if range > 0 {
            start_frame(spec.seed, index, range)
        } else {
            0
        }
    };
    let total = read_mp4(path, 0, Some(0), 1)?.info.frames;
    if total > 0 && (total as usize) < spec.frames {
        return Err(too_short(total));
    }
    // Cut the window from the container's count when it gives one; when the
    // frames then fall short (edit lists, a damaged tail), or it gives none,
    // decode them all and cut from what decodes.
    let windowed = if total > 0 {
        let start = window(total as usize);
        Some(read_mp4(path, start, Some(spec.frames), 1)?)
            .filter(|c| c.frames.size()[0] as usize == spec.frames)
    } else {
        None
    };
    let clip = match windowed {
        Some(c) => c,
        None => {
            let all = read_mp4(path, 0, None, 1)?;
            let n = all.frames.size()[0] as usize;
            if n < spec.frames {
                return Err(too_short(n as i64));
            }
            crate::video_io::Clip {
                frames: all.frames.narrow(0, window(n) as i64, spec.frames as i64),
                info: all.info,
            }
        }
    };
    // Frame by frame: the whole window in fp32 at source size could be GBs.
    let frames: Vec<Tensor> = (0..spec.frames as i64)
        .map(|k| {
            let x = clip
                .frames
                .get(k)
                .permute([2, 0, 1])
                .unsqueeze(0)
                .to_kind(Kind::Float)
                / 255.0;
            x.f_internal_upsample_bilinear2d_aa([spec.height, spec.width], false, None, None)
                .map(|x| x.squeeze_dim(0))
        })
        .collect::<std::result::Result<_, _>>()?;
    let x = (Tensor::stack(&frames, 1).clamp(0.0, 1.0) - 0.5) / 0.5;
    Ok((x, clip.info))
}

/// Loads the clips at `indices` on up to `spec.threads` threads, skipping the
/// unreadable and the too short: `[N, 3, T, H, W]`, their prompts, and how many
/// were skipped.
pub fn load_video_batch(
    folder: &VideoFolder,
    indices: &[usize],
    spec: &ClipSpec,
) -> (Option<Tensor>, Vec<String>, usize) {
    let threads = spec.threads.clamp(1, indices.len().max(1));
    let load = |i: usize| -> Option<Tensor> {
        let s = folder.samples.get(i)?;
        // A libtorch failure (say, out of memory) panics in tch: one clip is
        // skipped, never the batch or the worker.
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            load_clip(&s.video, i, spec)
        }));
        match r {
            Ok(Ok((t, _))) => Some(t),
            Ok(Err(e)) => {
                tracing::warn!("skipping an SFT clip: {e}");
                None
            }
            Err(_) => {
                tracing::warn!(file = %s.video.display(), "skipping an SFT clip: decoding it panicked");
                None
            }
        }
    };
    // Results by position in `indices`, whatever thread made them.
    let mut results: Vec<Option<Tensor>> = (0..indices.len()).map(|_| None).collect();
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|k| {
                let load = &load;
                scope.spawn(move || {
                    indices
                        .iter()
                        .enumerate()
                        .filter(|(pos, _)| pos % threads == k)
                        .map(|(pos, &i)| (pos, load(i)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for h in handles {
            for (pos, t) in h.join().unwrap_or_default() {
                results[pos] = t;
            }
        }
    });
    let (mut clips, mut prompts, mut skipped) = (Vec::new(), Vec::new(), 0usize);
    for (&i, r) in indices.iter().zip(results) {
        match r {
            Some(t) => {
                clips.push(t);
                prompts.push(folder.samples[i].prompt.clone());
            }
            None => skipped += 1,
        }
    }
    let batch = (!clips.is_empty()).then(|| Tensor::stack(&clips, 0).to_device(Device::Cpu));
    (batch, prompts, skipped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::video_io::write_mp4;

    fn ramp(t: i64, h: i64, w: i64) -> Tensor {
        // Frame k is a flat grey of level k/t: the frame index survives H.264.
        let lv = Tensor::arange(t, (Kind::Float, Device::Cpu)) / t as f64;
        lv.view([t, 1, 1, 1])
            .expand([t, 3, h, w], false)
            .contiguous()
    }

    #[test]
    fn pairs_cuts_windows_and_skips_what_it_cannot_use() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        write_mp4(&ramp(12, 32, 48), &p.join("a.mp4"), 8).unwrap();
        std::fs::write(p.join("a.json"), r#"{"prompt": "a ramp"}"#).unwrap();
        write_mp4(&ramp(5, 32, 48), &p.join("b.mp4"), 8).unwrap(); // shorter than 9 frames
        std::fs::write(p.join("b.json"), r#"{"prompt": "short"}"#).unwrap();
        std::fs::write(p.join("c.mp4"), b"\x00\x00\x00\x18ftypmp42 corrupt").unwrap();
        std::fs::write(p.join("c.json"), r#"{"prompt": "corrupt"}"#).unwrap();
        write_mp4(&ramp(9, 32, 48), &p.join("d.mp4"), 8).unwrap(); // no sidecar
        std::fs::write(p.join("e.json"), r#"{"prompt": "no clip"}"#).unwrap();
        write_mp4(&ramp(9, 16, 16), &p.join("f.mp4"), 8).unwrap();
        std::fs::write(p.join("f.json"), r#"{"prompt": "exactly 9"}"#).unwrap();
        let f = VideoFolder::open(p).unwrap();
        assert_eq!(
            (f.len(), f.unpaired),
            (4, 2),
            "d.mp4 and e.json are unpaired"
        );
        let spec = ClipSpec {
            frames: 9,
            height: 16,
            width: 24,
            seed: 7,
            threads: 2,
        };
        let (batch, prompts, skipped) = load_video_batch(&f, &[0, 1, 2, 3, 11], &spec);
        let batch = batch.unwrap();
        assert_eq!(batch.size(), [2, 3, 9, 16, 24]);
        assert_eq!(prompts, ["a ramp", "exactly 9"]);
        assert_eq!(
            skipped, 3,
            "the short clip, the corrupt one and the index past the end"
        );

        // The window is consecutive frames from a start in [0, 12 - 9): the grey
        // levels step by 1/12 per frame.
        let levels = (batch.get(0).mean_dim([0, 2, 3].as_slice(), false, None) + 1.0) / 2.0;
        let l: Vec<f64> = Vec::try_from(levels).unwrap();
        let start = (l[0] * 12.0).round() as usize;
        assert!(start < 3, "start {start}");
        for (k, v) in l.iter().enumerate() {
            assert!(
                (v - (start + k) as f64 / 12.0).abs() < 0.02,
                "frame {k}: {v}"
            );
        }
        // Same seed, same window; the cut depends on the seed.
        let (again, _, _) = load_video_batch(&f, &[0], &spec);
        assert!(again.unwrap().get(0).equal(&batch.get(0)));
        let starts: std::collections::HashSet<usize> =
            (0..20).map(|s| start_frame(s, 0, 3)).collect();
        assert_eq!(starts.len(), 3);
    }

    #[test]
    fn an_empty_folder_is_an_error_naming_it() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("x.json"), r#"{"prompt": "p"}"#).unwrap();
        let e = VideoFolder::open(d.path()).unwrap_err().to_string();
        assert!(e.contains("no samples") && e.contains("1 unpaired"), "{e}");
    }
}
