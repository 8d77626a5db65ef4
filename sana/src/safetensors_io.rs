//! Writing safetensors files ourselves: tch's writer has no metadata header,
//! and the safetensors crate writes its metadata from a HashMap, so key order
//! (and the file's bytes) would change from run to run. Here the header is
//! sorted, so the same tensors always give the same bytes. Used by LoRA
//! exports and training checkpoints.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use safetensors::tensor::Dtype;
use serde_json::Value;
use tch::{Device, Tensor};

use crate::{Result, SanaError};

/// A tensor copied to host memory, ready to write (for example on another thread).
#[derive(Debug)]
pub struct HostTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

/// Copies named tensors (any device) to host memory.
pub fn to_host(tensors: &[(String, Tensor)]) -> Result<Vec<HostTensor>> {
    tensors
        .iter()
        .map(|(name, t)| {
            let t = t.detach().to_device(Device::Cpu).contiguous();
            let dtype = Dtype::try_from(t.kind())
                .map_err(|e| SanaError::input(name.clone(), format!("cannot save: {e}")))?;
            let numel = t.numel();
            let mut data = vec![0u8; numel * t.kind().elt_size_in_bytes()];
            t.f_copy_data_u8(&mut data, numel)?;
            Ok(HostTensor {
                name: name.clone(),
                dtype,
                shape: t.size().iter().map(|&d| d as usize).collect(),
                data,
            })
        })
        .collect()
}

/// Writes `tensors` (in their order) with `metadata` to `path`, and fsyncs it.
pub fn write(
    path: &Path,
    tensors: &[HostTensor],
    metadata: &HashMap<String, String>,
) -> Result<()> {
    let mut header = serde_json::Map::new();
    let meta: serde_json::Map<String, Value> = metadata
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    header.insert("__metadata__".into(), Value::Object(meta));
    let mut offset = 0usize;
    for t in tensors {
        let dtype = serde_json::to_value(t.dtype).expect("dtypes serialise");
        header.insert(
            t.name.clone(),
            serde_json::json!({
                "dtype": dtype,
                "shape": t.shape,
                "data_offsets": [offset, offset + t.data.len()],
            }),
        );
        offset += t.data.len();
    }
    let mut head = serde_json::to_vec(&Value::Object(header)).expect("json");
    // Pad the header to 8 bytes, as the safetensors crate does.
    while !head.len().is_multiple_of(8) {
        head.push(b' ');
    }
    let io = |e: std::io::Error| SanaError::io(path, e);
    let mut f = std::fs::File::create(path).map_err(io)?;
    f.write_all(&(head.len() as u64).to_le_bytes())
        .map_err(io)?;
    f.write_all(&head).map_err(io)?;
    for t in tensors {
        f.write_all(&t.data).map_err(io)?;
    }
    f.sync_all().map_err(io)
}
