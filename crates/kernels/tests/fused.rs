//! The fused ops against candle's composed ops: values, gradients for every argument
//! (autograd and finite differences), odd shapes, strided inputs and the fallback path.

use candle_core::{DType, Device, Tensor, Var};
use proptest::prelude::*;
use scoreguide_kernels::{add_silu, dense, silu, Act};
use scoreguide_testing::{max_abs_diff, weighted_sum_gradients};

fn randn(seed: u64, shape: &[usize]) -> Tensor {
    scoreguide_testing::seeded_uniform(seed, shape)
}

fn composed(x: &Tensor, w: &Tensor, b: &Tensor, act: Act) -> candle_core::Result<Tensor> {
    let z = x.broadcast_matmul(&w.t()?)?.broadcast_add(b)?;
    match act {
        Act::Identity => Ok(z),
        Act::Silu => candle_nn::ops::silu(&z),
    }
}

/// Values and the gradients of Σ y ⊙ r (r fixed) for x, W and b, fused vs composed.
fn check_dense(rows: usize, k: usize, n: usize, per_row_bias: bool, act: Act) {
    check_dense_nd(&[rows], k, n, per_row_bias, act)
}

/// [`check_dense`] for x `[lead…, k]`.
fn check_dense_nd(lead: &[usize], k: usize, n: usize, per_row_bias: bool, act: Act) {
    let with = |last: usize| [lead, &[last]].concat();
    let rows: usize = lead.iter().product();
    let x = Var::from_tensor(&randn(1, &with(k))).unwrap();
    let w = Var::from_tensor(&(randn(2, &[n, k]) * 0.5).unwrap()).unwrap();
    let b_shape: Vec<usize> = if per_row_bias { with(n) } else { vec![n] };
    let b = Var::from_tensor(&randn(3, &b_shape)).unwrap();
    let r = randn(4, &with(n));
    let y = dense(x.as_tensor(), w.as_tensor(), b.as_tensor(), act).unwrap();
    let y_ref = composed(x.as_tensor(), w.as_tensor(), b.as_tensor(), act).unwrap();
    assert!(max_abs_diff(&y, &y_ref) < 1e-4, "values {rows}×{k}→{n}");
    let vars = [x.as_tensor(), w.as_tensor(), b.as_tensor()];
    let g = weighted_sum_gradients(&y, &r, &vars);
    let g_ref = weighted_sum_gradients(&y_ref, &r, &vars);
    for ((a, e), what) in g.iter().zip(&g_ref).zip(["x", "W", "b"]) {
        assert_eq!(a.dims(), e.dims());
        let scale = 1.0 + scoreguide_testing::max_abs(e);
        assert!(
            max_abs_diff(a, e) < 1e-4 * scale,
            "gradient of {what}, {rows}×{k}→{n}: {}",
            max_abs_diff(a, e)
        );
    }
}

#[test]
fn dense_matches_composed_ops() {
    for act in [Act::Identity, Act::Silu] {
        for per_row in [false, true] {
            check_dense(1000, 256, 256, per_row, act);
            check_dense(1, 1, 1, per_row, act);
            check_dense(3, 17, 5, per_row, act);
            // Leading axes are rows, with no reshape in the graph.
            check_dense_nd(&[4, 3, 5], 17, 6, per_row, act);
        }
    }
}

#[test]
fn batched_input_is_one_node_whose_gradients_keep_their_shapes() {
    let x = Var::from_tensor(&randn(12, &[2, 3, 4])).unwrap();
    let (w, b) = (randn(13, &[5, 4]), randn(14, &[5]));
    let y = dense(x.as_tensor(), &w, &b, Act::Silu).unwrap();
    assert_eq!(y.dims(), &[2, 3, 5]);
    // The dense op and x: nothing between them.
    assert_eq!(y.sorted_nodes().len(), 2);
    let g = y.sum_all().unwrap().backward().unwrap();
    assert_eq!(g.get(x.as_tensor()).unwrap().dims(), &[2, 3, 4]);
    // One row.
    let x1 = randn(16, &[4]);
    let y1 = dense(&x1, &w, &b, Act::Identity).unwrap();
    let y1_ref = composed(&x1.unsqueeze(0).unwrap(), &w, &b, Act::Identity).unwrap();
    assert!(max_abs_diff(&y1, &y1_ref.squeeze(0).unwrap()) < 1e-5);
    // A non-contiguous batched input is copied first, with the same values.
    let xt = randn(15, &[3, 2, 4]).transpose(0, 1).unwrap();
    let yt = dense(&xt, &w, &b, Act::Silu).unwrap();
    assert!(max_abs_diff(&yt, &composed(&xt, &w, &b, Act::Silu).unwrap()) < 1e-5);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn dense_matches_composed_ops_for_any_shape(
        rows in 1usize..70, k in 1usize..40, n in 1usize..40, per_row: bool, silu: bool
    ) {
        check_dense(rows, k, n, per_row, if silu { Act::Silu } else { Act::Identity });
    }
}

#[test]
fn dense_gradient_matches_finite_differences() {
    let x = randn(5, &[4, 3]).to_dtype(DType::F32).unwrap();
    let w = randn(6, &[2, 3]);
    let b = randn(7, &[2]);
    let xv = Var::from_tensor(&x).unwrap();
    let f = |x: &Tensor| -> f64 {
        dense(x, &w, &b, Act::Silu)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64
    };
    let g = f_grad(&xv, &w, &b);
    let base: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
    let eps = 1e-2f32;
    for i in 0..base.len() {
        let mut p = base.clone();
        p[i] += eps;
        let mut m = base.clone();
        m[i] -= eps;
        let t = |v: Vec<f32>| Tensor::from_vec(v, (4, 3), &Device::Cpu).unwrap();
        let fd = (f(&t(p)) - f(&t(m))) / (2.0 * eps as f64);
        assert!(
            (fd - g[i]).abs() < 2e-2 * (1.0 + fd.abs()),
            "x[{i}]: {fd} vs {}",
            g[i]
        );
    }
}

fn f_grad(xv: &Var, w: &Tensor, b: &Tensor) -> Vec<f64> {
    let y = dense(xv.as_tensor(), w, b, Act::Silu).unwrap();
    let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    scoreguide_testing::flat_f64(&g.get(xv.as_tensor()).unwrap().to_dtype(DType::F64).unwrap())
}

#[test]
fn strided_and_batched_inputs() {
    // x transposed (not contiguous) and x with two leading dimensions.
    let xt = randn(8, &[5, 7]).t().unwrap();
    let w = randn(9, &[3, 5]);
    let b = randn(10, &[3]);
    let y = dense(&xt, &w, &b, Act::Silu).unwrap();
    assert!(max_abs_diff(&y, &composed(&xt, &w, &b, Act::Silu).unwrap()) < 1e-5);
    let x3 = randn(11, &[2, 4, 5]);
    let y3 = dense(&x3, &w, &b, Act::Identity).unwrap();
    assert_eq!(y3.dims(), &[2, 4, 3]);
    assert!(max_abs_diff(&y3, &composed(&x3, &w, &b, Act::Identity).unwrap()) < 1e-5);
}

#[test]
fn other_dtypes_take_candles_ops() {
    let x = randn(12, &[6, 4]).to_dtype(DType::F64).unwrap();
    let w = randn(13, &[3, 4]).to_dtype(DType::F64).unwrap();
    let b = randn(14, &[3]).to_dtype(DType::F64).unwrap();
    let y = dense(&x, &w, &b, Act::Silu).unwrap();
    assert_eq!(y.dtype(), DType::F64);
    assert!(max_abs_diff(&y, &composed(&x, &w, &b, Act::Silu).unwrap()) < 1e-12);
}

#[test]
fn bad_shapes_are_named() {
    let x = randn(1, &[4, 3]);
    let err = dense(&x, &randn(2, &[2, 5]), &randn(3, &[2]), Act::Silu).unwrap_err();
    assert!(err.to_string().contains("weight's input size 5"), "{err}");
    let err = dense(&x, &randn(2, &[2, 3]), &randn(3, &[3]), Act::Silu).unwrap_err();
    assert!(err.to_string().contains("bias must be [2]"), "{err}");
    let err = add_silu(&x, &randn(3, &[2])).unwrap_err();
    assert!(err.to_string().contains("added term"), "{err}");
}

#[test]
fn add_silu_and_silu_match_composed_ops() {
    for t_shape in [vec![50, 33], vec![33]] {
        let h = Var::from_tensor(&randn(15, &[50, 33])).unwrap();
        let t = Var::from_tensor(&randn(16, &t_shape)).unwrap();
        let r = randn(17, &[50, 33]);
        let y = add_silu(h.as_tensor(), t.as_tensor()).unwrap();
        let y_ref =
            candle_nn::ops::silu(&h.as_tensor().broadcast_add(t.as_tensor()).unwrap()).unwrap();
        assert!(max_abs_diff(&y, &y_ref) < 1e-5);
        let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let g_ref = (&y_ref * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for v in [&h, &t] {
            let d = max_abs_diff(
                g.get(v.as_tensor()).unwrap(),
                g_ref.get(v.as_tensor()).unwrap(),
            );
            assert!(d < 1e-4, "{t_shape:?}: {d}");
        }
    }
    let z = Var::from_tensor(&randn(18, &[7, 300])).unwrap();
    let y = silu(z.as_tensor()).unwrap();
    let y_ref = candle_nn::ops::silu(z.as_tensor()).unwrap();
    assert!(max_abs_diff(&y, &y_ref) < 1e-5);
    let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    let g_ref = y_ref.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    assert!(
        max_abs_diff(
            g.get(z.as_tensor()).unwrap(),
            g_ref.get(z.as_tensor()).unwrap()
        ) < 1e-4
    );
}

#[test]
fn frozen_weights_get_no_gradient_and_extreme_inputs_stay_finite() {
    let x = Var::from_tensor(&(randn(19, &[8, 4]) * 100.0).unwrap()).unwrap();
    let w = randn(20, &[6, 4]);
    let b = randn(21, &[6]);
    let y = dense(x.as_tensor(), &w, &b, Act::Silu).unwrap();
    let g = y.sum_all().unwrap().backward().unwrap();
    assert!(g.get(&w).is_none() && g.get(&b).is_none());
    let gx = g.get(x.as_tensor()).unwrap();
    assert!(
        scoreguide_testing::flat_f64(&gx.to_dtype(DType::F64).unwrap())
            .iter()
            .all(|v| v.is_finite())
    );
    assert!(
        scoreguide_testing::flat_f64(&y.to_dtype(DType::F64).unwrap())
            .iter()
            .all(|v| v.is_finite())
    );
}

#[test]
fn sinusoidal_matches_composed_ops_and_its_gradient() {
    let freqs = [1.0f32, 3.7, 31.6, 1000.0];
    let c = Var::from_tensor(&(randn(22, &[37]) * 0.7).unwrap()).unwrap();
    let y = scoreguide_kernels::sinusoidal(c.as_tensor(), &freqs).unwrap();
    let f = Tensor::new(&freqs, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let arg = c
        .as_tensor()
        .unsqueeze(1)
        .unwrap()
        .broadcast_mul(&f)
        .unwrap();
    let y_ref = Tensor::cat(&[arg.cos().unwrap(), arg.sin().unwrap()], 1).unwrap();
    assert_eq!(y.dims(), &[37, 8]);
    assert!(max_abs_diff(&y, &y_ref) < 1e-5);
    let r = randn(23, &[37, 8]);
    let (a, e) = (
        &weighted_sum_gradients(&y, &r, &[c.as_tensor()])[0],
        &weighted_sum_gradients(&y_ref, &r, &[c.as_tensor()])[0],
    );
    assert!(max_abs_diff(a, e) < 1e-3 * (1.0 + scoreguide_testing::max_abs(e)));
}

#[test]
fn layer_norm_and_softmax_match_composed_ops() {
    let x = Var::from_tensor(&randn(24, &[3, 5, 64])).unwrap();
    let gain = Var::from_tensor(&(randn(25, &[64]) + 1.0).unwrap()).unwrap();
    let bias = Var::from_tensor(&randn(26, &[64])).unwrap();
    let r = randn(27, &[3, 5, 64]);
    let y =
        scoreguide_kernels::layer_norm(x.as_tensor(), gain.as_tensor(), bias.as_tensor()).unwrap();
    let xt = x.as_tensor();
    let centred = xt.broadcast_sub(&xt.mean_keepdim(2).unwrap()).unwrap();
    let y_ref = centred
        .broadcast_div(
            &(centred.sqr().unwrap().mean_keepdim(2).unwrap() + 1e-5)
                .unwrap()
                .sqrt()
                .unwrap(),
        )
        .unwrap()
        .broadcast_mul(gain.as_tensor())
        .unwrap()
        .broadcast_add(bias.as_tensor())
        .unwrap();
    assert!(max_abs_diff(&y, &y_ref) < 1e-4);
    let vars = [x.as_tensor(), gain.as_tensor(), bias.as_tensor()];
    let g = weighted_sum_gradients(&y, &r, &vars);
    let g_ref = weighted_sum_gradients(&y_ref, &r, &vars);
    for (a, e) in g.iter().zip(&g_ref) {
        assert!(max_abs_diff(a, e) < 1e-3 * (1.0 + scoreguide_testing::max_abs(e)));
    }

    let z = Var::from_tensor(&(randn(28, &[4, 7, 12]) * 3.0).unwrap()).unwrap();
    let r = randn(29, &[4, 7, 12]);
    let s = scoreguide_kernels::softmax_last_dim(z.as_tensor()).unwrap();
    let s_ref = candle_nn::ops::softmax(z.as_tensor(), candle_core::D::Minus1).unwrap();
    assert!(max_abs_diff(&s, &s_ref) < 1e-6);
    assert!(
        max_abs_diff(
            &weighted_sum_gradients(&s, &r, &[z.as_tensor()])[0],
            &weighted_sum_gradients(&s_ref, &r, &[z.as_tensor()])[0]
        ) < 1e-5
    );
}

#[test]
fn batched_matmul_on_strided_views_matches_candle() {
    let a = Var::from_tensor(&randn(30, &[3, 4, 5, 6])).unwrap();
    let bt = Var::from_tensor(&randn(31, &[3, 4, 7, 6])).unwrap();
    // b is a transposed view: [3, 4, 6, 7] with strides of bt.
    let b = bt.as_tensor().transpose(2, 3).unwrap();
    let r = randn(32, &[3, 4, 5, 7]);
    let y = scoreguide_kernels::batched_matmul(a.as_tensor(), &b).unwrap();
    let y_ref = a.as_tensor().matmul(&b.contiguous().unwrap()).unwrap();
    assert!(max_abs_diff(&y, &y_ref) < 1e-5);
    let vars = [a.as_tensor(), bt.as_tensor()];
    let g = weighted_sum_gradients(&y, &r, &vars);
    let g_ref = weighted_sum_gradients(&y_ref, &r, &vars);
    for (x, e) in g.iter().zip(&g_ref) {
        assert!(max_abs_diff(x, e) < 1e-4, "{}", max_abs_diff(x, e));
    }
    // Permuted batch dimensions (non-contiguous batches).
    let p = randn(33, &[4, 3, 5, 6]).transpose(0, 1).unwrap();
    let q = randn(34, &[3, 4, 6, 2]);
    let y = scoreguide_kernels::batched_matmul(&p, &q).unwrap();
    assert!(max_abs_diff(&y, &p.contiguous().unwrap().matmul(&q).unwrap()) < 1e-5);
    assert!(scoreguide_kernels::batched_matmul(&p, &randn(1, &[3, 4, 5, 2])).is_err());
}

/// Relative attention by its definition, on `[B, h, A, A, d]` tensors.
fn relative_attention_reference(q: &Tensor, k: &Tensor, v: &Tensor, rel: &Tensor) -> Tensor {
    let d = q.dim(3).unwrap();
    let part = |i: usize| rel.narrow(3, i * d, d).unwrap().unsqueeze(1).unwrap();
    let (qr, kr, vr) = (part(0), part(1), part(2));
    let qi = q.unsqueeze(3).unwrap().broadcast_add(&qr).unwrap();
    let kj = k.unsqueeze(2).unwrap().broadcast_add(&kr).unwrap();
    let scores = ((qi * kj).unwrap().sum(4).unwrap() / (d as f64).sqrt()).unwrap();
    let w = candle_nn::ops::softmax(&scores, candle_core::D::Minus1).unwrap();
    let values = v.unsqueeze(2).unwrap().broadcast_add(&vr).unwrap();
    w.unsqueeze(4)
        .unwrap()
        .broadcast_mul(&values)
        .unwrap()
        .sum(3)
        .unwrap()
}

/// Heads `[B, h, A, d]` of the packed rows `[B, A, 3·h·d]` (part 0, 1, 2: q, k, v).
fn heads_of(qkv: &Tensor, part: usize, h: usize) -> Tensor {
    let (b, a, h3) = qkv.dims3().unwrap();
    let d = h3 / (3 * h);
    qkv.narrow(2, part * h * d, h * d)
        .unwrap()
        .reshape((b, a, h, d))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
}

#[test]
fn relative_attention_matches_its_definition_with_gradients() {
    // A small batch, and one large enough for the batch to be split between threads.
    for (b, h, a, d, dtype) in [
        (2, 3, 5, 4, DType::F32),
        (2, 3, 5, 4, DType::F64),
        (128, 4, 12, 16, DType::F32),
    ] {
        let var = |seed, shape: &[usize]| {
            Var::from_tensor(&randn(seed, shape).to_dtype(dtype).unwrap()).unwrap()
        };
        let qkv = var(40, &[b, a, 3 * h * d]);
        let rel = var(43, &[b, a, a, 3 * d]);
        let r = randn(44, &[b, a, h * d]).to_dtype(dtype).unwrap();
        let y =
            scoreguide_kernels::relative_attention(qkv.as_tensor(), rel.as_tensor(), h).unwrap();
        let [q, k, v] = [0, 1, 2].map(|i| heads_of(qkv.as_tensor(), i, h));
        let y_ref = relative_attention_reference(&q, &k, &v, rel.as_tensor())
            .transpose(1, 2)
            .unwrap()
            .reshape((b, a, h * d))
            .unwrap();
        assert_eq!(y.dims(), &[b, a, h * d]);
        assert!(max_abs_diff(&y, &y_ref) < 1e-5, "{dtype:?}");
        let vars = [qkv.as_tensor(), rel.as_tensor()];
        let g = weighted_sum_gradients(&y, &r, &vars);
        let g_ref = weighted_sum_gradients(&y_ref, &r, &vars);
        for ((x, e), what) in g.iter().zip(&g_ref).zip(["qkv", "rel"]) {
            assert!(
                max_abs_diff(x, e) < 1e-4,
                "{dtype:?} {what}: {}",
                max_abs_diff(x, e)
            );
        }
    }
    let err = scoreguide_kernels::relative_attention(
        &randn(45, &[2, 5, 12]),
        &randn(46, &[2, 5, 5, 6]),
        3,
    )
    .unwrap_err();
    assert!(err.to_string().contains("3 heads"), "{err}");
}

#[test]
fn add_silu_broadcasts_one_row_per_group() {
    let h = Var::from_tensor(&randn(50, &[3, 7, 5])).unwrap();
    let t = Var::from_tensor(&randn(51, &[3, 1, 5])).unwrap();
    let r = randn(52, &[3, 7, 5]);
    let y = add_silu(h.as_tensor(), t.as_tensor()).unwrap();
    let y_ref = candle_nn::ops::silu(&h.as_tensor().broadcast_add(t.as_tensor()).unwrap()).unwrap();
    assert!(max_abs_diff(&y, &y_ref) < 1e-5);
    let vars = [h.as_tensor(), t.as_tensor()];
    let g = weighted_sum_gradients(&y, &r, &vars);
    let g_ref = weighted_sum_gradients(&y_ref, &r, &vars);
    for (a, e) in g.iter().zip(&g_ref) {
        let d = max_abs_diff(a, e);
        assert!(d < 1e-4, "{d}");
    }
}

#[test]
fn residual_mlp_op_checks_its_inputs_and_backs_up_twice() {
    use scoreguide_kernels::{res_mlp, ResMlpShape};
    let shape = ResMlpShape {
        in_dim: 2,
        hidden: 8,
        embedding: 4,
        out_dim: 3,
        blocks: 2,
    };
    let total: usize = shape.parameter_shapes().iter().map(|(r, c)| r * c).sum();
    let x = Var::from_tensor(&randn(60, &[5, 2])).unwrap();
    let emb = randn(61, &[5, 4]);
    let p = Var::from_tensor(&(randn(62, &[total]) * 0.3).unwrap()).unwrap();
    let y = res_mlp(x.as_tensor(), &emb, p.as_tensor(), shape).unwrap();
    assert_eq!(y.dims(), &[5, 3]);
    let loss = y.sqr().unwrap().sum_all().unwrap();
    let (g1, g2) = (loss.backward().unwrap(), loss.backward().unwrap());
    for v in [&x, &p] {
        assert_eq!(
            max_abs_diff(
                g1.get(v.as_tensor()).unwrap(),
                g2.get(v.as_tensor()).unwrap()
            ),
            0.0
        );
    }
    let short = randn(63, &[total - 1]);
    let err = res_mlp(x.as_tensor(), &emb, &short, shape).unwrap_err();
    assert!(err.to_string().contains("parameters"), "{err}");
}
