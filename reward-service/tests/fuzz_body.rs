//! Fuzz-style test of the enqueue body parser (stable Rust has no cargo-fuzz):
//! a seeded mutation loop over valid bodies, bounded in iterations and time.
//! Every input must give a typed error or a self-consistent parse, never a
//! panic. `FUZZ_ITERS` and `FUZZ_SECS` raise the bounds for a longer run, and
//! `FUZZ_SEED` picks another seed.

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use reward_service::body::{encode_enqueue, parse_enqueue, MediaType};
use reward_service::npy::Dtype;
use serde_json::json;
use std::time::{Duration, Instant};

fn seeds() -> Vec<Vec<u8>> {
    let meta = |media: &str, n: usize| {
        json!({"prompts": (0..n).map(|i| format!("p{i}")).collect::<Vec<_>>(),
               "reward_fn": {"jpeg_compressibility": 1.0, "other": 0.5},
               "media_type": media, "video_infos": (0..n).map(|_| json!({"video_fps": 16.0})).collect::<Vec<_>>()})
    };
    let mk = |media: &str, dtype: Dtype, shape: &[usize]| {
        let n: usize = shape.iter().product::<usize>() * dtype.itemsize();
        encode_enqueue(&meta(media, shape[0]), dtype, shape, &vec![3u8; n])
    };
    let mut v = vec![
        mk("image", Dtype::U8, &[2, 4, 4, 3]),
        mk("video", Dtype::U8, &[1, 3, 2, 4, 4]),
        mk("latent", Dtype::F16, &[1, 4, 2, 2, 2]),
        mk("latent", Dtype::Bf16AsU16, &[2, 2, 1, 2, 2]),
        mk("latent", Dtype::F32, &[1, 1, 1, 1, 3]),
    ];
    // A format 2.0 header.
    let mut v2 = v[0].clone();
    let at = v2.iter().position(|&b| b == b'\n').unwrap() + 1;
    v2[at + 6] = 2;
    let hl = u16::from_le_bytes([v2[at + 8], v2[at + 9]]) as u32;
    v2.splice(at + 8..at + 10, hl.to_le_bytes());
    v.push(v2);
    v
}

const TOKENS: &[&[u8]] = &[
    b"\n",
    b"{",
    b"}",
    b"(",
    b")",
    b",",
    b"'",
    b"\"",
    b"True",
    b"False",
    b"'shape'",
    b"'descr'",
    b"<f8",
    b"|u1",
    b"<u2",
    b"99999999999999999999",
    b"0",
    b"-1",
    b"\x93NUMPY",
    b"\x00",
    b"\xff",
    b"\"media_type\": \"latent\"",
    b"\"prompts\": []",
    b"null",
];

fn mutate(rng: &mut StdRng, input: &[u8], pool: &[Vec<u8>]) -> Vec<u8> {
    let mut b = input.to_vec();
    for _ in 0..rng.random_range(1..=4) {
        let len = b.len().max(1);
        match rng.random_range(0..7) {
            0 => {
                let i = rng.random_range(0..len);
                if i < b.len() {
                    b[i] ^= 1 << rng.random_range(0..8);
                }
            }
            1 => b.truncate(rng.random_range(0..len)),
            2 => {
                let i = rng.random_range(0..=b.len());
                let t = TOKENS[rng.random_range(0..TOKENS.len())];
                b.splice(i..i, t.iter().copied());
            }
            3 => {
                // Overwrite inside the first 200 bytes, where the headers are.
                let i = rng.random_range(0..len.min(200));
                let t = TOKENS[rng.random_range(0..TOKENS.len())];
                for (k, &c) in t.iter().enumerate() {
                    if i + k < b.len() {
                        b[i + k] = c;
                    }
                }
            }
            4 => {
                if b.len() > 1 {
                    let i = rng.random_range(0..b.len());
                    let j = rng.random_range(i..b.len());
                    b.drain(i..j.min(i + 16));
                }
            }
            5 => {
                // Splice in part of another seed.
                let o = &pool[rng.random_range(0..pool.len())];
                let i = rng.random_range(0..o.len());
                let j = rng.random_range(i..o.len());
                let at = rng.random_range(0..=b.len());
                b.splice(at..at, o[i..j].iter().copied());
            }
            _ => {
                let i = rng.random_range(0..len);
                if i < b.len() {
                    b[i] = rng.random();
                }
            }
        }
    }
    b
}

#[test]
fn body_parser_survives_mutated_inputs() {
    let iters: u64 = std::env::var("FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let secs: u64 = std::env::var("FUZZ_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let seed: u64 = std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5a4a);
    let pool = seeds();
    for s in &pool {
        parse_enqueue(Bytes::from(s.clone())).expect("every seed is valid");
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let start = Instant::now();
    let (mut ok, mut err, mut n) = (0u64, 0u64, 0u64);
    let mut corpus = pool.clone();
    while n < iters && start.elapsed() < Duration::from_secs(secs) {
        let base = &corpus[rng.random_range(0..corpus.len())];
        let input = mutate(&mut rng, base, &pool);
        n += 1;
        match parse_enqueue(Bytes::from(input.clone())) {
            Ok(e) => {
                ok += 1;
                let want: usize =
                    e.array.shape.iter().product::<usize>() * e.array.dtype.itemsize();
                assert_eq!(
                    e.array.data.len(),
                    want,
                    "data length vs shape for {input:?}"
                );
                assert_eq!(e.prompts.len(), e.array.shape[0]);
                assert!(!e.rewards.is_empty());
                let ndim = if e.media_type == MediaType::Image {
                    4
                } else {
                    5
                };
                assert_eq!(e.array.shape.len(), ndim);
                // Keep inputs that still parse: mutations of them reach deeper.
                if corpus.len() < 256 {
                    corpus.push(input);
                }
            }
            Err(e) => {
                err += 1;
                assert!(!e.to_string().is_empty());
            }
        }
    }
    eprintln!(
        "fuzzed {n} inputs in {:?}: {ok} parsed, {err} refused",
        start.elapsed()
    );
    assert!(n >= 1000.min(iters), "ran only {n} iterations");
    assert!(err > 0 && ok > 0, "mutations should produce both outcomes");
}
