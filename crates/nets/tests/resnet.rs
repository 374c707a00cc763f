//! The ResNet classifier: shapes, the noise branch (and its absence), the fused f32
//! path against candle's ops in f64 for logits and ∇x log p(y | x), a categorical
//! classifier as a guidance term, config errors, and a short training that learns.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::Optimizer;
use rand::SeedableRng;
use scoreguide_guidance::{Cond, LogProb};
use scoreguide_nets::{
    ClassifierConfig, NetConfig, NoiseNet, ParamStore, ResNet, ResNetConfig, SinusoidalEmbedding,
};
use scoreguide_sde::randn;
use scoreguide_testing::{max_abs, max_abs_diff};

fn tiny(noise: bool) -> ResNetConfig {
    ResNetConfig {
        channels: 2,
        size: 8,
        blocks: vec![1, 1, 1],
        width: 8,
        classes: 3,
        noise_embedding: noise.then_some(SinusoidalEmbedding {
            dim: 16,
            max_freq: 100.0,
        }),
        groups: 4,
    }
}

fn inputs(b: usize, dim: usize) -> (Tensor, Tensor) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    let x = randn(&mut rng, &[b, dim], &Device::Cpu).unwrap();
    let c = Tensor::from_vec(
        (0..b).map(|i| 0.3 * i as f32 - 0.5).collect::<Vec<_>>(),
        b,
        &Device::Cpu,
    )
    .unwrap();
    (x, c)
}

#[test]
fn logits_per_image_and_the_noise_branch() {
    for noise in [true, false] {
        let cfg = tiny(noise);
        let store = ParamStore::new(1);
        let net = ResNet::new(cfg.clone(), store.var_builder(DType::F32, &Device::Cpu)).unwrap();
        let (x, c) = inputs(4, cfg.in_dim());
        let y = net.forward(&x, &c, &Cond::none()).unwrap();
        assert_eq!(y.dims(), &[4, 3]);
        let y4 = net
            .forward(&x.reshape((4, 2, 8, 8)).unwrap(), &c, &Cond::none())
            .unwrap();
        assert_eq!(max_abs_diff(&y, &y4), 0.0);
        let other = (c.clone() + 1.0).unwrap();
        let moved = max_abs_diff(&y, &net.forward(&x, &other, &Cond::none()).unwrap());
        match noise {
            true => assert!(moved > 1e-5, "the noise level changes the logits"),
            false => assert_eq!(
                moved, 0.0,
                "a noise-free classifier ignores the noise level"
            ),
        }
    }
    // ResNet-18 at the paper's width on CIFAR-size images, and ResNet-34.
    let count = |cfg: ResNetConfig| {
        let store = ParamStore::new(0);
        ResNet::new(cfg, store.var_builder(DType::F32, &Device::Cpu)).unwrap();
        store.num_params()
    };
    let r18 = count(ResNetConfig::resnet18(3, 32, 10, 64).noise_free());
    let r34 = count(ResNetConfig::resnet34(3, 32, 10, 64).noise_free());
    assert!((11_000_000..11_300_000).contains(&r18), "ResNet-18: {r18}");
    assert!((21_100_000..21_400_000).contains(&r34), "ResNet-34: {r34}");
}

#[test]
fn fused_f32_path_matches_candle_ops_in_f64() {
    let cfg = ClassifierConfig::categorical(NetConfig::ResNet(tiny(true)));
    let (s32, s64) = (ParamStore::new(3), ParamStore::new(3));
    let c32 = cfg
        .build(&s32.var_builder(DType::F32, &Device::Cpu))
        .unwrap();
    let c64 = cfg
        .build(&s64.var_builder(DType::F64, &Device::Cpu))
        .unwrap();
    let (x, _) = inputs(3, 128);
    let sigma = Tensor::new(&[0.1f32, 1.0, 5.0], &Device::Cpu).unwrap();
    let cond = Cond::labels(Tensor::new(&[0u32, 2, 1], &Device::Cpu).unwrap());
    let run = |c: &scoreguide_nets::Classifier, dtype: DType| {
        let xv = Var::from_tensor(&x.to_dtype(dtype).unwrap()).unwrap();
        let lp = c
            .log_prob_with(xv.as_tensor(), &sigma.to_dtype(dtype).unwrap(), &cond)
            .unwrap();
        let g = lp.sum_all().unwrap().backward().unwrap();
        let gx = g.get(xv.as_tensor()).unwrap().to_dtype(DType::F64).unwrap();
        (lp.to_dtype(DType::F64).unwrap(), gx)
    };
    let ((l32, g32), (l64, g64)) = (run(&c32, DType::F32), run(&c64, DType::F64));
    assert!(max_abs_diff(&l32, &l64) < 1e-4 * (1.0 + max_abs(&l64)));
    assert!(
        max_abs_diff(&g32, &g64) < 1e-4 * max_abs(&g64),
        "∇x log p: {}",
        max_abs_diff(&g32, &g64)
    );
    // Guidance without labels is refused, naming what is missing.
    let err = c32
        .log_prob_with(&x, &sigma, &Cond::none())
        .unwrap_err()
        .to_string();
    assert!(err.contains("label"), "{err}");
}

#[test]
fn bad_configs_and_inputs_are_named_errors() {
    let store = ParamStore::new(0);
    let vb = store.var_builder(DType::F32, &Device::Cpu);
    let err = |cfg: ResNetConfig| ResNet::new(cfg, vb.clone()).err().unwrap().to_string();
    assert!(err(ResNetConfig {
        blocks: vec![2, 0],
        ..tiny(true)
    })
    .contains("at least one block"));
    assert!(err(ResNetConfig {
        classes: 0,
        ..tiny(true)
    })
    .contains("positive"));
    let net = ResNet::new(tiny(false), vb.clone()).unwrap();
    let (x, c) = inputs(2, 128);
    let e = net
        .forward(&x.narrow(1, 0, 64).unwrap(), &c, &Cond::none())
        .unwrap_err()
        .to_string();
    assert!(e.contains("[batch, 128]"), "{e}");
}

#[test]
fn a_short_training_separates_two_patterns() {
    // Noise-free ResNet on stripes across (class 0) or down (class 1), random contrast
    // and noise: cross-entropy falls and every training image is classified right.
    let cfg = ResNetConfig {
        channels: 1,
        classes: 2,
        ..tiny(false)
    };
    let dev = Device::Cpu;
    let store = ParamStore::new(5);
    let net = ResNet::new(cfg, store.var_builder(DType::F32, &dev)).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(6);
    let noise = randn(&mut rng, &[32, 64], &dev).unwrap();
    let clean: Vec<f32> = (0..32)
        .flat_map(|i| {
            (0..64).map(move |p| {
                let (r, c) = (p / 8, p % 8);
                let on = if i % 2 == 0 { r % 2 == 0 } else { c % 2 == 0 };
                if on {
                    1.0
                } else {
                    -1.0
                }
            })
        })
        .collect();
    let x = (Tensor::from_vec(clean, (32, 64), &dev).unwrap() + (noise * 0.3).unwrap()).unwrap();
    let labels = Tensor::from_vec((0..32u32).map(|i| i % 2).collect::<Vec<_>>(), 32, &dev).unwrap();
    let c = Tensor::zeros(32, DType::F32, &dev).unwrap();
    let loss = |net: &ResNet| {
        let logits = net.forward(&x, &c, &Cond::none()).unwrap();
        candle_nn::loss::cross_entropy(&logits, &labels).unwrap()
    };
    let start = loss(&net).to_scalar::<f32>().unwrap();
    let vars = store.vars().into_iter().map(|(_, v)| v).collect();
    let mut opt = candle_nn::AdamW::new(
        vars,
        candle_nn::ParamsAdamW {
            lr: 3e-3,
            weight_decay: 0.0,
            ..Default::default()
        },
    )
    .unwrap();
    for _ in 0..30 {
        opt.backward_step(&loss(&net)).unwrap();
    }
    let end = loss(&net).to_scalar::<f32>().unwrap();
    let predicted = net
        .forward(&x, &c, &Cond::none())
        .unwrap()
        .argmax(1)
        .unwrap();
    let right = predicted
        .eq(&labels)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        end < 0.2 * start && right == 32.0,
        "loss {start} → {end}, {right}/32 right"
    );
}
