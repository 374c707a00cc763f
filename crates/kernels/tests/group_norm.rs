//! Group norm (with and without its SiLU) against the same written in candle's ops:
//! values, gradients of input, gain and bias, odd shapes and named errors.

use candle_core::{Device, Tensor, Var};
use proptest::prelude::*;
use scoreguide_kernels::group_norm;
use scoreguide_testing::{max_abs, max_abs_diff, weighted_sum_gradients};

fn fill(seed: u64, shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(7);
    let v: Vec<f32> = (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.3) * 3.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// PyTorch's GroupNorm (biased variance), then SiLU, in candle's basic ops.
fn reference(x: &Tensor, groups: usize, g: &Tensor, b: &Tensor, eps: f64, silu: bool) -> Tensor {
    let dims = x.dims().to_vec();
    let (n, c) = (dims[0], dims[1]);
    let xg = x.reshape((n, groups, ())).unwrap();
    let mean = xg.mean_keepdim(2).unwrap();
    let centred = xg.broadcast_sub(&mean).unwrap();
    let var = centred.sqr().unwrap().mean_keepdim(2).unwrap();
    let xh = centred
        .broadcast_div(&(var + eps).unwrap().sqrt().unwrap())
        .unwrap()
        .reshape((n, c, ()))
        .unwrap();
    let z = xh
        .broadcast_mul(&g.reshape((1, c, 1)).unwrap())
        .unwrap()
        .broadcast_add(&b.reshape((1, c, 1)).unwrap())
        .unwrap();
    let y = if silu {
        (&z * candle_nn::ops::sigmoid(&z).unwrap()).unwrap()
    } else {
        z
    };
    y.reshape(dims).unwrap()
}

fn check(dims: &[usize], groups: usize, silu: bool) {
    let c = dims[1];
    let x = Var::from_tensor(&fill(1, dims)).unwrap();
    let g = Var::from_tensor(&fill(2, &[c])).unwrap();
    let b = Var::from_tensor(&fill(3, &[c])).unwrap();
    let y = group_norm(
        x.as_tensor(),
        groups,
        g.as_tensor(),
        b.as_tensor(),
        1e-5,
        silu,
    )
    .unwrap();
    let e = reference(
        x.as_tensor(),
        groups,
        g.as_tensor(),
        b.as_tensor(),
        1e-5,
        silu,
    );
    let what = format!("{dims:?}, {groups} groups, silu {silu}");
    assert!(
        max_abs_diff(&y, &e) < 1e-4 * (1.0 + max_abs(&e)),
        "values, {what}"
    );
    let r = fill(4, dims);
    let vars = [x.as_tensor(), g.as_tensor(), b.as_tensor()];
    let ga = weighted_sum_gradients(&y, &r, &vars);
    let ge = weighted_sum_gradients(&e, &r, &vars);
    for ((a, e), name) in ga.iter().zip(&ge).zip(["input", "gain", "bias"]) {
        assert!(
            max_abs_diff(a, e) < 1e-4 * (1.0 + max_abs(e)),
            "{name} gradient, {what}: {}",
            max_abs_diff(a, e)
        );
    }
}

#[test]
fn matches_candle_ops() {
    for silu in [false, true] {
        // A U-Net layer (large enough to split between threads), one group, one
        // channel per group, 1×1 images, a batch of one, a 3-d input.
        check(&[8, 64, 14, 14], 32, silu);
        check(&[2, 6, 5, 3], 1, silu);
        check(&[3, 4, 2, 2], 4, silu);
        check(&[2, 8, 1, 1], 2, silu);
        check(&[1, 6, 7, 7], 3, silu);
        check(&[4, 6, 9], 2, silu);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn matches_candle_ops_for_any_shape(
        n in 1usize..4, groups in 1usize..5, per_group in 1usize..4, h in 1usize..6,
        w in 1usize..6, silu: bool,
    ) {
        check(&[n, groups * per_group, h, w], groups, silu);
    }
}

#[test]
fn bad_arguments_are_named_errors() {
    let x = fill(1, &[2, 6, 3, 3]);
    let (g, b) = (fill(2, &[6]), fill(3, &[6]));
    let err = |r: candle_core::Result<Tensor>| r.unwrap_err().to_string();
    assert!(err(group_norm(&x, 4, &g, &b, 1e-5, true)).contains("multiple of the 4 groups"));
    assert!(err(group_norm(&x, 3, &fill(2, &[5]), &b, 1e-5, true)).contains("gain and bias"));
    assert!(err(group_norm(&x, 3, &g, &b, 0.0, true)).contains("ε"));
    assert!(err(group_norm(&fill(1, &[6]), 3, &g, &b, 1e-5, true)).contains("[N, C, …]"));
}
