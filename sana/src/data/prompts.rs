//! The RL prompt sets as Cosmos-RL names them: `pickscore`, `ocr` and
//! `dance_grpo_t2v` (text, one prompt per line) and `geneval` (JSONL whose
//! `tag` / `include` travel to the reward request as `geneval_tags` /
//! `geneval_includes`). From a local file or directory; the epoch order is a
//! seeded shuffle, so a cursor `(epoch, index)` is all a resume needs.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::{Result, SanaError};

/// One prompt and the extras its reward needs.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptItem {
    pub text: String,
    /// Merged into the reward request's metadata (empty for text sets).
    pub metadata: Map<String, Value>,
}

/// Known sets: name → file inside a dataset directory, and its format.
const KNOWN: &[(&str, &str, &str)] = &[
    ("pickscore", "{split}.txt", "text"),
    ("ocr", "{split}.txt", "text"),
    ("geneval", "{split}_metadata.jsonl", "geneval"),
    ("dance_grpo_t2v", "video_prompts.txt", "text"),
];

/// The names [`PromptDataset::load`] knows.
pub fn known_names() -> Vec<&'static str> {
    KNOWN.iter().map(|k| k.0).collect()
}

#[derive(Debug, Clone)]
pub struct PromptDataset {
    pub name: String,
    pub source: PathBuf,
    pub items: Vec<PromptItem>,
    /// Lines that could not be read (bad JSON, no prompt), skipped.
    pub skipped: usize,
}

impl PromptDataset {
    /// `path` is a prompt file, or a directory holding the set's file
    /// (`<split>.txt`, `<split>_metadata.jsonl`, `video_prompts.txt`).
    pub fn load(name: &str, split: &str, path: &Path) -> Result<Self> {
        let Some(&(_, pattern, format)) = KNOWN.iter().find(|k| k.0 == name) else {
            return Err(SanaError::input(
                "dataset.name",
                format!(
                    "{name:?} is not a known prompt set: {}",
                    known_names().join(", ")
                ),
            ));
        };
        let file = if path.is_dir() {
            path.join(pattern.replace("{split}", split))
        } else {
            path.to_path_buf()
        };
        let text = std::fs::read_to_string(&file).map_err(|e| SanaError::io(&file, e))?;
        let (mut items, mut skipped) = (Vec::new(), 0usize);
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            if format == "text" && file.extension().is_none_or(|e| e != "jsonl") {
                items.push(PromptItem {
                    text: line.to_string(),
                    metadata: Map::new(),
                });
                continue;
            }
            match parse_jsonl_line(line) {
                Ok(item) => items.push(item),
                Err(why) => {
                    skipped += 1;
                    tracing::warn!(file = %file.display(), line = i + 1, "skipping a prompt: {why}");
                }
            }
        }
        if items.is_empty() {
            return Err(SanaError::input(
                "dataset",
                format!("{}: no prompts in it", file.display()),
            ));
        }
        if skipped > 0 {
            tracing::warn!(file = %file.display(), skipped, kept = items.len(), "prompt lines skipped");
        }
        Ok(Self {
            name: name.into(),
            source: file,
            items,
            skipped,
        })
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The epoch's order (see [`epoch_order`]).
    pub fn epoch_order(&self, seed: u64, epoch: u64) -> Vec<usize> {
        epoch_order(self.items.len(), seed, epoch)
    }
}

/// An epoch's order of `n` items: a Fisher–Yates shuffle seeded by `(seed, epoch)`
/// (SplitMix64), the same on every machine and every resume.
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut state = seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut next = || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    for i in (1..order.len()).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
}

/// A JSONL line: `prompt` (required); geneval's `tag` and `include` become
/// `geneval_tags` / `geneval_includes`; other keys are kept as they are.
fn parse_jsonl_line(line: &str) -> std::result::Result<PromptItem, String> {
    let v: Value = serde_json::from_str(line).map_err(|e| format!("bad JSON: {e}"))?;
    let Value::Object(mut obj) = v else {
        return Err("not a JSON object".into());
    };
    let text = match obj.remove("prompt") {
        Some(Value::String(s)) if !s.trim().is_empty() => s,
        _ => return Err("no \"prompt\" string".into()),
    };
    let mut metadata = Map::new();
    for (k, v) in obj {
        let key = match k.as_str() {
            "tag" => "geneval_tags".to_string(),
            "include" => "geneval_includes".to_string(),
            _ => k,
        };
        metadata.insert(key, v);
    }
    Ok(PromptItem { text, metadata })
}

/// Where a stepping run is in its prompts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Cursor {
    pub epoch: u64,
    /// Next position in the epoch's order.
    pub index: usize,
}

impl Cursor {
    /// The next `n` prompts (wrapping into the next epoch), advancing the cursor.
    pub fn take(&mut self, data: &PromptDataset, seed: u64, n: usize) -> Vec<(usize, PromptItem)> {
        let mut out = Vec::with_capacity(n);
        let mut order = data.epoch_order(seed, self.epoch);
        while out.len() < n {
            if self.index >= order.len() {
                self.epoch += 1;
                self.index = 0;
                order = data.epoch_order(seed, self.epoch);
            }
            let i = order[self.index];
            out.push((i, data.items[i].clone()));
            self.index += 1;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_and_geneval_sets_load_with_bad_lines_counted() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("test.txt"), "a cat\n\n  a dog  \n").unwrap();
        let d = PromptDataset::load("pickscore", "test", dir.path()).unwrap();
        assert_eq!(d.items.len(), 2);
        assert_eq!(d.items[1].text, "a dog");

        let jl = dir.path().join("test_metadata.jsonl");
        std::fs::write(
            &jl,
            "{\"tag\": \"counting\", \"include\": [{\"class\": \"cup\", \"count\": 2}], \"prompt\": \"two cups\"}\n\
             not json\n{\"tag\": \"x\"}\n",
        )
        .unwrap();
        let g = PromptDataset::load("geneval", "test", dir.path()).unwrap();
        assert_eq!((g.items.len(), g.skipped), (1, 2));
        assert_eq!(g.items[0].metadata["geneval_tags"], "counting");
        assert_eq!(g.items[0].metadata["geneval_includes"][0]["count"], 2);

        let err = PromptDataset::load("laion", "test", dir.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("pickscore, ocr, geneval"), "{err}");
    }

    #[test]
    fn the_cursor_walks_seeded_epochs_and_resumes() {
        let dir = tempfile::tempdir().unwrap();
        let lines: String = (0..10).map(|i| format!("p{i}\n")).collect();
        std::fs::write(dir.path().join("train.txt"), lines).unwrap();
        let d = PromptDataset::load("ocr", "train", dir.path()).unwrap();
        let mut c = Cursor::default();
        let first: Vec<usize> = c.take(&d, 42, 7).into_iter().map(|x| x.0).collect();
        let mut saved = c;
        let rest: Vec<usize> = c.take(&d, 42, 6).into_iter().map(|x| x.0).collect();
        assert_eq!(c.epoch, 1, "wrapped into the next epoch");
        let again: Vec<usize> = saved.take(&d, 42, 6).into_iter().map(|x| x.0).collect();
        assert_eq!(rest, again, "a restored cursor continues identically");
        let mut seen = first.clone();
        seen.extend(&rest[..3]);
        seen.sort();
        assert_eq!(
            seen,
            (0..10).collect::<Vec<_>>(),
            "an epoch visits every prompt once"
        );
        assert_ne!(d.epoch_order(42, 0), d.epoch_order(42, 1));
    }
}
