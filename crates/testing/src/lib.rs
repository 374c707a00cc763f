//! Helpers the scoreguide crates' tests share: tensor comparisons, seeded fills, the
//! check that every parameter of a model gets a gradient, and `.npy` files written byte
//! by byte.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! let a = Tensor::new(&[1f32, 2.0], &Device::Cpu)?;
//! let b = Tensor::new(&[1f32, 2.5], &Device::Cpu)?;
//! assert_eq!(scoreguide_testing::max_abs_diff(&a, &b), 0.5);
//! # Ok::<(), candle_core::Error>(())
//! ```

use candle_core::Tensor;

/// A CPU tensor of values spread over [−2, 2) by a fixed linear congruential sequence of
/// `seed`: the same on every machine (candle's CPU generator cannot be seeded).
pub fn seeded_uniform(seed: u64, shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let v: Vec<f32> = (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0
        })
        .collect();
    Tensor::from_vec(v, shape, &candle_core::Device::Cpu).expect("the shape holds the values")
}

/// The gradients of Σ y ⊙ r (r fixed) with respect to each of `of`, in order: how the
/// tests compare an op's backward pass with its reference's. Panics, naming the input,
/// when one gets no gradient.
pub fn weighted_sum_gradients(y: &Tensor, r: &Tensor, of: &[&Tensor]) -> Vec<Tensor> {
    let g = (y * r)
        .and_then(|p| p.sum_all())
        .and_then(|s| s.backward())
        .expect("Σ y ⊙ r differentiates");
    of.iter()
        .enumerate()
        .map(|(i, t)| {
            g.get(t)
                .unwrap_or_else(|| panic!("input {i} of {} got no gradient", of.len()))
                .clone()
        })
        .collect()
}

/// ‖a − b‖ / ‖b‖ over all elements.
pub fn rel_l2(a: &Tensor, b: &Tensor) -> f32 {
    let num = (a - b)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let den = b
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    (num / den).sqrt()
}

/// max |a| over all elements, in f64 whatever the tensor's dtype.
pub fn max_abs(a: &Tensor) -> f64 {
    a.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_dtype(candle_core::DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// max |a − b| over all elements, in f64 whatever the tensors' dtype.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    max_abs(&(a - b).unwrap())
}

/// Every element of an f64 tensor, flattened.
pub fn flat_f64(t: &Tensor) -> Vec<f64> {
    t.flatten_all().unwrap().to_vec1::<f64>().unwrap()
}

/// Every parameter in `vars` (a parameter store's `vars()`) has a gradient in `grads`,
/// and none is all zeros (a fused candle op without a backward pass would drop some).
/// `what` names the model.
pub fn assert_all_nonzero(
    vars: &[(String, candle_core::Var)],
    grads: &candle_core::backprop::GradStore,
    what: &str,
) {
    assert!(!vars.is_empty(), "{what}: no parameters");
    for (name, var) in vars {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{what}: `{name}` has no gradient"));
        let m = g
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(m > 0.0, "{what}: gradient of `{name}` is zero");
    }
}

/// The device the device-generic tests run on: `SCOREGUIDE_TEST_DEVICE` (`cpu`, the
/// default, or `cuda` / `cuda:N`, which needs a build with `--features cuda`); `.ci/gpu`
/// sets it on a GPU machine.
pub fn device() -> candle_core::Device {
    match std::env::var("SCOREGUIDE_TEST_DEVICE").as_deref() {
        Err(_) | Ok("") | Ok("cpu") => candle_core::Device::Cpu,
        Ok(s) => {
            let ordinal = s
                .strip_prefix("cuda")
                .map(|r| r.trim_start_matches(':'))
                .map(|r| if r.is_empty() { Ok(0) } else { r.parse() })
                .unwrap_or_else(|| panic!("SCOREGUIDE_TEST_DEVICE={s}: expected cpu or cuda[:N]"))
                .unwrap_or_else(|_| panic!("SCOREGUIDE_TEST_DEVICE={s}: bad GPU ordinal"));
            candle_core::Device::new_cuda(ordinal)
                .unwrap_or_else(|e| panic!("SCOREGUIDE_TEST_DEVICE={s}: {e}"))
        }
    }
}

/// A `.npy` file (format 1.0): the header for `descr` (`<f4`, `>f8`, …), Fortran order
/// or not and `shape` (Python's tuple text, e.g. `(2, 3)`), padded to 64 bytes as numpy
/// pads it, then `body` as given — right or deliberately wrong.
pub fn npy_bytes(descr: &str, fortran: bool, shape: &str, body: &[u8]) -> Vec<u8> {
    let order = if fortran { "True" } else { "False" };
    let mut h = format!("{{'descr': '{descr}', 'fortran_order': {order}, 'shape': {shape}, }}")
        .into_bytes();
    while (10 + h.len() + 1) % 64 != 0 {
        h.push(b' ');
    }
    h.push(b'\n');
    let mut b = b"\x93NUMPY\x01\x00".to_vec();
    b.extend((h.len() as u16).to_le_bytes());
    b.extend(h);
    b.extend_from_slice(body);
    b
}

/// Little-endian bytes of `v`.
pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}
