//! DLSM trains a classifier through its input gradient: the parameter gradient of
//! ‖∇x log p(y | x; σ)‖² for the noise-conditioned ResNet, on the fused f32 ops (whose
//! backward passes are themselves differentiable), matches candle's own ops in f64, and
//! reaches every parameter. Its own binary: `CANDLE_GRAD_DO_NOT_DETACH` is read once
//! per thread.

use candle_core::{DType, Device, Tensor, Var};
use rand::SeedableRng;
use scoreguide_guidance::{Cond, LogProb};
use scoreguide_nets::{ClassifierConfig, NetConfig, ParamStore, ResNetConfig, SinusoidalEmbedding};
use scoreguide_testing::{max_abs, max_abs_diff};

#[test]
fn second_order_gradients_match_candle_and_reach_every_parameter() {
    std::env::set_var("CANDLE_GRAD_DO_NOT_DETACH", "1");
    std::thread::spawn(|| {
        let cfg = ClassifierConfig::categorical(NetConfig::ResNet(ResNetConfig {
            channels: 1,
            size: 6,
            blocks: vec![1, 1],
            width: 8,
            classes: 3,
            noise_embedding: Some(SinusoidalEmbedding {
                dim: 8,
                max_freq: 10.0,
            }),
            groups: 2,
        }));
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let x = scoreguide_sde::randn(&mut rng, &[2, 36], &Device::Cpu).unwrap();
        let sigma = Tensor::new(&[0.3f32, 2.0], &Device::Cpu).unwrap();
        let cond = Cond::labels(Tensor::new(&[1u32, 2], &Device::Cpu).unwrap());
        let run = |dtype: DType| -> (ParamStore, Vec<(String, Tensor)>) {
            let store = ParamStore::new(4);
            let c = cfg.build(&store.var_builder(dtype, &Device::Cpu)).unwrap();
            let xv = Var::from_tensor(&x.to_dtype(dtype).unwrap()).unwrap();
            let lp = c
                .log_prob_with(xv.as_tensor(), &sigma.to_dtype(dtype).unwrap(), &cond)
                .unwrap();
            let gx = lp.sum_all().unwrap().backward().unwrap();
            let gx = gx.get(xv.as_tensor()).unwrap().clone();
            let g2 = gx.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            let grads = store
                .vars()
                .into_iter()
                .map(|(name, v)| {
                    let g = g2
                        .get(v.as_tensor())
                        .unwrap_or_else(|| panic!("no second-order gradient for {name}"));
                    (name, g.to_dtype(DType::F64).unwrap())
                })
                .collect();
            (store, grads)
        };
        let (store, fast) = run(DType::F32);
        let (_, reference) = run(DType::F64);
        for ((name, a), (_, e)) in fast.iter().zip(&reference) {
            let scale = max_abs(e).max(1e-6);
            assert!(
                max_abs_diff(a, e) < 2e-3 * scale,
                "{name}: {} of {scale}",
                max_abs_diff(a, e)
            );
        }
        let grads = fast.iter().map(|(_, g)| g.clone());
        for ((name, _), g) in store.vars().iter().zip(grads) {
            assert!(max_abs(&g) > 0.0, "{name} gets no second-order gradient");
        }
    })
    .join()
    .unwrap();
}
