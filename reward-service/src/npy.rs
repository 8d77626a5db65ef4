//! NumPy `.npy` files (format 1.0, 2.0 and 3.0): reading the arrays clients
//! send, and writing them the way `np.save` does.
//!
//! Parsed by hand rather than through a crate: we need only the four dtypes of
//! the protocol, zero-copy slices of the request body, and a typed error for
//! every malformed input (the body parser is fuzzed).

use bytes::Bytes;
use std::fmt;

const MAGIC: &[u8; 6] = b"\x93NUMPY";
/// Headers past this are not something `np.save` writes; refusing them bounds work.
const MAX_HEADER_LEN: usize = 1 << 16;

/// The element types the reward protocol carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    /// `|u1`: images and videos.
    U8,
    /// `<f2`: latents.
    F16,
    /// `<u2`: bfloat16 latents (NumPy has no bfloat16, so clients send its bits).
    Bf16AsU16,
    /// `<f4`.
    F32,
}

impl Dtype {
    pub fn itemsize(self) -> usize {
        match self {
            Dtype::U8 => 1,
            Dtype::F16 | Dtype::Bf16AsU16 => 2,
            Dtype::F32 => 4,
        }
    }

    /// The `descr` string `np.save` writes.
    pub fn descr(self) -> &'static str {
        match self {
            Dtype::U8 => "|u1",
            Dtype::F16 => "<f2",
            Dtype::Bf16AsU16 => "<u2",
            Dtype::F32 => "<f4",
        }
    }

    /// How Cosmos-RL's service names the tensor type in `input_info.dtype`.
    pub fn torch_name(self) -> &'static str {
        match self {
            Dtype::U8 => "torch.uint8",
            Dtype::F16 => "torch.float16",
            Dtype::Bf16AsU16 => "torch.bfloat16",
            Dtype::F32 => "torch.float32",
        }
    }

    fn from_descr(descr: &str) -> Result<Self, NpyError> {
        // `=` is native order, which is little-endian on every machine we run on.
        Ok(match descr {
            "|u1" | "<u1" | "=u1" | "u1" => Dtype::U8,
            "<f2" | "=f2" => Dtype::F16,
            "<u2" | "=u2" => Dtype::Bf16AsU16,
            "<f4" | "=f4" => Dtype::F32,
            other => return Err(NpyError::UnsupportedDtype(other.to_string())),
        })
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Dtype::U8 => "uint8",
            Dtype::F16 => "float16",
            Dtype::Bf16AsU16 => "bfloat16 (as uint16)",
            Dtype::F32 => "float32",
        })
    }
}

/// Why a `.npy` could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NpyError {
    #[error("not a .npy file: missing the \\x93NUMPY magic")]
    BadMagic,
    #[error("truncated .npy: {0}")]
    Truncated(String),
    #[error(".npy format version {0}.{1} is not supported (1.0, 2.0 and 3.0 are)")]
    UnsupportedVersion(u8, u8),
    #[error(".npy header is not valid: {0}")]
    BadHeader(String),
    #[error(".npy dtype {0:?} is not supported (uint8 |u1, float16 <f2, bfloat16 as uint16 <u2, float32 <f4)")]
    UnsupportedDtype(String),
    #[error(".npy array is in Fortran order; send a C-ordered array")]
    FortranOrder,
    #[error(".npy shape {shape:?} is too large")]
    ShapeOverflow { shape: Vec<usize> },
    #[error(".npy has {extra} bytes after the array data")]
    TrailingBytes { extra: usize },
}

/// An array borrowed from the request body.
#[derive(Debug, Clone)]
pub struct NpyArray {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// The elements, C order, little-endian.
    pub data: Bytes,
}

impl NpyArray {
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Elements as f64, for statistics over any dtype.
    pub fn values_f64(&self) -> Box<dyn Iterator<Item = f64> + '_> {
        match self.dtype {
            Dtype::U8 => Box::new(self.data.iter().map(|&b| b as f64)),
            Dtype::F16 => Box::new(
                self.data
                    .chunks_exact(2)
                    .map(|c| f16_to_f64(u16::from_le_bytes([c[0], c[1]]))),
            ),
            Dtype::Bf16AsU16 => {
                Box::new(self.data.chunks_exact(2).map(|c| {
                    f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16) as f64
                }))
            }
            Dtype::F32 => Box::new(
                self.data
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64),
            ),
        }
    }
}

/// IEEE half to f64 (exact: every f16 is representable).
fn f16_to_f64(h: u16) -> f64 {
    let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
    let exp = ((h >> 10) & 0x1f) as i32;
    let frac = (h & 0x3ff) as f64;
    match exp {
        0 => sign * frac * 2f64.powi(-24),
        31 if frac == 0.0 => sign * f64::INFINITY,
        31 => f64::NAN,
        _ => sign * (1.0 + frac / 1024.0) * 2f64.powi(exp - 15),
    }
}

/// Parse a whole `.npy` file held in `buf` (the data stays a slice of it).
pub fn parse(buf: Bytes) -> Result<NpyArray, NpyError> {
    if buf.len() < MAGIC.len() || &buf[..MAGIC.len()] != MAGIC {
        if buf.len() < MAGIC.len() && MAGIC.starts_with(&buf) {
            return Err(NpyError::Truncated(format!(
                "{} bytes, shorter than the magic",
                buf.len()
            )));
        }
        return Err(NpyError::BadMagic);
    }
    if buf.len() < 8 {
        return Err(NpyError::Truncated("no version bytes".into()));
    }
    let (major, minor) = (buf[6], buf[7]);
    let (header_len, header_start) = match (major, minor) {
        (1, 0) => {
            if buf.len() < 10 {
                return Err(NpyError::Truncated("no header length".into()));
            }
            (u16::from_le_bytes([buf[8], buf[9]]) as usize, 10)
        }
        (2, 0) | (3, 0) => {
            if buf.len() < 12 {
                return Err(NpyError::Truncated("no header length".into()));
            }
            (
                u32::from_le_bytes([buf[8], buf[9], buf[10], buf[11]]) as usize,
                12,
            )
        }
        _ => return Err(NpyError::UnsupportedVersion(major, minor)),
    };
    if header_len > MAX_HEADER_LEN {
        return Err(NpyError::BadHeader(format!(
            "header length {header_len} exceeds {MAX_HEADER_LEN}"
        )));
    }
    let data_start = header_start + header_len;
    if buf.len() < data_start {
        return Err(NpyError::Truncated(format!(
            "header says {header_len} bytes, {} present",
            buf.len() - header_start
        )));
    }
    let header_bytes = &buf[header_start..data_start];
    // Versions 1 and 2 are latin-1; 3 is UTF-8. Every valid key and value is ASCII.
    let header = if major == 3 {
        std::str::from_utf8(header_bytes)
            .map_err(|_| NpyError::BadHeader("header is not UTF-8".into()))?
            .to_string()
    } else {
        header_bytes.iter().map(|&b| b as char).collect::<String>()
    };
    let h = parse_header(&header)?;
    if h.fortran_order {
        return Err(NpyError::FortranOrder);
    }
    let dtype = Dtype::from_descr(&h.descr)?;
    let count = h
        .shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .and_then(|n| n.checked_mul(dtype.itemsize()))
        .ok_or_else(|| NpyError::ShapeOverflow {
            shape: h.shape.clone(),
        })?;
    let have = buf.len() - data_start;
    if have < count {
        return Err(NpyError::Truncated(format!(
            "shape {:?} of {dtype} needs {count} data bytes, {have} present",
            h.shape
        )));
    }
    if have > count {
        return Err(NpyError::TrailingBytes {
            extra: have - count,
        });
    }
    Ok(NpyArray {
        dtype,
        shape: h.shape,
        data: buf.slice(data_start..),
    })
}

struct Header {
    descr: String,
    fortran_order: bool,
    shape: Vec<usize>,
}

/// The header is a Python dict literal:
/// `{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }`.
fn parse_header(s: &str) -> Result<Header, NpyError> {
    let mut p = Lit {
        s: s.as_bytes(),
        i: 0,
    };
    let (mut descr, mut fortran, mut shape) = (None, None, None);
    p.expect(b'{')?;
    loop {
        p.ws();
        if p.eat(b'}') {
            break;
        }
        let key = p.string()?;
        p.ws();
        p.expect(b':')?;
        p.ws();
        match key.as_str() {
            "descr" => descr = Some(p.string()?),
            "fortran_order" => fortran = Some(p.boolean()?),
            "shape" => shape = Some(p.tuple()?),
            other => return Err(bad(format!("unexpected key {other:?}"))),
        }
        p.ws();
        if !p.eat(b',') {
            p.ws();
            p.expect(b'}')?;
            break;
        }
    }
    // After the dict: padding spaces and a newline only.
    if p.s[p.i..]
        .iter()
        .any(|&b| !matches!(b, b' ' | b'\n' | b'\t' | b'\r' | 0))
    {
        return Err(bad("text after the header dict".into()));
    }
    Ok(Header {
        descr: descr.ok_or_else(|| bad("no 'descr'".into()))?,
        fortran_order: fortran.ok_or_else(|| bad("no 'fortran_order'".into()))?,
        shape: shape.ok_or_else(|| bad("no 'shape'".into()))?,
    })
}

fn bad(msg: String) -> NpyError {
    NpyError::BadHeader(msg)
}

struct Lit<'a> {
    s: &'a [u8],
    i: usize,
}

impl Lit<'_> {
    fn ws(&mut self) {
        while self.i < self.s.len() && matches!(self.s[self.i], b' ' | b'\t' | b'\n' | b'\r') {
            self.i += 1;
        }
    }
    fn eat(&mut self, c: u8) -> bool {
        if self.s.get(self.i) == Some(&c) {
            self.i += 1;
            true
        } else {
            false
        }
    }
    fn expect(&mut self, c: u8) -> Result<(), NpyError> {
        if self.eat(c) {
            Ok(())
        } else {
            Err(bad(format!("expected {:?} at byte {}", c as char, self.i)))
        }
    }
    fn string(&mut self) -> Result<String, NpyError> {
        let q = match self.s.get(self.i) {
            Some(&q @ (b'\'' | b'"')) => q,
            _ => return Err(bad(format!("expected a string at byte {}", self.i))),
        };
        self.i += 1;
        let start = self.i;
        while self.i < self.s.len() && self.s[self.i] != q {
            if self.s[self.i] == b'\\' {
                return Err(bad("escapes in header strings are not supported".into()));
            }
            self.i += 1;
        }
        if self.i >= self.s.len() {
            return Err(bad("unterminated string".into()));
        }
        let out = String::from_utf8_lossy(&self.s[start..self.i]).into_owned();
        self.i += 1;
        Ok(out)
    }
    fn boolean(&mut self) -> Result<bool, NpyError> {
        let rest = &self.s[self.i..];
        if rest.starts_with(b"True") {
            self.i += 4;
            Ok(true)
        } else if rest.starts_with(b"False") {
            self.i += 5;
            Ok(false)
        } else {
            Err(bad(format!("expected True or False at byte {}", self.i)))
        }
    }
    fn tuple(&mut self) -> Result<Vec<usize>, NpyError> {
        self.expect(b'(')?;
        let mut dims = Vec::new();
        loop {
            self.ws();
            if self.eat(b')') {
                break;
            }
            let start = self.i;
            while self.i < self.s.len() && self.s[self.i].is_ascii_digit() {
                self.i += 1;
            }
            if start == self.i {
                return Err(bad(format!("expected a dimension at byte {}", self.i)));
            }
            // Python 2 era files may write `3L`.
            self.eat(b'L');
            let txt = std::str::from_utf8(&self.s[start..self.i]).unwrap_or("");
            let txt = txt.trim_end_matches('L');
            dims.push(
                txt.parse::<usize>()
                    .map_err(|_| bad(format!("dimension {txt:?} out of range")))?,
            );
            self.ws();
            if !self.eat(b',') {
                self.ws();
                self.expect(b')')?;
                break;
            }
        }
        Ok(dims)
    }
}

/// Write `data` as a `.npy` file exactly as `np.save` (format 1.0) does:
/// the header padded with spaces to a multiple of 64 bytes, ending in `\n`.
pub fn encode(dtype: Dtype, shape: &[usize], data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 128);
    write_header(&mut out, dtype, shape);
    out.extend_from_slice(data);
    out
}

/// Append just the `.npy` header (for callers that stream the data after it).
pub fn write_header(out: &mut Vec<u8>, dtype: Dtype, shape: &[usize]) {
    let shape_txt = match shape {
        [one] => format!("({one},)"),
        dims => format!(
            "({})",
            dims.iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header = format!(
        "{{'descr': '{}', 'fortran_order': False, 'shape': {shape_txt}, }}",
        dtype.descr()
    );
    let unpadded = MAGIC.len() + 2 + 2 + header.len() + 1;
    let pad = (64 - unpadded % 64) % 64;
    header.extend(std::iter::repeat_n(' ', pad));
    header.push('\n');
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_dtype() {
        for (dtype, shape) in [
            (Dtype::U8, vec![2, 4, 4, 3]),
            (Dtype::F16, vec![1, 16, 2, 8, 8]),
            (Dtype::Bf16AsU16, vec![3]),
            (Dtype::F32, vec![]),
        ] {
            let n: usize = shape.iter().product::<usize>() * dtype.itemsize();
            let data: Vec<u8> = (0..n).map(|i| (i * 7) as u8).collect();
            let file = encode(dtype, &shape, &data);
            assert_eq!(file.len() % 64, n % 64, "header is padded to 64");
            let arr = parse(Bytes::from(file)).unwrap();
            assert_eq!(arr.dtype, dtype);
            assert_eq!(arr.shape, shape);
            assert_eq!(&arr.data[..], &data[..]);
        }
    }

    #[test]
    fn reads_version_2_and_3_headers() {
        for major in [2u8, 3] {
            let header = "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }\n";
            let mut f = MAGIC.to_vec();
            f.extend_from_slice(&[major, 0]);
            f.extend_from_slice(&(header.len() as u32).to_le_bytes());
            f.extend_from_slice(header.as_bytes());
            f.extend_from_slice(&1.5f32.to_le_bytes());
            f.extend_from_slice(&(-2.0f32).to_le_bytes());
            let arr = parse(Bytes::from(f)).unwrap();
            assert_eq!(arr.values_f64().collect::<Vec<_>>(), vec![1.5, -2.0]);
        }
    }

    #[test]
    fn typed_errors() {
        let good = encode(Dtype::U8, &[2, 2], &[1, 2, 3, 4]);
        let cut = Bytes::from(good[..good.len() - 1].to_vec());
        assert!(matches!(parse(cut), Err(NpyError::Truncated(_))));
        let mut long = good.clone();
        long.push(0);
        assert_eq!(
            parse(Bytes::from(long)).unwrap_err(),
            NpyError::TrailingBytes { extra: 1 }
        );
        assert_eq!(
            parse(Bytes::from_static(b"PK\x03\x04")).unwrap_err(),
            NpyError::BadMagic
        );
        let fortran = replace(&good, b"False", b"True ");
        assert_eq!(
            parse(Bytes::from(fortran)).unwrap_err(),
            NpyError::FortranOrder
        );
        let f8 = replace(&good, b"|u1", b"<f8");
        assert!(matches!(
            parse(Bytes::from(f8)),
            Err(NpyError::UnsupportedDtype(d)) if d == "<f8"
        ));
    }

    /// Same-length byte replacement, keeping the header length valid.
    fn replace(buf: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
        let at = buf.windows(from.len()).position(|w| w == from).unwrap();
        let mut out = buf.to_vec();
        out[at..at + to.len()].copy_from_slice(to);
        out
    }

    #[test]
    fn half_precision_values() {
        assert_eq!(f16_to_f64(0x3c00), 1.0);
        assert_eq!(f16_to_f64(0xc000), -2.0);
        assert_eq!(f16_to_f64(0x0001), 2f64.powi(-24));
        assert_eq!(f16_to_f64(0x7bff), 65504.0);
    }
}
