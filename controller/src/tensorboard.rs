//! TensorBoard event files (`events.out.tfevents.*`) with scalar summaries, so
//! `tensorboard --logdir <run>` plots every metric of `metrics.jsonl`.
//! TFRecord framing: length, masked CRC-32C of the length, the `Event` proto,
//! masked CRC-32C of it.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use prost::Message;

#[derive(Clone, PartialEq, prost::Message)]
pub struct Event {
    #[prost(double, tag = "1")]
    pub wall_time: f64,
    #[prost(int64, tag = "2")]
    pub step: i64,
    #[prost(string, optional, tag = "3")]
    pub file_version: Option<String>,
    #[prost(message, optional, tag = "5")]
    pub summary: Option<Summary>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Summary {
    #[prost(message, repeated, tag = "1")]
    pub value: Vec<SummaryValue>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct SummaryValue {
    #[prost(string, tag = "1")]
    pub tag: String,
    #[prost(float, optional, tag = "2")]
    pub simple_value: Option<f32>,
}

fn masked_crc(data: &[u8]) -> u32 {
    let c = crc32c::crc32c(data);
    (c.rotate_right(15)).wrapping_add(0xa282_ead8)
}

pub struct EventWriter {
    file: File,
    pub path: PathBuf,
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl EventWriter {
    pub fn create(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let host = std::fs::read_to_string("/etc/hostname").unwrap_or_else(|_| "localhost".into());
        let path = dir.join(format!(
            "events.out.tfevents.{}.{}.{}",
            now() as u64,
            host.trim(),
            std::process::id()
        ));
        let mut w = Self {
            file: File::create(&path)?,
            path,
        };
        w.write(&Event {
            wall_time: now(),
            step: 0,
            file_version: Some("brain.Event:2".into()),
            summary: None,
        })?;
        Ok(w)
    }

    fn write(&mut self, e: &Event) -> std::io::Result<()> {
        let data = e.encode_to_vec();
        let len = (data.len() as u64).to_le_bytes();
        let mut rec = Vec::with_capacity(data.len() + 16);
        rec.extend_from_slice(&len);
        rec.extend_from_slice(&masked_crc(&len).to_le_bytes());
        rec.extend_from_slice(&data);
        rec.extend_from_slice(&masked_crc(&data).to_le_bytes());
        self.file.write_all(&rec)?;
        self.file.flush()
    }

    /// One event holding every finite number of `metrics` as a scalar.
    pub fn scalars(
        &mut self,
        step: u64,
        metrics: &serde_json::Map<String, serde_json::Value>,
    ) -> std::io::Result<()> {
        let value = metrics
            .iter()
            .filter(|(k, _)| *k != "step" && *k != "time")
            .filter_map(|(k, v)| v.as_f64().filter(|x| x.is_finite()).map(|x| (k, x)))
            .map(|(k, x)| SummaryValue {
                tag: if k.contains('/') {
                    k.clone()
                } else {
                    format!("train/{k}")
                },
                simple_value: Some(x as f32),
            })
            .collect();
        self.write(&Event {
            wall_time: now(),
            step: step as i64,
            file_version: None,
            summary: Some(Summary { value }),
        })
    }
}

/// Reads the events back (tests, and a check that a file is whole).
pub fn read_events(path: &Path) -> std::io::Result<Vec<Event>> {
    let bytes = std::fs::read(path)?;
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
    let (mut out, mut i) = (Vec::new(), 0usize);
    while i < bytes.len() {
        let len_b = bytes.get(i..i + 8).ok_or_else(|| bad("short length"))?;
        let len = u64::from_le_bytes(len_b.try_into().unwrap()) as usize;
        let crc = u32::from_le_bytes(bytes[i + 8..i + 12].try_into().unwrap());
        if crc != masked_crc(len_b) {
            return Err(bad("length CRC mismatch"));
        }
        let data = bytes
            .get(i + 12..i + 12 + len)
            .ok_or_else(|| bad("short record"))?;
        let dcrc = u32::from_le_bytes(
            bytes
                .get(i + 12 + len..i + 16 + len)
                .ok_or_else(|| bad("short CRC"))?
                .try_into()
                .unwrap(),
        );
        if dcrc != masked_crc(data) {
            return Err(bad("data CRC mismatch"));
        }
        out.push(Event::decode(data).map_err(|e| bad(&e.to_string()))?);
        i += 16 + len;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_is_castagnoli() {
        // The standard check value of CRC-32C.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn scalars_round_trip() {
        let d = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(d.path()).unwrap();
        let m: serde_json::Map<String, serde_json::Value> = serde_json::from_str(
            r#"{"step": 3, "loss": 0.5, "reward/jpeg": -0.03, "note": "x", "nan": null}"#,
        )
        .unwrap();
        w.scalars(3, &m).unwrap();
        let ev = read_events(&w.path).unwrap();
        assert_eq!(ev[0].file_version.as_deref(), Some("brain.Event:2"));
        let v = &ev[1].summary.as_ref().unwrap().value;
        let tags: Vec<&str> = v.iter().map(|x| x.tag.as_str()).collect();
        assert_eq!(tags, vec!["train/loss", "reward/jpeg"]);
        assert_eq!(ev[1].step, 3);
        assert_eq!(v[0].simple_value, Some(0.5));
    }
}
