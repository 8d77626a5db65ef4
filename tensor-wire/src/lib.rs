//! `proto`'s `TensorData` ↔ `tch::Tensor` (C-order little-endian bytes; CPU
//! copies). A crate of its own so that `proto` stays free of libtorch: the
//! reward gateway, which never touches tensors, links no libtorch.

use proto::runtime::v1::TensorData;
use tch::{Device, Kind, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("tensor `{name}`: unsupported dtype {dtype:?}")]
    Dtype { name: String, dtype: String },
    #[error("tensor `{name}`: {len} bytes do not hold shape {shape:?} of {dtype}")]
    Size {
        name: String,
        len: usize,
        shape: Vec<i64>,
        dtype: String,
    },
    #[error("missing tensor `{0}`")]
    Missing(String),
    #[error(transparent)]
    Tch(#[from] tch::TchError),
}

fn kind_name(kind: Kind) -> Option<&'static str> {
    Some(match kind {
        Kind::Float => "float32",
        Kind::BFloat16 => "bfloat16",
        Kind::Half => "float16",
        Kind::Double => "float64",
        Kind::Int64 => "int64",
        Kind::Int => "int32",
        Kind::Uint8 => "uint8",
        Kind::Bool => "bool",
        _ => return None,
    })
}

fn kind_of(name: &str) -> Option<Kind> {
    Some(match name {
        "float32" => Kind::Float,
        "bfloat16" => Kind::BFloat16,
        "float16" => Kind::Half,
        "float64" => Kind::Double,
        "int64" => Kind::Int64,
        "int32" => Kind::Int,
        "uint8" => Kind::Uint8,
        "bool" => Kind::Bool,
        _ => return None,
    })
}

/// Copies `t` (any device) into a message.
pub fn to_wire(name: &str, t: &Tensor) -> Result<TensorData, WireError> {
    let t = t.detach().to_device(Device::Cpu).contiguous();
    let dtype = kind_name(t.kind()).ok_or_else(|| WireError::Dtype {
        name: name.into(),
        dtype: format!("{:?}", t.kind()),
    })?;
    let numel = t.numel();
    let mut data = vec![0u8; numel * t.kind().elt_size_in_bytes()];
    t.f_copy_data_u8(&mut data, numel)?;
    Ok(TensorData {
        name: name.into(),
        dtype: dtype.into(),
        shape: t.size(),
        data,
    })
}

/// A CPU tensor from a message, checking the byte count against the shape.
pub fn from_wire(m: &TensorData) -> Result<Tensor, WireError> {
    let kind = kind_of(&m.dtype).ok_or_else(|| WireError::Dtype {
        name: m.name.clone(),
        dtype: m.dtype.clone(),
    })?;
    let numel: i64 = m.shape.iter().product();
    if m.shape.iter().any(|&d| d < 0) || numel as usize * kind.elt_size_in_bytes() != m.data.len() {
        return Err(WireError::Size {
            name: m.name.clone(),
            len: m.data.len(),
            shape: m.shape.clone(),
            dtype: m.dtype.clone(),
        });
    }
    Ok(Tensor::f_from_data_size(&m.data, &m.shape, kind)?)
}

/// The message called `name` in a list, as a tensor.
pub fn take(list: &[TensorData], name: &str) -> Result<Tensor, WireError> {
    let m = list
        .iter()
        .find(|t| t.name == name)
        .ok_or_else(|| WireError::Missing(name.into()))?;
    from_wire(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_bad_sizes() {
        for kind in [Kind::Float, Kind::BFloat16, Kind::Int64, Kind::Uint8] {
            let t = Tensor::arange(24, (Kind::Float, Device::Cpu))
                .view([2, 3, 4])
                .to_kind(kind);
            let m = to_wire("x", &t).unwrap();
            assert!(from_wire(&m).unwrap().equal(&t), "{kind:?}");
        }
        let mut m = to_wire("x", &Tensor::zeros([3], (Kind::Float, Device::Cpu))).unwrap();
        m.data.pop();
        assert!(from_wire(&m).unwrap_err().to_string().contains("11 bytes"));
        m.dtype = "complex".into();
        assert!(from_wire(&m)
            .unwrap_err()
            .to_string()
            .contains("unsupported dtype"));
    }
}
