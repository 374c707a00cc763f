//! With `CANDLE_GRAD_DO_NOT_DETACH` (DLSM's second-order loss), the fused ops' backward
//! passes are themselves differentiable: d/dW Σ ∂/∂x Σ y matches the composed ops.
//! Its own test binary: the variable is read once per thread and must not leak into
//! other tests.

use candle_core::{Device, Tensor, Var};
use scoreguide_kernels::{add_silu, conv2d, dense, group_norm, self_attention, Act, Conv2dSpec};
use scoreguide_testing::max_abs_diff;

#[test]
fn backward_of_the_backward_matches_composed_ops() {
    std::env::set_var("CANDLE_GRAD_DO_NOT_DETACH", "1");
    std::thread::spawn(|| {
        let dev = Device::Cpu;
        let x =
            Var::from_tensor(&Tensor::new(&[[0.3f32, -1.2, 0.5], [1.1, 0.4, -0.7]], &dev).unwrap())
                .unwrap();
        let w =
            Var::from_tensor(&Tensor::new(&[[0.2f32, -0.1, 0.4], [0.7, 0.3, -0.5]], &dev).unwrap())
                .unwrap();
        let b = Var::from_tensor(&Tensor::new(&[0.1f32, -0.2], &dev).unwrap()).unwrap();
        let t = Var::from_tensor(&Tensor::new(&[0.05f32, 0.3], &dev).unwrap()).unwrap();
        let second = |fused: bool| -> Vec<Tensor> {
            let y = if fused {
                add_silu(
                    &dense(x.as_tensor(), w.as_tensor(), b.as_tensor(), Act::Silu).unwrap(),
                    t.as_tensor(),
                )
                .unwrap()
            } else {
                let z = x
                    .as_tensor()
                    .matmul(&w.as_tensor().t().unwrap())
                    .unwrap()
                    .broadcast_add(b.as_tensor())
                    .unwrap();
                candle_nn::ops::silu(
                    &candle_nn::ops::silu(&z)
                        .unwrap()
                        .broadcast_add(t.as_tensor())
                        .unwrap(),
                )
                .unwrap()
            };
            let gx = y.sum_all().unwrap().backward().unwrap();
            let gx = gx.get(x.as_tensor()).unwrap().clone();
            let g2 = gx.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            [&w, &b, &t]
                .iter()
                .map(|v| {
                    g2.get(v.as_tensor())
                        .expect("second-order gradient")
                        .clone()
                })
                .collect()
        };
        let (a, e) = (second(true), second(false));
        for (a, e) in a.iter().zip(&e) {
            assert!(max_abs_diff(a, e) < 1e-5, "{a} vs {e}");
        }
    })
    .join()
    .unwrap();
}

/// The convolution's backward pass is made of its own ops, so DLSM's loss on a
/// convolutional classifier's input gradient differentiates on the fast path: the
/// gradient of ‖∂/∂x Σ r ⊙ SiLU(conv(x))‖² for kernel, bias and x matches candle's conv2d.
#[test]
fn convolution_backward_of_the_backward_matches_candle() {
    std::env::set_var("CANDLE_GRAD_DO_NOT_DETACH", "1");
    std::thread::spawn(|| {
        let dev = Device::Cpu;
        let fill = |n: usize, seed: f32| -> Vec<f32> {
            (0..n)
                .map(|i| ((i as f32 * 0.618 + seed).fract() - 0.5) * 1.5)
                .collect()
        };
        for spec in [
            Conv2dSpec::same(1),
            Conv2dSpec {
                stride: 2,
                padding: 1,
                upsample: 1,
            },
        ] {
            let x = Var::from_vec(fill(2 * 3 * 5 * 5, 0.1), (2, 3, 5, 5), &dev).unwrap();
            let k = Var::from_vec(fill(4 * 3 * 3 * 3, 0.3), (4, 3, 3, 3), &dev).unwrap();
            let b = Var::from_vec(fill(4, 0.7), 4, &dev).unwrap();
            let side = spec.output_side(5, 3).unwrap();
            let r =
                Tensor::from_vec(fill(2 * 4 * side * side, 0.9), (2, 4, side, side), &dev).unwrap();
            let second = |fast: bool| -> Vec<Tensor> {
                let y = if fast {
                    conv2d(x.as_tensor(), k.as_tensor(), Some(b.as_tensor()), spec).unwrap()
                } else {
                    x.as_tensor()
                        .conv2d(k.as_tensor(), spec.padding, spec.stride, 1, 1)
                        .unwrap()
                        .broadcast_add(&b.as_tensor().reshape((1, 4, 1, 1)).unwrap())
                        .unwrap()
                };
                let y = candle_nn::ops::silu(&y).unwrap();
                let gx = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
                let gx = gx.get(x.as_tensor()).unwrap().clone();
                let g2 = gx.sqr().unwrap().sum_all().unwrap().backward().unwrap();
                [&k, &b, &x]
                    .iter()
                    .map(|v| {
                        g2.get(v.as_tensor())
                            .expect("second-order gradient")
                            .clone()
                    })
                    .collect()
            };
            let (a, e) = (second(true), second(false));
            for (a, e) in a.iter().zip(&e) {
                let scale = 1.0 + scoreguide_testing::max_abs(e);
                assert!(max_abs_diff(a, e) < 1e-4 * scale, "{spec:?}: {a} vs {e}");
            }
        }
    })
    .join()
    .unwrap();
}

/// Group norm + SiLU under a second-order loss: its backward pass in candle's ops.
#[test]
fn group_norm_backward_of_the_backward_matches_candle() {
    std::env::set_var("CANDLE_GRAD_DO_NOT_DETACH", "1");
    std::thread::spawn(|| {
        let dev = Device::Cpu;
        let fill = |n: usize, seed: f32| -> Vec<f32> {
            (0..n)
                .map(|i| ((i as f32 * 0.618 + seed).fract() - 0.5) * 2.0)
                .collect()
        };
        let x = Var::from_vec(fill(2 * 4 * 3 * 3, 0.1), (2, 4, 3, 3), &dev).unwrap();
        let g = Var::from_vec(fill(4, 0.3), 4, &dev).unwrap();
        let b = Var::from_vec(fill(4, 0.7), 4, &dev).unwrap();
        let r = Tensor::from_vec(fill(72, 0.9), (2, 4, 3, 3), &dev).unwrap();
        let second = |fast: bool| -> Vec<Tensor> {
            let y = if fast {
                group_norm(x.as_tensor(), 2, g.as_tensor(), b.as_tensor(), 1e-5, true).unwrap()
            } else {
                let xg = x.as_tensor().reshape((2, 2, 18)).unwrap();
                let c = xg.broadcast_sub(&xg.mean_keepdim(2).unwrap()).unwrap();
                let v = c.sqr().unwrap().mean_keepdim(2).unwrap();
                let xh = c
                    .broadcast_div(&(v + 1e-5).unwrap().sqrt().unwrap())
                    .unwrap()
                    .reshape((2, 4, 9))
                    .unwrap();
                let z = xh
                    .broadcast_mul(&g.as_tensor().reshape((1, 4, 1)).unwrap())
                    .unwrap()
                    .broadcast_add(&b.as_tensor().reshape((1, 4, 1)).unwrap())
                    .unwrap();
                candle_nn::ops::silu(&z)
                    .unwrap()
                    .reshape((2, 4, 3, 3))
                    .unwrap()
            };
            let gx = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let gx = gx.get(x.as_tensor()).unwrap().clone();
            let g2 = gx.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            [&g, &b, &x]
                .iter()
                .map(|v| {
                    g2.get(v.as_tensor())
                        .expect("second-order gradient")
                        .clone()
                })
                .collect()
        };
        let (a, e) = (second(true), second(false));
        for (a, e) in a.iter().zip(&e) {
            let scale = 1.0 + scoreguide_testing::max_abs(e);
            assert!(max_abs_diff(a, e) < 1e-4 * scale, "{a} vs {e}");
        }
    })
    .join()
    .unwrap();
}

/// A dense layer on a batched (3-D) input and masked self-attention under a second-order
/// loss: the gradient of ‖∂/∂x Σ r ⊙ attention(dense(x))‖² for W and x matches the same
/// written with candle's ops.
#[test]
fn batched_dense_and_attention_backward_of_the_backward_match_candle() {
    std::env::set_var("CANDLE_GRAD_DO_NOT_DETACH", "1");
    std::thread::spawn(|| {
        let dev = Device::Cpu;
        let fill = |n: usize, seed: f32| -> Vec<f32> {
            (0..n)
                .map(|i| ((i as f32 * 0.618 + seed).fract() - 0.5) * 2.0)
                .collect()
        };
        let (b, n, heads, d) = (2, 4, 2, 3);
        let hid = heads * d;
        let x = Var::from_vec(fill(b * n * hid, 0.1), (b, n, hid), &dev).unwrap();
        let w = Var::from_vec(fill(3 * hid * hid, 0.3), (3 * hid, hid), &dev).unwrap();
        let bias = Tensor::zeros(3 * hid, candle_core::DType::F32, &dev).unwrap();
        let mask =
            Tensor::from_vec(vec![0f32, 0.0, 0.0, -1e9, 0.0, 0.0, 0.0, 0.0], (b, n), &dev).unwrap();
        let r = Tensor::from_vec(fill(b * n * hid, 0.7), (b, n, hid), &dev).unwrap();
        let second = |fused: bool| -> Vec<Tensor> {
            let y = if fused {
                let qkv = dense(x.as_tensor(), w.as_tensor(), &bias, Act::Identity).unwrap();
                self_attention(&qkv, heads, Some(&mask)).unwrap()
            } else {
                let qkv = x
                    .as_tensor()
                    .broadcast_matmul(&w.as_tensor().t().unwrap())
                    .unwrap();
                let heads_out: Vec<Tensor> = (0..heads)
                    .map(|h| {
                        let part = |i: usize| qkv.narrow(2, i * hid + h * d, d).unwrap();
                        let s = (part(0).matmul(&part(1).t().unwrap()).unwrap()
                            / (d as f64).sqrt())
                        .unwrap()
                        .broadcast_add(&mask.unsqueeze(1).unwrap())
                        .unwrap();
                        candle_nn::ops::softmax(&s, candle_core::D::Minus1)
                            .unwrap()
                            .matmul(&part(2))
                            .unwrap()
                    })
                    .collect();
                Tensor::cat(&heads_out, 2).unwrap()
            };
            let gx = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let gx = gx.get(x.as_tensor()).unwrap().clone();
            let g2 = gx.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            [&w, &x]
                .iter()
                .map(|v| {
                    g2.get(v.as_tensor())
                        .expect("second-order gradient")
                        .clone()
                })
                .collect()
        };
        let (a, e) = (second(true), second(false));
        for (a, e) in a.iter().zip(&e) {
            let scale = 1.0 + scoreguide_testing::max_abs(e);
            assert!(max_abs_diff(a, e) < 1e-4 * scale, "{a} vs {e}");
        }
    })
    .join()
    .unwrap();
}
