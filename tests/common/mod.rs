//! Helpers shared by the integration tests.
#![allow(dead_code)]

use candle_core::Tensor;

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

/// max |a − b| over all elements, in f64 whatever the tensors' dtype.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_dtype(candle_core::DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// Every element of an f64 tensor, flattened.
pub fn flat_f64(t: &Tensor) -> Vec<f64> {
    t.flatten_all().unwrap().to_vec1::<f64>().unwrap()
}
