//! Multi-head attention on packed rows against its definition written with candle's
//! ops (per head: softmax(q kᵀ/√d + bias) v), values and gradients, with and without a
//! key mask, split between threads or not, and against finite differences.

use candle_core::{DType, Device, Tensor, Var, D};
use proptest::prelude::*;
use scoreguide_kernels::{attention, self_attention};
use scoreguide_testing::{max_abs_diff, weighted_sum_gradients};

fn randn(seed: u64, shape: &[usize]) -> Tensor {
    scoreguide_testing::seeded_uniform(seed, shape)
}

/// Per head, softmax(q kᵀ/√d + bias) v from candle's plain ops, heads side by side.
fn definition(q: &Tensor, k: &Tensor, v: &Tensor, bias: Option<&Tensor>, heads: usize) -> Tensor {
    let hid = q.dim(2).unwrap();
    let d = hid / heads;
    let outs: Vec<Tensor> = (0..heads)
        .map(|h| {
            let (qh, kh, vh) = (
                q.narrow(2, h * d, d).unwrap(),
                k.narrow(2, h * d, d).unwrap(),
                v.narrow(2, h * d, d).unwrap(),
            );
            let mut s = (qh.matmul(&kh.t().unwrap()).unwrap() / (d as f64).sqrt()).unwrap();
            if let Some(b) = bias {
                s = s
                    .broadcast_add(&b.to_dtype(s.dtype()).unwrap().unsqueeze(1).unwrap())
                    .unwrap();
            }
            candle_nn::ops::softmax(&s, D::Minus1)
                .unwrap()
                .matmul(&vh)
                .unwrap()
        })
        .collect();
    Tensor::cat(&outs, 2).unwrap()
}

/// A mask of `[b, t]`: the last `pad(b)` keys of each row get −1e9.
fn mask(b: usize, t: usize) -> Tensor {
    let v: Vec<f32> = (0..b)
        .flat_map(|i| (0..t).map(move |j| if j + (i % 3) >= t { -1e9 } else { 0.0 }))
        .collect();
    Tensor::from_vec(v, (b, t), &Device::Cpu).unwrap()
}

fn check_cross(b: usize, n: usize, t: usize, heads: usize, d: usize, masked: bool, dtype: DType) {
    let hid = heads * d;
    let var = |seed, shape: &[usize]| {
        Var::from_tensor(&randn(seed, shape).to_dtype(dtype).unwrap()).unwrap()
    };
    let (q, kv) = (var(1, &[b, n, hid]), var(2, &[b, t, 2 * hid]));
    let bias = masked.then(|| mask(b, t).to_dtype(dtype).unwrap());
    let r = randn(3, &[b, n, hid]).to_dtype(dtype).unwrap();
    let y = attention(q.as_tensor(), kv.as_tensor(), heads, bias.as_ref()).unwrap();
    let (k, v) = (
        kv.as_tensor().narrow(2, 0, hid).unwrap(),
        kv.as_tensor().narrow(2, hid, hid).unwrap(),
    );
    let y_ref = definition(q.as_tensor(), &k, &v, bias.as_ref(), heads);
    assert_eq!(y.dims(), &[b, n, hid]);
    let what = format!("{b}×{n} over {t}, {heads} heads of {d}, masked {masked}, {dtype:?}");
    assert!(max_abs_diff(&y, &y_ref) < 1e-5, "values, {what}");
    let vars = [q.as_tensor(), kv.as_tensor()];
    let g = weighted_sum_gradients(&y, &r, &vars);
    let g_ref = weighted_sum_gradients(&y_ref, &r, &vars);
    for (((a, e), x), name) in g.iter().zip(&g_ref).zip(vars).zip(["q", "kv"]) {
        assert_eq!(a.dims(), x.dims());
        assert!(
            max_abs_diff(a, e) < 1e-4,
            "gradient of {name}, {what}: {}",
            max_abs_diff(a, e)
        );
    }
}

#[test]
fn cross_attention_matches_its_definition_with_gradients() {
    for masked in [false, true] {
        check_cross(2, 3, 5, 2, 4, masked, DType::F32);
        check_cross(2, 3, 5, 2, 4, masked, DType::F64);
        // The traffic network's cross-attention: the batch is split between threads.
        check_cross(64, 12, 64, 4, 16, masked, DType::F32);
    }
    check_cross(1, 1, 1, 1, 1, false, DType::F32);
}

#[test]
fn self_attention_matches_its_definition_with_gradients() {
    for (b, n, heads, d, masked) in [
        (2, 5, 2, 3, false),
        (3, 7, 4, 4, true),
        (64, 49, 4, 32, true),
    ] {
        let hid = heads * d;
        let qkv = Var::from_tensor(&randn(5, &[b, n, 3 * hid])).unwrap();
        let bias = masked.then(|| mask(b, n));
        let r = randn(6, &[b, n, hid]);
        let y = self_attention(qkv.as_tensor(), heads, bias.as_ref()).unwrap();
        let [q, k, v] = [0, 1, 2].map(|i| qkv.as_tensor().narrow(2, i * hid, hid).unwrap());
        let y_ref = definition(&q, &k, &v, bias.as_ref(), heads);
        assert!(max_abs_diff(&y, &y_ref) < 1e-5, "values, {b}×{n}");
        let vars = [qkv.as_tensor()];
        let (a, e) = (
            &weighted_sum_gradients(&y, &r, &vars)[0],
            &weighted_sum_gradients(&y_ref, &r, &vars)[0],
        );
        assert!(
            max_abs_diff(a, e) < 1e-4,
            "gradient, {b}×{n}: {}",
            max_abs_diff(a, e)
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn cross_attention_matches_for_any_shape(
        b in 1usize..4, n in 1usize..9, t in 1usize..9, heads in 1usize..4, d in 1usize..6,
        masked: bool
    ) {
        // Masks leave at least one key per row unmasked only where t > 2.
        check_cross(b, n, t, heads, d, masked && t > 2, DType::F32);
    }
}

#[test]
fn gradient_matches_finite_differences() {
    let (b, n, t, heads, d) = (1, 2, 3, 2, 2);
    let q0 = randn(7, &[b, n, heads * d]).to_dtype(DType::F64).unwrap();
    let kv0 = randn(8, &[b, t, 2 * heads * d]);
    let f = |q: &Tensor| -> f64 {
        let y = attention(&q.to_dtype(DType::F32).unwrap(), &kv0, heads, None).unwrap();
        y.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar()
            .unwrap()
    };
    let qv = Var::from_tensor(&q0.to_dtype(DType::F32).unwrap()).unwrap();
    let y = attention(qv.as_tensor(), &kv0, heads, None).unwrap();
    let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    let g: Vec<f32> = g
        .get(qv.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let base: Vec<f64> = q0.flatten_all().unwrap().to_vec1().unwrap();
    let eps = 1e-3;
    for (i, gi) in g.iter().enumerate() {
        let shifted = |delta: f64| {
            let mut v = base.clone();
            v[i] += delta;
            Tensor::from_vec(v, q0.shape(), &Device::Cpu).unwrap()
        };
        let fd = (f(&shifted(eps)) - f(&shifted(-eps))) / (2.0 * eps);
        assert!(
            (fd - *gi as f64).abs() < 1e-2 * (1.0 + fd.abs()),
            "q[{i}]: {fd} vs {gi}"
        );
    }
}

#[test]
fn bad_arguments_are_named_errors() {
    let q = randn(9, &[2, 3, 8]);
    let err = attention(&q, &randn(10, &[2, 4, 8]), 2, None).unwrap_err();
    assert!(err.to_string().contains("keys and values"), "{err}");
    let err = attention(&q, &randn(10, &[2, 4, 16]), 3, None).unwrap_err();
    assert!(err.to_string().contains("heads"), "{err}");
    let err = attention(&q, &randn(10, &[2, 4, 16]), 2, Some(&randn(11, &[2, 5]))).unwrap_err();
    assert!(err.to_string().contains("key bias"), "{err}");
    let tracked = Var::from_tensor(&randn(11, &[2, 4])).unwrap();
    let err = attention(&q, &randn(10, &[2, 4, 16]), 2, Some(tracked.as_tensor())).unwrap_err();
    assert!(err.to_string().contains("constant"), "{err}");
    let err = self_attention(&randn(12, &[2, 3, 10]), 2, None).unwrap_err();
    assert!(err.to_string().contains("[q | k | v]"), "{err}");
}
