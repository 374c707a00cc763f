//! Feature arrays from files: `.npy` or a safetensors file of one tensor.

use crate::{read_npy, Array2};
use candle_core::Result;
use std::path::Path;

/// Reads an [N, D] array from `.npy` (f32/f64) or from a safetensors file holding exactly
/// one tensor (f16, bf16, f32 or f64), as f64 rows; errors name the file.
pub fn read_feature_rows(path: &Path) -> Result<Array2> {
    let named = |e: candle_core::Error| candle_core::Error::msg(format!("{}: {e}", path.display()));
    let bytes = std::fs::read(path).map_err(|e| named(e.into()))?;
    parse_feature_rows(&bytes).map_err(named)
}

/// [`read_feature_rows`] on a file's bytes.
pub fn parse_feature_rows(bytes: &[u8]) -> Result<Array2> {
    if bytes.starts_with(b"\x93NUMPY") {
        return read_npy(bytes);
    }
    let tensors = candle_core::safetensors::load_buffer(bytes, &candle_core::Device::Cpu)
        .map_err(|e| candle_core::Error::msg(format!("neither .npy nor safetensors ({e})")))?;
    let mut it = tensors.into_values();
    let (Some(t), None) = (it.next(), it.next()) else {
        candle_core::bail!("a safetensors input must hold exactly one tensor");
    };
    // Candle converts F8 slowly enough to look like a hang, and integers silently.
    if !matches!(
        t.dtype(),
        candle_core::DType::F16
            | candle_core::DType::BF16
            | candle_core::DType::F32
            | candle_core::DType::F64
    ) {
        candle_core::bail!(
            "features stored as {:?}; need f16, bf16, f32 or f64",
            t.dtype()
        );
    }
    let (rows, cols) = t.dims2().map_err(|_| {
        candle_core::Error::msg(format!(
            "need a 2-D [N, D] tensor, got shape {:?}",
            t.dims()
        ))
    })?;
    let data = t
        .to_dtype(candle_core::DType::F64)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f64>())?;
    Ok(Array2 { rows, cols, data })
}
