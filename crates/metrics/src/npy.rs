//! Reading NumPy `.npy` arrays (little-endian f32 or f64, C order).

use candle_core::{bail, Result};

/// A 2-D array read from `.npy`, as f64, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Array2 {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f64>,
}

/// Parses `.npy` bytes holding a 2-D `<f4` or `<f8` array in C order.
pub fn read_npy(bytes: &[u8]) -> Result<Array2> {
    let (dims, data) = parse(bytes)?;
    let [rows, cols] = dims[..] else {
        bail!(".npy array must be 2-D [N, D], got shape {dims:?}");
    };
    Ok(Array2 { rows, cols, data })
}

/// Parses `.npy` bytes holding a 1-D `<f4` or `<f8` array (a vector of statistics).
pub fn read_npy_vector(bytes: &[u8]) -> Result<Vec<f64>> {
    let (dims, data) = parse(bytes)?;
    if dims.len() != 1 {
        bail!(".npy array must be 1-D, got shape {dims:?}");
    }
    Ok(data)
}

/// The shape and values (as f64) of a `.npy` array of any rank.
fn parse(bytes: &[u8]) -> Result<(Vec<usize>, Vec<f64>)> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        bail!("not a .npy file (bad magic)");
    }
    let (header_len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        v => bail!(".npy version {v} is not supported"),
    };
    let Some(header) = bytes.get(start..start + header_len) else {
        bail!(".npy header is truncated");
    };
    let header = std::str::from_utf8(header)
        .map_err(|_| candle_core::Error::msg(".npy header is not text"))?;
    let field = |key: &str| -> Option<&str> {
        let i = header.find(&format!("'{key}'"))?;
        let rest = header[i + key.len() + 2..]
            .trim_start()
            .strip_prefix(':')?
            .trim_start();
        Some(rest)
    };
    let descr = field("descr").ok_or_else(|| candle_core::Error::msg(".npy header lacks descr"))?;
    let width = if descr.starts_with("'<f8'") {
        8
    } else if descr.starts_with("'<f4'") {
        4
    } else {
        bail!(
            ".npy dtype {} is not supported (need little-endian f4 or f8)",
            descr.split(',').next().unwrap_or(descr)
        );
    };
    if field("fortran_order").is_some_and(|f| f.starts_with("True")) {
        bail!(".npy arrays in Fortran order are not supported");
    }
    let shape_txt =
        field("shape").ok_or_else(|| candle_core::Error::msg(".npy header lacks shape"))?;
    let inner = shape_txt
        .strip_prefix('(')
        .and_then(|s| s.split(')').next())
        .ok_or_else(|| candle_core::Error::msg(".npy shape is malformed"))?;
    let dims: Vec<usize> = inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse().map_err(|_| {
                candle_core::Error::msg(format!(".npy shape entry `{s}` is not a number"))
            })
        })
        .collect::<Result<_>>()?;
    let body = &bytes[start + header_len..];
    // In bytes, so that a shape whose byte count wraps cannot match a short body.
    let needed = dims
        .iter()
        .try_fold(width as usize, |a: usize, &d| a.checked_mul(d))
        .ok_or_else(|| candle_core::Error::msg(".npy shape overflows"))?;
    if body.len() != needed {
        bail!(
            ".npy data holds {} bytes, shape {dims:?} needs {needed}",
            body.len()
        );
    }
    let data = if width == 8 {
        body.chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8-byte chunk")))
            .collect()
    } else {
        body.chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4-byte chunk")) as f64)
            .collect()
    };
    Ok((dims, data))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn npy(shape: &str) -> Vec<u8> {
        scoreguide_testing::npy_bytes("<f4", false, shape, &[])
    }

    /// 2^62 rows of one f4 is 2^64 bytes: a byte count that wraps to 0 must not match
    /// the empty body (the fuzzer's corpus replayed with overflow checks found it).
    #[test]
    fn a_shape_whose_byte_count_wraps_is_refused() {
        let e = read_npy(&npy("(4611686018427387904, 1)"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("overflows"), "{e}");
        assert_eq!(read_npy(&npy("(0, 3)")).unwrap().rows, 0);
    }
}
