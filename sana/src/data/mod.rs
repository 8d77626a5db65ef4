//! Datasets of a run: the RL prompt sets by name (`prompts`) and SFT's local
//! image and mp4 folders (`image_folder`, `video_folder`). Loading never panics on a bad file: it is
//! skipped and counted, and the count is logged.

pub mod image_folder;
pub mod prompts;
pub mod video_folder;
