//! `sana write-demo-clips`: a small video SFT folder in Cosmos-RL's local
//! format (`<i>.json` with a prompt beside `<i>.mp4`), written through
//! ffmpeg-next: colour gradients sliding across the frame, with prompts naming
//! their colours and direction, so a video model has something to learn.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use tch::{Device, Kind, Tensor};

use crate::video_io::write_mp4;

#[derive(Args, Debug)]
pub struct DemoClipsArgs {
    /// Output folder (created).
    pub out: PathBuf,
    /// Number of clips.
    #[arg(long, default_value_t = 12)]
    pub n: usize,
    /// Frames per clip.
    #[arg(long, default_value_t = 16)]
    pub frames: i64,
    #[arg(long, default_value_t = 48)]
    pub height: i64,
    #[arg(long, default_value_t = 64)]
    pub width: i64,
    #[arg(long, default_value_t = 8)]
    pub fps: u32,
}

const COLOURS: [(&str, [f64; 3]); 6] = [
    ("red", [0.86, 0.16, 0.12]),
    ("green", [0.16, 0.70, 0.24]),
    ("blue", [0.12, 0.24, 0.82]),
    ("yellow", [0.90, 0.82, 0.16]),
    ("purple", [0.55, 0.20, 0.67]),
    ("white", [0.94, 0.94, 0.94]),
];

/// Clip `i`: `[T, 3, H, W]` in [0, 1] and its prompt.
pub fn demo_clip(i: usize, frames: i64, height: i64, width: i64) -> (Tensor, String) {
    let (a, ca) = COLOURS[i % COLOURS.len()];
    let (b, cb) = COLOURS[(i * 2 + 1) % COLOURS.len()];
    let right = i.is_multiple_of(2);
    let opts = (Kind::Float, Device::Cpu);
    let x = Tensor::arange(width, opts).view([1, 1, 1, width]) / width as f64;
    let t = Tensor::arange(frames, opts).view([frames, 1, 1, 1]) / frames as f64;
    let shift = if right { t } else { -t };
    // A triangle wave across the width, sliding with time.
    let phase = (x + shift * 0.5).remainder(1.0);
    let ramp = (phase * 2.0 - 1.0)
        .abs()
        .expand([frames, 1, height, width], false);
    let col = |c: [f64; 3]| {
        Tensor::from_slice(&c)
            .to_kind(Kind::Float)
            .view([1, 3, 1, 1])
    };
    let video = col(ca) * (-&ramp + 1.0) + col(cb) * &ramp;
    let dir = if right { "right" } else { "left" };
    (video, format!("{a} and {b} stripes sliding to the {dir}"))
}

pub fn run(a: DemoClipsArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    for i in 0..a.n {
        let (video, prompt) = demo_clip(i, a.frames, a.height, a.width);
        write_mp4(&video, &a.out.join(format!("{i}.mp4")), a.fps)?;
        let json = serde_json::json!({ "prompt": prompt });
        let p = a.out.join(format!("{i}.json"));
        std::fs::write(&p, json.to_string()).with_context(|| format!("writing {}", p.display()))?;
    }
    tracing::info!(clips = a.n, dir = %a.out.display(), "wrote demo clips");
    Ok(())
}
