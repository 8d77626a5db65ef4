//! Datasets of a run: the RL prompt sets by name (`prompts`) and SFT's local
//! image and mp4 folders (`image_folder`, `video_folder`). Loading never panics on a bad file: it is
//! skipped and counted, and the count is logged.

pub mod image_folder;
pub mod prompts;
pub mod video_folder;

use std::path::{Path, PathBuf};

use crate::{Result, SanaError};

/// The `"prompt"` of an SFT sample's `name.json` (None: unreadable, not JSON,
/// or without a string prompt).
fn sidecar_prompt(json: &Path) -> Option<String> {
    let text = std::fs::read_to_string(json).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.get("prompt")?.as_str().map(String::from)
}

/// One `name.json` + media pair of an SFT folder.
pub(crate) struct Pair {
    pub id: String,
    pub prompt: String,
    pub media: PathBuf,
}

/// How an SFT folder's media are found and named.
pub(crate) struct MediaKind<'a> {
    /// The media file of a `name.json`, if there is one.
    pub media_of: &'a dyn Fn(&Path) -> Option<PathBuf>,
    /// Extensions of media files that count as unpaired without a `name.json`.
    pub orphans: &'a [&'a str],
    /// For messages: "image", "mp4"; what an orphan is ("a clip"); the layout.
    pub noun: &'a str,
    pub orphan_noun: &'a str,
    pub layout: &'a str,
}

/// Cosmos-RL's local SFT folder: every `name.json` with a `"prompt"` beside its
/// media, sorted by name so every process sees the same order, and how many
/// were unpaired (a JSON without media or prompt, or an orphan media file),
/// each logged. No pair at all is an error naming the folder.
pub(crate) fn list_pairs(dir: &Path, kind: &MediaKind<'_>) -> Result<(Vec<Pair>, usize)> {
    let rd = std::fs::read_dir(dir).map_err(|e| SanaError::io(dir, e))?;
    let mut files: Vec<PathBuf> = rd.filter_map(|e| e.ok()).map(|e| e.path()).collect();
    files.sort();
    let has = |p: &Path, ext: &str| p.extension().is_some_and(|x| x == ext);
    let (mut pairs, mut unpaired) = (Vec::new(), 0usize);
    for m in files
        .iter()
        .filter(|p| kind.orphans.iter().any(|e| has(p, e)))
    {
        if !m.with_extension("json").exists() {
            unpaired += 1;
            tracing::warn!(file = %m.display(), "skipping {} without its name.json sidecar", kind.orphan_noun);
        }
    }
    for j in files.iter().filter(|p| has(p, "json")) {
        let media = (kind.media_of)(j);
        match (media, sidecar_prompt(j)) {
            (Some(media), Some(prompt)) => pairs.push(Pair {
                id: j
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .unwrap_or_default()
                    .to_string(),
                prompt,
                media,
            }),
            (media, prompt) => {
                unpaired += 1;
                tracing::warn!(
                    file = %j.display(),
                    media = media.is_some(),
                    prompt = prompt.is_some(),
                    "skipping an SFT sample without its {} or a prompt",
                    kind.noun
                );
            }
        }
    }
    if pairs.is_empty() {
        return Err(SanaError::input(
            "dataset.local_dir",
            format!(
                "{}: no samples (name.json with \"prompt\" beside {}); {unpaired} unpaired",
                dir.display(),
                kind.layout
            ),
        ));
    }
    Ok((pairs, unpaired))
}
