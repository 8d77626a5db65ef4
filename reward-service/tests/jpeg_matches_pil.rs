//! Our JPEG encoder writes the very bytes PIL writes for quality 95 (what
//! Cosmos-RL's jpeg rewards measure), for RGB and grayscale, odd sizes included.

mod common;
use common::*;
use reward_service::npy::{encode, Dtype};
use reward_service::rewards::jpeg::encode_like_pil;

fn check(n: usize, h: usize, w: usize, c: usize, seed: u64) {
    let rgb = images(n, h, w, seed);
    let data: Vec<u8> = if c == 3 {
        rgb
    } else {
        rgb.chunks(3).map(|p| p[0]).collect()
    };
    let dir = tempfile::tempdir().unwrap();
    let npy = dir.path().join("images.npy");
    std::fs::write(&npy, encode(Dtype::U8, &[n, h, w, c], &data)).unwrap();
    let status = std::process::Command::new(python())
        .arg(repo_root().join("scripts/reward/pil_jpeg.py"))
        .arg(&npy)
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(status.success(), "pil_jpeg.py failed");
    let per = h * w * c;
    for i in 0..n {
        let pil = std::fs::read(dir.path().join(format!("{i}.jpg"))).unwrap();
        let ours = encode_like_pil(&data[i * per..(i + 1) * per], w, h, c).unwrap();
        assert_eq!(
            ours.len(),
            pil.len(),
            "image {i} ({h}x{w}x{c}): {} bytes vs PIL's {}",
            ours.len(),
            pil.len()
        );
        assert!(
            ours == pil,
            "image {i} ({h}x{w}x{c}): same size, different bytes"
        );
    }
}

#[test]
fn rgb_matches_pil_byte_for_byte() {
    check(3, 64, 96, 3, 1);
    // Odd sizes exercise the 4:2:0 edge handling.
    check(2, 37, 53, 3, 2);
}

#[test]
fn grayscale_matches_pil_byte_for_byte() {
    check(2, 45, 31, 1, 3);
}
