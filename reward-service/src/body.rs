//! The `/api/reward/enqueue` body: UTF-8 JSON metadata, one `\n`, a `.npy`.
//!
//! [`parse_enqueue`] checks everything that does not depend on the service's
//! configuration (which rewards are enabled is the server's business), so that
//! a malformed request is refused with a message at enqueue time instead of
//! failing later where no client would see it.

use crate::npy::{self, Dtype, NpyArray, NpyError};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// What the array holds, from the metadata's `media_type` (default `video`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MediaType {
    /// uint8 `[B, H, W, C]`.
    Image,
    /// uint8 `[B, C, T, H, W]`.
    Video,
    /// float16/bfloat16/float32 `[B, C, T, H, W]` VAE latents.
    Latent,
}

impl MediaType {
    pub fn as_str(self) -> &'static str {
        match self {
            MediaType::Image => "image",
            MediaType::Video => "video",
            MediaType::Latent => "latent",
        }
    }
}

/// The metadata line, as Cosmos-RL's clients write it.
#[derive(Debug, Clone, Deserialize)]
struct RawMetadata {
    prompts: Vec<String>,
    reward_fn: Map<String, Value>,
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    video_infos: Option<Vec<Value>>,
    /// Reward-specific extras (`ocr_use_gpu`, `geneval_tags`, ...), passed on.
    #[serde(flatten)]
    extras: Map<String, Value>,
}

/// A parsed, self-consistent enqueue request.
#[derive(Debug, Clone)]
pub struct Enqueue {
    pub prompts: Vec<String>,
    /// The rewards to compute: every `reward_fn` entry with weight > 0, in the
    /// client's order. The weights themselves are the client's to apply.
    pub rewards: Vec<String>,
    pub media_type: MediaType,
    pub video_infos: Option<Vec<Value>>,
    pub extras: Map<String, Value>,
    pub array: NpyArray,
}

impl Enqueue {
    /// Items in the batch (the array's first axis).
    pub fn batch(&self) -> usize {
        self.array.shape[0]
    }
}

/// Why an enqueue body was refused (all answered 400 with this text).
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("body has no '\\n' separating the JSON metadata from the .npy data")]
    NoSeparator,
    #[error("metadata is not valid JSON for this protocol: {0}")]
    BadJson(String),
    #[error(transparent)]
    Npy(#[from] NpyError),
    #[error("reward_fn[{name:?}] must be a number, got {value}")]
    BadWeight { name: String, value: String },
    #[error("reward_fn names no reward with weight > 0")]
    NoReward,
    #[error("media_type {0:?} is not one of image, video, latent")]
    BadMediaType(String),
    #[error("{media} batch must be {expected}, got {dtype} with shape {shape:?}")]
    BadArray {
        media: &'static str,
        expected: &'static str,
        dtype: Dtype,
        shape: Vec<usize>,
    },
    #[error("shape {shape:?} has an empty axis")]
    EmptyAxis { shape: Vec<usize> },
    #[error("{prompts} prompts for a batch of {batch} items: need one prompt per item")]
    PromptCount { prompts: usize, batch: usize },
    #[error("{infos} video_infos for a batch of {batch} items: need one per item")]
    VideoInfoCount { infos: usize, batch: usize },
}

/// Parse and check an enqueue body. Never panics, whatever the bytes.
pub fn parse_enqueue(body: Bytes) -> Result<Enqueue, BodyError> {
    // json.dumps escapes newlines inside strings, so the first one is the separator.
    let sep = body
        .iter()
        .position(|&b| b == b'\n')
        .ok_or(BodyError::NoSeparator)?;
    let meta: RawMetadata =
        serde_json::from_slice(&body[..sep]).map_err(|e| BodyError::BadJson(e.to_string()))?;
    let array = npy::parse(body.slice(sep + 1..))?;

    let mut rewards = Vec::new();
    for (name, w) in &meta.reward_fn {
        let w = w.as_f64().ok_or_else(|| BodyError::BadWeight {
            name: name.clone(),
            value: w.to_string(),
        })?;
        if w > 0.0 {
            rewards.push(name.clone());
        }
    }
    if rewards.is_empty() {
        return Err(BodyError::NoReward);
    }

    let media_type = match meta.media_type.as_deref().map(str::to_ascii_lowercase) {
        None => MediaType::Video,
        Some(m) if m == "image" => MediaType::Image,
        Some(m) if m == "video" => MediaType::Video,
        Some(m) if m == "latent" => MediaType::Latent,
        Some(m) => return Err(BodyError::BadMediaType(m)),
    };
    let (ok, expected) = match media_type {
        MediaType::Image => (
            array.dtype == Dtype::U8 && array.shape.len() == 4,
            "uint8 [B, H, W, C]",
        ),
        MediaType::Video => (
            array.dtype == Dtype::U8 && array.shape.len() == 5,
            "uint8 [B, C, T, H, W]",
        ),
        MediaType::Latent => (
            array.dtype != Dtype::U8 && array.shape.len() == 5,
            "float16/bfloat16/float32 [B, C, T, H, W]",
        ),
    };
    if !ok {
        return Err(BodyError::BadArray {
            media: media_type.as_str(),
            expected,
            dtype: array.dtype,
            shape: array.shape.clone(),
        });
    }
    if array.shape.contains(&0) {
        return Err(BodyError::EmptyAxis {
            shape: array.shape.clone(),
        });
    }
    let batch = array.shape[0];
    if meta.prompts.len() != batch {
        return Err(BodyError::PromptCount {
            prompts: meta.prompts.len(),
            batch,
        });
    }
    if let Some(infos) = &meta.video_infos {
        if infos.len() != batch {
            return Err(BodyError::VideoInfoCount {
                infos: infos.len(),
                batch,
            });
        }
    }
    Ok(Enqueue {
        prompts: meta.prompts,
        rewards,
        media_type,
        video_infos: meta.video_infos,
        extras: meta.extras,
        array,
    })
}

/// Build an enqueue body the way Cosmos-RL's clients do
/// (`json.dumps(data).encode() + b"\n" + np.save(...)`).
pub fn encode_enqueue(metadata: &Value, dtype: Dtype, shape: &[usize], data: &[u8]) -> Vec<u8> {
    let mut out = serde_json::to_vec(metadata).expect("a serde_json::Value always serializes");
    out.push(b'\n');
    npy::write_header(&mut out, dtype, shape);
    out.extend_from_slice(data);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn body(meta: Value, dtype: Dtype, shape: &[usize]) -> Bytes {
        let n: usize = shape.iter().product::<usize>() * dtype.itemsize();
        Bytes::from(encode_enqueue(&meta, dtype, shape, &vec![7u8; n]))
    }

    #[test]
    fn parses_an_image_batch() {
        let b = body(
            json!({"prompts": ["a", "b"], "reward_fn": {"jpeg_compressibility": 1.0, "x": 0},
                   "media_type": "image", "ocr_use_gpu": false}),
            Dtype::U8,
            &[2, 8, 8, 3],
        );
        let e = parse_enqueue(b).unwrap();
        assert_eq!(e.rewards, vec!["jpeg_compressibility"]);
        assert_eq!(e.media_type, MediaType::Image);
        assert_eq!(e.batch(), 2);
        assert_eq!(e.extras["ocr_use_gpu"], json!(false));
    }

    #[test]
    fn media_type_defaults_to_video() {
        let b = body(
            json!({"prompts": ["a"], "reward_fn": {"r": 1}}),
            Dtype::U8,
            &[1, 3, 2, 4, 4],
        );
        assert_eq!(parse_enqueue(b).unwrap().media_type, MediaType::Video);
    }

    #[test]
    fn refuses_inconsistent_requests() {
        let cases: Vec<(Bytes, &str)> = vec![
            (
                body(
                    json!({"prompts": ["a"], "reward_fn": {"r": 1}, "media_type": "image"}),
                    Dtype::U8,
                    &[2, 4, 4, 3],
                ),
                "1 prompts for a batch of 2",
            ),
            (
                body(
                    json!({"prompts": ["a"], "reward_fn": {"r": 1}, "media_type": "image"}),
                    Dtype::F32,
                    &[1, 4, 4, 3],
                ),
                "image batch must be uint8",
            ),
            (
                body(
                    json!({"prompts": ["a"], "reward_fn": {"r": 0}, "media_type": "image"}),
                    Dtype::U8,
                    &[1, 4, 4, 3],
                ),
                "no reward with weight > 0",
            ),
            (
                body(
                    json!({"prompts": ["a"], "reward_fn": {"r": "1"}}),
                    Dtype::U8,
                    &[1, 3, 1, 4, 4],
                ),
                "must be a number",
            ),
            (
                body(
                    json!({"prompts": ["a"], "reward_fn": {"r": 1}, "media_type": "audio"}),
                    Dtype::U8,
                    &[1, 3, 1, 4, 4],
                ),
                "not one of image",
            ),
            (Bytes::from_static(b"{\"prompts\": [}\n"), "not valid JSON"),
            (Bytes::from_static(b"{}"), "no '\\n'"),
        ];
        for (b, want) in cases {
            let err = parse_enqueue(b).unwrap_err().to_string();
            assert!(err.contains(want), "{err:?} should mention {want:?}");
        }
    }
}
