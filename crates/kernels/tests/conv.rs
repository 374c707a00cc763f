//! The im2col convolution against candle's conv2d (values and autograd gradients for
//! input, kernel and bias), finite differences, odd shapes and the error cases.

use candle_core::{Device, Tensor, Var};
use proptest::prelude::*;
use scoreguide_kernels::{conv2d, Conv2dSpec};
use scoreguide_testing::{max_abs, max_abs_diff, weighted_sum_gradients};

fn randn(seed: u64, shape: &[usize]) -> Tensor {
    // A fixed pseudo-random fill (candle's CPU generator cannot be seeded).
    let n: usize = shape.iter().product();
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
    let v: Vec<f32> = (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// candle's own ops: nearest upsampling, then conv2d, then the bias.
fn reference(x: &Tensor, k: &Tensor, b: &Tensor, spec: Conv2dSpec) -> Tensor {
    let (_, _, h, w) = x.dims4().unwrap();
    let x = match spec.upsample {
        1 => x.clone(),
        u => x.upsample_nearest2d(h * u, w * u).unwrap(),
    };
    let o = k.dim(0).unwrap();
    x.conv2d(k, spec.padding, spec.stride, 1, 1)
        .unwrap()
        .broadcast_add(&b.reshape((1, o, 1, 1)).unwrap())
        .unwrap()
}

#[allow(clippy::too_many_arguments)]
fn check(n: usize, c: usize, h: usize, w: usize, o: usize, k: usize, spec: Conv2dSpec) {
    let what = format!("x [{n}, {c}, {h}, {w}], kernel [{o}, {c}, {k}, {k}], {spec:?}");
    let x = Var::from_tensor(&randn(1, &[n, c, h, w])).unwrap();
    let kern = Var::from_tensor(&randn(2, &[o, c, k, k])).unwrap();
    let b = Var::from_tensor(&randn(3, &[o])).unwrap();
    let y = conv2d(x.as_tensor(), kern.as_tensor(), Some(b.as_tensor()), spec).unwrap();
    let y_ref = reference(x.as_tensor(), kern.as_tensor(), b.as_tensor(), spec);
    assert_eq!(y.dims(), y_ref.dims(), "{what}");
    let scale = 1.0 + max_abs(&y_ref);
    assert!(max_abs_diff(&y, &y_ref) < 1e-5 * scale, "values, {what}");
    // candle's conv2d backward takes the output padding of the height for both axes
    // and underflows where the padding exceeds what the kernel covers, so its gradient
    // fails for some shapes (a 2 × 3 input at stride 2; a 1 × 4 input with padding 2 at
    // stride 3): finite differences cover those.
    let candle_can = |side: usize| {
        let out = spec.output_side(side, k).unwrap();
        let covered = (out - 1) * spec.stride + k;
        covered >= 2 * spec.padding && side * spec.upsample >= covered - 2 * spec.padding
    };
    let remainder = |side: usize| (side * spec.upsample + 2 * spec.padding - k) % spec.stride;
    if remainder(h) != remainder(w) || !candle_can(h) || !candle_can(w) {
        return;
    }
    let r = randn(4, y.dims());
    let vars = [x.as_tensor(), kern.as_tensor(), b.as_tensor()];
    let g = weighted_sum_gradients(&y, &r, &vars);
    let g_ref = weighted_sum_gradients(&y_ref, &r, &vars);
    for ((a, e), name) in g.iter().zip(&g_ref).zip(["input", "kernel", "bias"]) {
        assert_eq!(a.dims(), e.dims(), "{name} gradient, {what}");
        let scale = 1.0 + max_abs(e);
        assert!(
            max_abs_diff(a, e) < 1e-5 * scale,
            "{name} gradient, {what}: {}",
            max_abs_diff(a, e)
        );
    }
}

#[test]
fn matches_candle_on_the_unet_layers() {
    let same3 = Conv2dSpec::same(1);
    let down = Conv2dSpec {
        stride: 2,
        padding: 1,
        upsample: 1,
    };
    let up = Conv2dSpec {
        upsample: 2,
        ..same3
    };
    // 3×3, 1×1, stride-2 down, upsample + conv up; large enough to split the batch
    // between threads, and batch 1 (the GEMM split instead).
    for n in [1, 4] {
        check(n, 16, 14, 14, 24, 3, same3);
        check(n, 16, 14, 14, 24, 1, Conv2dSpec::default());
        check(n, 16, 14, 14, 24, 3, down);
        check(n, 16, 7, 7, 8, 3, up);
    }
}

#[test]
fn per_image_bias_matches_candle() {
    let spec = Conv2dSpec::same(1);
    let x = Var::from_tensor(&randn(1, &[3, 4, 5, 5])).unwrap();
    let k = Var::from_tensor(&randn(2, &[6, 4, 3, 3])).unwrap();
    let b = Var::from_tensor(&randn(3, &[3, 6])).unwrap();
    let y = conv2d(x.as_tensor(), k.as_tensor(), Some(b.as_tensor()), spec).unwrap();
    let e = x
        .as_tensor()
        .conv2d(k.as_tensor(), 1, 1, 1, 1)
        .unwrap()
        .broadcast_add(&b.as_tensor().reshape((3, 6, 1, 1)).unwrap())
        .unwrap();
    assert!(max_abs_diff(&y, &e) < 1e-4, "{}", max_abs_diff(&y, &e));
    let r = randn(4, y.dims());
    let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let g_ref = (&e * &r).unwrap().sum_all().unwrap().backward().unwrap();
    for v in [&x, &k, &b] {
        let (a, e) = (
            g.get(v.as_tensor()).unwrap(),
            g_ref.get(v.as_tensor()).unwrap(),
        );
        assert!(max_abs_diff(a, e) < 1e-4 * (1.0 + max_abs(e)));
    }
}

#[test]
fn odd_shapes() {
    // A 1×1 image, channel counts of no block size, non-square images, kernels wider
    // than the unpadded image, a 1×1 kernel with padding and stride.
    check(1, 1, 1, 1, 1, 3, Conv2dSpec::same(1));
    check(1, 1, 1, 1, 1, 5, Conv2dSpec::same(2));
    check(2, 3, 1, 1, 5, 1, Conv2dSpec::default());
    check(3, 7, 5, 9, 13, 3, Conv2dSpec::same(1));
    check(
        2,
        5,
        6,
        3,
        3,
        3,
        Conv2dSpec {
            stride: 3,
            padding: 2,
            upsample: 1,
        },
    );
    check(
        1,
        2,
        4,
        4,
        3,
        1,
        Conv2dSpec {
            stride: 2,
            padding: 1,
            upsample: 3,
        },
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]
    #[test]
    fn matches_candle_for_any_geometry(
        n in 1usize..4, c in 1usize..6, h in 1usize..9, w in 1usize..9, o in 1usize..6,
        k in prop::sample::select(vec![1usize, 2, 3, 5]), stride in 1usize..4,
        padding in 0usize..3, upsample in 1usize..3,
    ) {
        let spec = Conv2dSpec { stride, padding, upsample };
        prop_assume!(spec.output_side(h, k).is_some() && spec.output_side(w, k).is_some());
        check(n, c, h, w, o, k, spec);
    }
}

#[test]
fn gradients_match_finite_differences() {
    // Non-square, stride 2 with different remainders per axis (where candle's own
    // backward fails), and upsampling.
    for (spec, h, w) in [
        (
            Conv2dSpec {
                stride: 2,
                padding: 1,
                upsample: 1,
            },
            5,
            6,
        ),
        (
            Conv2dSpec {
                stride: 1,
                padding: 1,
                upsample: 2,
            },
            3,
            4,
        ),
        (
            Conv2dSpec {
                stride: 3,
                padding: 2,
                upsample: 1,
            },
            1,
            4,
        ),
    ] {
        finite_differences(spec, h, w);
    }
}

fn finite_differences(spec: Conv2dSpec, h: usize, w: usize) {
    let x = randn(5, &[2, 3, h, w]);
    let k = randn(6, &[4, 3, 3, 3]);
    let b = randn(7, &[4]);
    let ho = spec.output_side(h, 3).unwrap();
    let wo = spec.output_side(w, 3).unwrap();
    let r = randn(8, &[2, 4, ho, wo]);
    let loss = |x: &Tensor, k: &Tensor, b: &Tensor| -> f64 {
        let y = conv2d(x, k, Some(b), spec).unwrap();
        let y = y.to_dtype(candle_core::DType::F64).unwrap();
        let r = r.to_dtype(candle_core::DType::F64).unwrap();
        (y.sqr().unwrap() * r)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let (xv, kv, bv) = (
        Var::from_tensor(&x).unwrap(),
        Var::from_tensor(&k).unwrap(),
        Var::from_tensor(&b).unwrap(),
    );
    let y = conv2d(xv.as_tensor(), kv.as_tensor(), Some(bv.as_tensor()), spec).unwrap();
    let grads = (y.sqr().unwrap() * &r)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let eps = 1e-2f32;
    for (which, t) in [(0, &x), (1, &k), (2, &b)] {
        let analytic = grads
            .get([xv.as_tensor(), kv.as_tensor(), bv.as_tensor()][which])
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let flat = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for i in (0..flat.len()).step_by(7) {
            let at = |d: f32| {
                let mut v = flat.clone();
                v[i] += d;
                let p = Tensor::from_vec(v, t.shape(), &Device::Cpu).unwrap();
                match which {
                    0 => loss(&p, &k, &b),
                    1 => loss(&x, &p, &b),
                    _ => loss(&x, &k, &p),
                }
            };
            let numeric = (at(eps) - at(-eps)) / (2.0 * eps as f64);
            let tol = 2e-2 * (1.0 + numeric.abs());
            assert!(
                (numeric - analytic[i] as f64).abs() < tol,
                "argument {which}, element {i}: numeric {numeric}, analytic {}",
                analytic[i]
            );
        }
    }
}

#[test]
fn bad_shapes_are_named_errors() {
    let x = randn(1, &[2, 3, 4, 4]);
    let spec = Conv2dSpec::same(1);
    let err = |r: candle_core::Result<Tensor>| r.unwrap_err().to_string();
    assert!(err(conv2d(&x, &randn(2, &[5, 4, 3, 3]), None, spec)).contains("channels"));
    assert!(err(conv2d(
        &x,
        &randn(2, &[5, 3, 3, 3]),
        Some(&randn(3, &[4])),
        spec
    ))
    .contains("bias"));
    assert!(err(conv2d(&x, &randn(2, &[5, 3, 7, 7]), None, spec)).contains("does not fit"));
    assert!(err(conv2d(
        &x.flatten_from(2).unwrap(),
        &randn(2, &[5, 3, 3, 3]),
        None,
        spec
    ))
    .contains("[N, C, H, W]"));
    let zero_stride = Conv2dSpec { stride: 0, ..spec };
    assert!(err(conv2d(&x, &randn(2, &[5, 3, 3, 3]), None, zero_stride)).contains("stride"));
}

#[test]
fn strided_inputs_are_read_as_their_values() {
    // A transposed view (H and W swapped) gives the same result as its copy.
    let x = randn(9, &[2, 3, 6, 5]).transpose(2, 3).unwrap();
    let k = randn(10, &[4, 3, 3, 3]);
    let spec = Conv2dSpec::same(1);
    let a = conv2d(&x, &k, None, spec).unwrap();
    let e = conv2d(&x.contiguous().unwrap(), &k, None, spec).unwrap();
    assert_eq!(max_abs_diff(&a, &e), 0.0);
}
