//! With `CANDLE_GRAD_DO_NOT_DETACH` (DLSM's second-order loss), the fused ops' backward
//! passes are themselves differentiable: d/dW Σ ∂/∂x Σ y matches the composed ops.
//! Its own test binary: the variable is read once per thread and must not leak into
//! other tests.

use candle_core::{Device, Tensor, Var};
use scoreguide_kernels::{add_silu, dense, Act};
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
