//! The image U-Net: shapes (rows and images, pooled), the fused f32 path against
//! candle's own ops in f64, gradients for every parameter, deterministic dropout, class
//! labels, config errors, rebuilding from its config, and a short training that learns.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::Optimizer;
use rand::SeedableRng;
use scoreguide_guidance::Cond;
use scoreguide_losses::{dsm, DsmWeighting};
use scoreguide_nets::{
    NetConfig, NoiseNet, ParamStore, Precond, ScoreModelConfig, SinusoidalEmbedding, UNet,
    UNetConfig, UNetOutput,
};
use scoreguide_sde::randn;
use scoreguide_testing::{max_abs, max_abs_diff};

/// Two levels (8 × 8 and 4 × 4), attention at 4 × 4, 2 heads.
fn tiny() -> UNetConfig {
    UNetConfig {
        channels: 2,
        size: 8,
        base_channels: 8,
        multipliers: vec![1, 2],
        blocks_per_level: 1,
        attention_resolutions: vec![4],
        heads: 2,
        dropout: 0.0,
        groups: 4,
        embedding: SinusoidalEmbedding {
            dim: 16,
            max_freq: 100.0,
        },
        classes: 0,
        output: UNetOutput::Image,
    }
}

/// Moves every parameter off its initial value (the zero-initialised last convolutions
/// would otherwise hide the paths behind them).
fn perturb(store: &ParamStore, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for (_, v) in store.vars() {
        let noise = randn(&mut rng, v.dims(), &Device::Cpu)
            .unwrap()
            .to_dtype(v.dtype())
            .unwrap();
        v.set(&(v.as_tensor() + (noise * 0.2).unwrap()).unwrap())
            .unwrap();
    }
}

fn build(cfg: &UNetConfig, dtype: DType, seed: u64) -> (ParamStore, UNet) {
    let store = ParamStore::new(seed);
    let net = UNet::new(cfg.clone(), store.var_builder(dtype, &Device::Cpu)).unwrap();
    perturb(&store, seed + 100);
    (store, net)
}

fn inputs(b: usize, cfg: &UNetConfig) -> (Tensor, Tensor) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let x = randn(&mut rng, &[b, cfg.in_dim()], &Device::Cpu).unwrap();
    let c = Tensor::from_vec(
        (0..b).map(|i| -1.0 + 0.5 * i as f32).collect::<Vec<_>>(),
        b,
        &Device::Cpu,
    )
    .unwrap();
    (x, c)
}

#[test]
fn outputs_have_the_input_shape_or_are_pooled() {
    let cfg = tiny();
    let (_, net) = build(&cfg, DType::F32, 1);
    let (x, c) = inputs(3, &cfg);
    let y = net.forward(&x, &c, &Cond::none()).unwrap();
    assert_eq!(y.dims(), &[3, 128]);
    let images = x.reshape((3, 2, 8, 8)).unwrap();
    let y4 = net.forward(&images, &c, &Cond::none()).unwrap();
    assert_eq!(y4.dims(), &[3, 2, 8, 8]);
    assert_eq!(max_abs_diff(&y4.flatten_from(1).unwrap(), &y), 0.0);

    let pooled = NetConfig::UNet(cfg.clone()).with_outputs(5);
    assert_eq!(pooled.out_dim(), 5);
    let store = ParamStore::new(1);
    let classifier = pooled
        .build(&store.var_builder(DType::F32, &Device::Cpu))
        .unwrap();
    assert_eq!(
        classifier.forward(&x, &c, &Cond::none()).unwrap().dims(),
        &[3, 5]
    );
    // The classifier is the encoder half: fewer parameters than the whole network.
    let whole = ParamStore::new(1);
    NetConfig::UNet(cfg)
        .build(&whole.var_builder(DType::F32, &Device::Cpu))
        .unwrap();
    assert!(store.num_params() < whole.num_params());
}

#[test]
fn fused_f32_path_matches_candle_ops_in_f64() {
    // f64 takes candle's conv2d, group norm from basic ops and candle's matmuls; f32 the
    // fused kernels. Same seed, same parameters.
    let cfg = tiny();
    let (_, n32) = build(&cfg, DType::F32, 2);
    let (_, n64) = build(&cfg, DType::F64, 2);
    let (x, c) = inputs(2, &cfg);
    let run = |net: &UNet, dtype: DType| -> (Tensor, Tensor) {
        let xv = Var::from_tensor(&x.to_dtype(dtype).unwrap()).unwrap();
        let y = net
            .forward(xv.as_tensor(), &c.to_dtype(dtype).unwrap(), &Cond::none())
            .unwrap();
        let r = (x.to_dtype(dtype).unwrap() * 0.3).unwrap().cos().unwrap();
        let g = (&y * r).unwrap().sum_all().unwrap().backward().unwrap();
        let gx = g.get(xv.as_tensor()).unwrap().to_dtype(DType::F64).unwrap();
        (y.to_dtype(DType::F64).unwrap(), gx)
    };
    let (y32, g32) = run(&n32, DType::F32);
    let (y64, g64) = run(&n64, DType::F64);
    let rel = |a: &Tensor, e: &Tensor| max_abs_diff(a, e) / max_abs(e);
    assert!(rel(&y32, &y64) < 1e-4, "output: {}", rel(&y32, &y64));
    assert!(
        rel(&g32, &g64) < 1e-4,
        "input gradient: {}",
        rel(&g32, &g64)
    );
}

#[test]
fn every_parameter_gets_a_gradient() {
    let cfg = UNetConfig {
        dropout: 0.1,
        classes: 3,
        ..tiny()
    };
    let model = ScoreModelConfig {
        net: NetConfig::UNet(cfg.clone()),
        precond: Precond::edm(),
    };
    let store = ParamStore::new(3);
    let score = model
        .build(&store.var_builder(DType::F32, &Device::Cpu))
        .unwrap();
    perturb(&store, 4);
    let (x0, _) = inputs(4, &cfg);
    let z = (x0.clone() * 0.7).unwrap().sin().unwrap();
    let sigma = Tensor::new(&[0.05f32, 0.5, 2.0, 20.0], &Device::Cpu).unwrap();
    let cond = Cond::labels(Tensor::new(&[0u32, 1, 2, 1], &Device::Cpu).unwrap());
    let loss = dsm(&score, &x0, &sigma, &z, &cond, DsmWeighting::SigmaSquared).unwrap();
    scoreguide_testing::assert_all_nonzero(&store.vars(), &loss.backward().unwrap(), "U-Net");
}

#[test]
fn dropout_masks_depend_on_the_batch_only() {
    let cfg = UNetConfig {
        dropout: 0.5,
        ..tiny()
    };
    let (_, net) = build(&cfg, DType::F32, 5);
    let (x, c) = inputs(2, &cfg);
    let a = net.forward(&x, &c, &Cond::none()).unwrap();
    let b = net.forward(&x, &c, &Cond::none()).unwrap();
    assert_eq!(max_abs_diff(&a, &b), 0.0, "same batch, same masks");
    let (_, no_dropout) = build(&tiny(), DType::F32, 5);
    let d = no_dropout.forward(&x, &c, &Cond::none()).unwrap();
    assert!(
        max_abs_diff(&a, &d) > 1e-3,
        "dropout changes a training forward pass"
    );
    // Frozen weights (a loaded model) never drop.
    let store = ParamStore::new(5);
    UNet::new(cfg.clone(), store.var_builder(DType::F32, &Device::Cpu)).unwrap();
    perturb(&store, 105);
    let frozen = UNet::new(
        cfg,
        store.frozen_var_builder(DType::F32, &Device::Cpu).unwrap(),
    )
    .unwrap();
    let f = frozen.forward(&x, &c, &Cond::none()).unwrap();
    assert!(max_abs_diff(&f, &d) < 1e-5, "{}", max_abs_diff(&f, &d));
}

#[test]
fn class_labels_condition_the_output() {
    let cfg = UNetConfig {
        classes: 3,
        ..tiny()
    };
    let (_, net) = build(&cfg, DType::F32, 6);
    let (x, c) = inputs(2, &cfg);
    let with = |labels: &[u32]| {
        let cond = Cond::labels(Tensor::new(labels, &Device::Cpu).unwrap());
        net.forward(&x, &c, &cond)
    };
    let (a, b) = (with(&[0, 0]).unwrap(), with(&[0, 2]).unwrap());
    assert_eq!(
        max_abs_diff(&a.narrow(0, 0, 1).unwrap(), &b.narrow(0, 0, 1).unwrap()),
        0.0
    );
    assert!(max_abs_diff(&a.narrow(0, 1, 1).unwrap(), &b.narrow(0, 1, 1).unwrap()) > 1e-4);
    assert!(with(&[0, 3])
        .unwrap_err()
        .to_string()
        .contains("out of range"));
    let missing = net.forward(&x, &c, &Cond::none()).unwrap_err().to_string();
    assert!(missing.contains("labels"), "{missing}");
}

#[test]
fn bad_configs_and_inputs_are_named_errors() {
    let store = ParamStore::new(0);
    let vb = store.var_builder(DType::F32, &Device::Cpu);
    let err = |cfg: UNetConfig| UNet::new(cfg, vb.clone()).err().unwrap().to_string();
    assert!(err(UNetConfig { size: 7, ..tiny() }).contains("multiple of 2"));
    assert!(err(UNetConfig { heads: 3, ..tiny() }).contains("heads"));
    assert!(err(UNetConfig {
        dropout: 1.0,
        ..tiny()
    })
    .contains("dropout"));
    assert!(err(UNetConfig {
        multipliers: vec![],
        ..tiny()
    })
    .contains("multipliers"));
    let (_, net) = build(&tiny(), DType::F32, 7);
    let (x, c) = inputs(2, &tiny());
    let wrong = x.narrow(1, 0, 100).unwrap();
    assert!(net
        .forward(&wrong, &c, &Cond::none())
        .unwrap_err()
        .to_string()
        .contains("[batch, 128]"));
    let c3 = Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap();
    assert!(net
        .forward(&x, &c3, &Cond::none())
        .unwrap_err()
        .to_string()
        .contains("noise condition"));
}

#[test]
fn the_config_rebuilds_the_same_network() {
    let cfg = ScoreModelConfig {
        net: NetConfig::UNet(UNetConfig::small_grey()),
        precond: Precond::edm(),
    };
    let json = serde_json::to_string(&cfg).unwrap();
    assert!(json.contains("\"arch\":\"unet\""), "{json}");
    let back: ScoreModelConfig = serde_json::from_str(&json).unwrap();
    assert_eq!(back, cfg);
    let (a, b) = (ParamStore::new(0), ParamStore::new(0));
    cfg.build(&a.var_builder(DType::F32, &Device::Cpu)).unwrap();
    back.build(&b.var_builder(DType::F32, &Device::Cpu))
        .unwrap();
    let names = |s: &ParamStore| {
        s.vars()
            .into_iter()
            .map(|(n, v)| (n, v.dims().to_vec()))
            .collect::<Vec<_>>()
    };
    assert_eq!(names(&a), names(&b));
    assert!(a.num_params() > 1_000_000, "{}", a.num_params());
}

#[test]
fn a_short_training_lowers_the_denoising_loss() {
    // Images of one of two patterns (stripes across or down) with random contrast: after
    // 60 Adam steps the EDM-weighted DSM loss at fixed noise has fallen well below its
    // start.
    let cfg = UNetConfig {
        channels: 1,
        ..tiny()
    };
    let model = ScoreModelConfig {
        net: NetConfig::UNet(cfg.clone()),
        precond: Precond::edm(),
    };
    let store = ParamStore::new(11);
    let dev = Device::Cpu;
    let score = model.build(&store.var_builder(DType::F32, &dev)).unwrap();
    let images: Vec<f32> = (0..32)
        .flat_map(|i| {
            let contrast = 0.5 + 0.5 * ((i * 7 % 11) as f32 / 11.0);
            (0..64).map(move |p| {
                let (r, c) = (p / 8, p % 8);
                let on = if i % 2 == 0 { r % 2 == 0 } else { c % 2 == 0 };
                if on {
                    contrast
                } else {
                    -contrast
                }
            })
        })
        .collect();
    let x0 = Tensor::from_vec(images, (32, 64), &dev).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(12);
    let z = randn(&mut rng, &[32, 64], &dev).unwrap();
    let sigma = Tensor::from_vec(
        (0..32)
            .map(|i| 0.1 + 0.1 * (i % 8) as f32)
            .collect::<Vec<_>>(),
        32,
        &dev,
    )
    .unwrap();
    let loss = |score: &dyn scoreguide_guidance::Score| {
        dsm(
            score,
            &x0,
            &sigma,
            &z,
            &Cond::none(),
            DsmWeighting::Edm { sigma_data: 1.0 },
        )
        .unwrap()
    };
    let start = loss(&score).to_scalar::<f32>().unwrap();
    let vars: Vec<Var> = store.vars().into_iter().map(|(_, v)| v).collect();
    let mut opt = candle_nn::AdamW::new(
        vars,
        candle_nn::ParamsAdamW {
            lr: 2e-3,
            weight_decay: 0.0,
            ..Default::default()
        },
    )
    .unwrap();
    for step in 0..60 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(100 + step);
        let z = randn(&mut rng, &[32, 64], &dev).unwrap();
        let l = dsm(
            &score,
            &x0,
            &sigma,
            &z,
            &Cond::none(),
            DsmWeighting::Edm { sigma_data: 1.0 },
        )
        .unwrap();
        opt.backward_step(&l).unwrap();
    }
    let end = loss(&score).to_scalar::<f32>().unwrap();
    assert!(end < 0.5 * start, "loss {start} → {end}");
}
