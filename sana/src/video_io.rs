//! mp4 in and out through FFmpeg's libraries (ffmpeg-next): H.264 clips from
//! generated frames, RGB frames from training clips, and lossless PNG frame
//! directories.

use std::path::Path;
use std::sync::Once;

use ffmpeg::format::Pixel;
use ffmpeg::software::scaling::{Context as Scaler, Flags};
use ffmpeg::{codec, encoder, frame, media, Dictionary, Packet, Rational};
use ffmpeg_next as ffmpeg;
use tch::{Device, Kind, Tensor};

use crate::pipelines::pipeline_sana::write_png;
use crate::{Result, SanaError};

fn init() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        // Registration is automatic since FFmpeg 4; init only sets up logging, which
        // we keep to errors so a damaged clip is one line of ours, not FFmpeg's chatter.
        let _ = ffmpeg::init();
        ffmpeg::log::set_level(ffmpeg::log::Level::Fatal);
    });
}

fn media_err<'a>(path: &'a Path, what: &str) -> impl Fn(ffmpeg::Error) -> SanaError + 'a {
    let what = what.to_string();
    move |e| SanaError::Media {
        path: path.to_path_buf(),
        msg: format!("{what}: {e}"),
    }
}

/// `[T, 3, H, W]` in [0, 1] (any float kind, any device) → `[T, H, W, 3]` bytes,
/// rounded as diffusers' `numpy_to_pil`.
fn to_rgb_bytes(frames: &Tensor) -> Result<(Vec<u8>, [i64; 3])> {
    let s = frames.size();
    if s.len() != 4 || s[1] != 3 {
        return Err(SanaError::input(
            "frames",
            format!("expected [T, 3, H, W], got {s:?}"),
        ));
    }
    let bytes = (frames.to_device(Device::Cpu).to_kind(Kind::Float) * 255.0)
        .round()
        .clamp(0.0, 255.0)
        .to_kind(Kind::Uint8)
        .permute([0, 2, 3, 1])
        .contiguous();
    let data = Vec::<u8>::try_from(bytes.flatten(0, -1)).map_err(SanaError::Tch)?;
    Ok((data, [s[0], s[2], s[3]]))
}

/// Writes `[T, 3, H, W]` frames in [0, 1] as an H.264 (libx264, yuv420p, CRF 18)
/// mp4 at `fps`. yuv420p needs even sizes: an odd last row/column is dropped.
/// Written to `<path>.part` and renamed when complete, so a failed encode
/// leaves no half file.
pub fn write_mp4(frames: &Tensor, path: &Path, fps: u32) -> Result<()> {
    let mut part = path.as_os_str().to_owned();
    part.push(".part");
    let part = std::path::PathBuf::from(part);
    let written = encode_mp4(frames, &part, fps)
        .and_then(|()| std::fs::rename(&part, path).map_err(|e| SanaError::io(path, e)));
    if written.is_err() {
        let _ = std::fs::remove_file(&part);
    }
    written
}

fn encode_mp4(frames: &Tensor, path: &Path, fps: u32) -> Result<()> {
    init();
    if fps == 0 {
        return Err(SanaError::input("fps", "must be at least 1"));
    }
    let (data, [t, h, w]) = to_rgb_bytes(frames)?;
    let (ew, eh) = ((w & !1) as u32, (h & !1) as u32);
    if ew == 0 || eh == 0 {
        return Err(SanaError::input(
            "frames",
            format!("{h}×{w} is too small for yuv420p (needs at least 2×2)"),
        ));
    }
    let err = |what: &'static str| media_err(path, what);
    let mut octx = ffmpeg::format::output_as(&path, "mp4").map_err(err("creating the mp4"))?;
    // libx264 takes the CRF/preset options; another H.264 encoder would ignore them.
    let codec = encoder::find_by_name("libx264")
        .or_else(|| {
            tracing::warn!("FFmpeg has no libx264; using its default H.264 encoder");
            encoder::find(codec::Id::H264)
        })
        .ok_or_else(|| SanaError::Media {
            path: path.to_path_buf(),
            msg: "this FFmpeg has no H.264 encoder (install libx264 / Debian's libavcodec)".into(),
        })?;
    let global_header = octx
        .format()
        .flags()
        .contains(ffmpeg::format::Flags::GLOBAL_HEADER);
    let mut enc = codec::context::Context::new_with_codec(codec)
        .encoder()
        .video()
        .map_err(err("H.264 encoder"))?;
    let time_base = Rational(1, fps as i32);
    enc.set_width(ew);
    enc.set_height(eh);
    enc.set_format(Pixel::YUV420P);
    enc.set_time_base(time_base);
    enc.set_frame_rate(Some(Rational(fps as i32, 1)));
    if global_header {
        enc.set_flags(codec::Flags::GLOBAL_HEADER);
    }
    let mut opts = Dictionary::new();
    opts.set("crf", "18");
    opts.set("preset", "medium");
    let mut enc = enc.open_with(opts).map_err(err("opening libx264"))?;
    {
        let mut ost = octx.add_stream(codec).map_err(err("adding the stream"))?;
        ost.set_parameters(&enc);
        ost.set_time_base(time_base);
    }
    octx.write_header().map_err(err("writing the header"))?;
    let ost_tb = octx.stream(0).map(|s| s.time_base()).unwrap_or(time_base);
    let mut scaler = Scaler::get(
        Pixel::RGB24,
        ew,
        eh,
        Pixel::YUV420P,
        ew,
        eh,
        Flags::BILINEAR,
    )
    .map_err(err("colour conversion"))?;
    let drain = |enc: &mut encoder::Video, octx: &mut ffmpeg::format::context::Output| {
        let mut pkt = Packet::empty();
        while enc.receive_packet(&mut pkt).is_ok() {
            pkt.set_stream(0);
            // Each frame lasts one tick; without it the muxer guesses the last
            // frame's duration and the container's average rate drifts.
            pkt.set_duration(1);
            pkt.rescale_ts(time_base, ost_tb);
            pkt.write_interleaved(octx)
                .map_err(err("writing a packet"))?;
        }
        Ok::<(), SanaError>(())
    };
    let (w, ew, eh) = (w as usize, ew as usize, eh as usize);
    for i in 0..t as usize {
        let mut rgb = frame::Video::new(Pixel::RGB24, ew as u32, eh as u32);
        let stride = rgb.stride(0);
        let dst = rgb.data_mut(0);
        let src = &data[i * (h as usize) * w * 3..];
        for y in 0..eh {
            dst[y * stride..y * stride + ew * 3]
                .copy_from_slice(&src[y * w * 3..y * w * 3 + ew * 3]);
        }
        let mut yuv = frame::Video::empty();
        scaler
            .run(&rgb, &mut yuv)
            .map_err(err("colour conversion"))?;
        yuv.set_pts(Some(i as i64));
        enc.send_frame(&yuv).map_err(err("encoding"))?;
        drain(&mut enc, &mut octx)?;
    }
    enc.send_eof().map_err(err("encoding"))?;
    drain(&mut enc, &mut octx)?;
    octx.write_trailer().map_err(err("writing the trailer"))?;
    Ok(())
}

/// Writes `[T, 3, H, W]` frames in [0, 1] as `dir/<prefix>_<frame>.png` (lossless).
pub fn write_png_frames(frames: &Tensor, dir: &Path, prefix: &str) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| SanaError::io(dir, e))?;
    for i in 0..frames.size()[0] {
        write_png(&frames.get(i), &dir.join(format!("{prefix}_{i}.png")))?;
    }
    Ok(())
}

/// What a clip's container says about its video stream.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClipInfo {
    /// Frames per second (the stream's average frame rate).
    pub fps: f64,
    /// Frames in the stream as the container counts them (0 when it does not say).
    pub frames: i64,
    pub width: u32,
    pub height: u32,
}

/// A decoded clip: `[T, H, W, 3]` uint8 RGB frames and the container's facts.
pub struct Clip {
    pub frames: Tensor,
    pub info: ClipInfo,
}

/// Decodes frames `start .. start + count` (all from `start` when `count` is None)
/// of `path`'s best video stream to RGB. `threads` bounds FFmpeg's decode threads.
/// Fewer frames than asked is not an error here: the caller sees `frames.size()[0]`.
pub fn read_mp4(path: &Path, start: usize, count: Option<usize>, threads: usize) -> Result<Clip> {
    init();
    let err = |what: &'static str| media_err(path, what);
    let mut ictx = ffmpeg::format::input(&path).map_err(err("opening"))?;
    let (index, params, fps, nframes) = {
        let stream = ictx
            .streams()
            .best(media::Type::Video)
            .ok_or_else(|| SanaError::Media {
                path: path.to_path_buf(),
                msg: "no video stream".into(),
            })?;
        let r = stream.avg_frame_rate();
        let fps = if r.denominator() != 0 && r.numerator() > 0 {
            f64::from(r)
        } else {
            let r = stream.rate();
            if r.denominator() != 0 {
                f64::from(r)
            } else {
                0.0
            }
        };
        (stream.index(), stream.parameters(), fps, stream.frames())
    };
    let mut ctx = codec::context::Context::from_parameters(params).map_err(err("decoder"))?;
    ctx.set_threading(ffmpeg::threading::Config::count(threads.max(1)));
    let mut decoder = ctx.decoder().video().map_err(err("decoder"))?;
    let (w, h) = (decoder.width(), decoder.height());
    if w == 0 || h == 0 {
        return Err(SanaError::Media {
            path: path.to_path_buf(),
            msg: "the video stream has no size".into(),
        });
    }
    let mut scaler: Option<Scaler> = None;
    let want = count.unwrap_or(usize::MAX);
    let mut out: Vec<u8> = Vec::new();
    let (mut seen, mut kept) = (0usize, 0usize);
    let mut take = |decoder: &mut ffmpeg::decoder::Video, out: &mut Vec<u8>| -> Result<bool> {
        let mut decoded = frame::Video::empty();
        while kept < want && decoder.receive_frame(&mut decoded).is_ok() {
            seen += 1;
            if seen <= start {
                continue;
            }
            let sc = match scaler.as_mut() {
                Some(s) => s,
                None => scaler.insert(
                    Scaler::get(decoded.format(), w, h, Pixel::RGB24, w, h, Flags::BILINEAR)
                        .map_err(err("colour conversion"))?,
                ),
            };
            let mut rgb = frame::Video::empty();
            sc.run(&decoded, &mut rgb)
                .map_err(err("colour conversion"))?;
            let stride = rgb.stride(0);
            for y in 0..h as usize {
                out.extend_from_slice(&rgb.data(0)[y * stride..y * stride + w as usize * 3]);
            }
            kept += 1;
        }
        Ok(kept >= want)
    };
    let mut done = false;
    for (stream, packet) in ictx.packets() {
        if stream.index() != index {
            continue;
        }
        decoder.send_packet(&packet).map_err(err("decoding"))?;
        if take(&mut decoder, &mut out)? {
            done = true;
            break;
        }
    }
    if !done {
        decoder.send_eof().map_err(err("decoding"))?;
        take(&mut decoder, &mut out)?;
    }
    let t = (out.len() / (w as usize * h as usize * 3)) as i64;
    let frames = Tensor::from_slice(&out).view([t, h as i64, w as i64, 3]);
    Ok(Clip {
        frames,
        info: ClipInfo {
            fps,
            frames: nframes,
            width: w,
            height: h,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A moving gradient: smooth enough that H.264 at CRF 18 keeps it close.
    fn clip(t: i64, h: i64, w: i64) -> Tensor {
        let y = Tensor::arange(h, (Kind::Float, Device::Cpu)).view([1, 1, h, 1]) / h as f64;
        let x = Tensor::arange(w, (Kind::Float, Device::Cpu)).view([1, 1, 1, w]) / w as f64;
        let f = Tensor::arange(t, (Kind::Float, Device::Cpu)).view([t, 1, 1, 1]) / t as f64;
        let r = (&x + &f * 0.5).remainder(1.0).expand([t, 1, h, w], false);
        let g = (&y * 0.8 + 0.1).expand([t, 1, h, w], false);
        let b = ((&x + &y) * 0.5).expand([t, 1, h, w], false);
        Tensor::cat(&[r, g, b], 1)
    }

    #[test]
    fn mp4_round_trip_keeps_frames_and_fps() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("c.mp4");
        let frames = clip(9, 48, 64);
        write_mp4(&frames, &p, 12).unwrap();
        let c = read_mp4(&p, 0, None, 1).unwrap();
        assert_eq!(c.frames.size(), [9, 48, 64, 3]);
        assert_eq!(c.info.fps, 12.0);
        assert_eq!((c.info.width, c.info.height), (64, 48));
        let back = c.frames.permute([0, 3, 1, 2]).to_kind(Kind::Float) / 255.0;
        let err = (&back - &frames).abs().mean(Kind::Float).double_value(&[]);
        assert!(err < 0.02, "mean abs error after H.264 {err}");

        // A window from frame 3: the same frames as the whole decode's.
        let part = read_mp4(&p, 3, Some(4), 2).unwrap();
        assert_eq!(part.frames.size()[0], 4);
        assert!(part.frames.equal(&c.frames.narrow(0, 3, 4)));
        // Asking past the end gives what there is.
        assert_eq!(read_mp4(&p, 7, Some(10), 1).unwrap().frames.size()[0], 2);
    }

    #[test]
    fn odd_sizes_drop_the_last_row_and_column() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("odd.mp4");
        write_mp4(&clip(2, 33, 47), &p, 8).unwrap();
        let c = read_mp4(&p, 0, None, 1).unwrap();
        assert_eq!(c.frames.size(), [2, 32, 46, 3]);
    }

    #[test]
    fn damaged_and_missing_files_are_errors_naming_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("bad.mp4");
        std::fs::write(&p, b"not an mp4 at all").unwrap();
        let e = read_mp4(&p, 0, None, 1).err().unwrap().to_string();
        assert!(e.contains("bad.mp4"), "{e}");
        let good = tmp.path().join("good.mp4");
        write_mp4(&clip(9, 32, 32), &good, 8).unwrap();
        let bytes = std::fs::read(&good).unwrap();
        let cut = tmp.path().join("cut.mp4");
        std::fs::write(&cut, &bytes[..bytes.len() / 3]).unwrap();
        // A truncated mp4 (moov at the end) does not open, or yields fewer frames.
        match read_mp4(&cut, 0, None, 1) {
            Err(e) => assert!(e.to_string().contains("cut.mp4"), "{e}"),
            Ok(c) => assert!(c.frames.size()[0] < 9),
        }
        let e = read_mp4(&tmp.path().join("none.mp4"), 0, None, 1)
            .err()
            .unwrap();
        assert!(e.to_string().contains("none.mp4"), "{e}");
    }

    #[test]
    fn png_frames_are_lossless() {
        let tmp = tempfile::tempdir().unwrap();
        let frames = clip(3, 8, 10);
        write_png_frames(&frames, tmp.path(), "0").unwrap();
        let img = image::open(tmp.path().join("0_2.png")).unwrap().to_rgb8();
        let want = (frames.get(2) * 255.0)
            .round()
            .to_kind(Kind::Uint8)
            .permute([1, 2, 0]);
        let want = Vec::<u8>::try_from(want.contiguous().flatten(0, -1)).unwrap();
        assert_eq!(img.into_raw(), want);
        assert!(write_mp4(&frames, &tmp.path().join("x.mp4"), 0).is_err());
        // A failed encode (1×1 is too small for yuv420p) leaves no file behind.
        let tiny = Tensor::zeros([2, 3, 1, 1], (Kind::Float, Device::Cpu));
        assert!(write_mp4(&tiny, &tmp.path().join("y.mp4"), 8).is_err());
        let left: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.path().to_string_lossy().contains(".mp4"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }
}
