//! Datasets of a run: the RL prompt sets by name (`prompts`) and SFT's local
//! image and mp4 folders (`image_folder`, `video_folder`). Loading never panics on a bad file: it is
//! skipped and counted, and the count is logged.

pub mod image_folder;
pub mod prompts;
pub mod video_folder;

/// The `"prompt"` of an SFT sample's `name.json` (None: unreadable, not JSON,
/// or without a string prompt).
pub(crate) fn sidecar_prompt(json: &std::path::Path) -> Option<String> {
    let text = std::fs::read_to_string(json).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.get("prompt")?.as_str().map(String::from)
}
