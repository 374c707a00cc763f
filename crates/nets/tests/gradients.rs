//! Every parameter of every network receives a non-zero gradient (fused candle ops
//! without a backward pass would silently drop some), and gradients agree with finite
//! differences.

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use scoreguide_guidance::Cond;
use scoreguide_guidance::Score;
use scoreguide_losses::{dsm, DsmWeighting};
use scoreguide_nets::{
    NetConfig, NoiseNet, ParamStore, Precond, ResMlp, ResMlpConfig, ScoreModelConfig,
};
use scoreguide_sde::randn;
use scoreguide_sde::Process;

fn inputs(dev: &Device) -> (Tensor, Tensor, Tensor) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let x0 = randn(&mut rng, &[16, 2], dev).unwrap();
    let z = randn(&mut rng, &[16, 2], dev).unwrap();
    let sigma = Tensor::from_vec(
        (0..16).map(|i| 0.01 * 1.6f32.powi(i)).collect::<Vec<_>>(),
        16,
        dev,
    )
    .unwrap();
    (x0, z, sigma)
}

#[test]
fn every_score_model_parameter_gets_a_gradient() {
    let dev = Device::Cpu;
    let (x0, z, sigma) = inputs(&dev);
    let preconds = [
        Precond::edm(),
        Precond::Eps {
            process: Process::vp(0.1, 20.0),
        },
        Precond::X0 {
            process: Process::ve(0.01, 50.0),
        },
        Precond::Score {
            process: Process::ddpm_cosine(1000).unwrap(),
        },
        Precond::Eps {
            process: Process::sub_vp(0.1, 20.0),
        },
    ];
    for precond in preconds {
        let cfg = ScoreModelConfig {
            net: NetConfig::ResMlp(ResMlpConfig::default()),
            precond: precond.clone(),
        };
        let store = ParamStore::new(1);
        let model = cfg.build(&store.var_builder(DType::F32, &dev)).unwrap();
        let loss = dsm(
            &model,
            &x0,
            &sigma,
            &z,
            &Cond::none(),
            DsmWeighting::SigmaSquared,
        )
        .unwrap();
        scoreguide_testing::assert_all_nonzero(
            &store.vars(),
            &loss.backward().unwrap(),
            &format!("{precond:?}"),
        );
    }
}

#[test]
fn every_classifier_parameter_gets_a_gradient() {
    let dev = Device::Cpu;
    let (x0, _, sigma) = inputs(&dev);
    let store = ParamStore::new(2);
    let net = ResMlp::new(
        ResMlpConfig {
            out_dim: 1,
            ..Default::default()
        },
        store.var_builder(DType::F32, &dev),
    )
    .unwrap();
    let logits = net
        .forward(&x0, &sigma.log().unwrap(), &Cond::none())
        .unwrap();
    assert_eq!(logits.dims(), &[16, 1]);
    let loss = candle_nn::ops::sigmoid(&logits)
        .unwrap()
        .log()
        .unwrap()
        .mean_all()
        .unwrap();
    scoreguide_testing::assert_all_nonzero(&store.vars(), &loss.backward().unwrap(), "classifier");
}

#[test]
fn parameter_and_input_gradients_match_finite_differences() {
    let dev = Device::Cpu;
    let (x0, z, sigma) = inputs(&dev);
    let (x0, z, sigma) = (
        x0.to_dtype(DType::F64).unwrap(),
        z.to_dtype(DType::F64).unwrap(),
        sigma.to_dtype(DType::F64).unwrap(),
    );
    let cfg = ScoreModelConfig::checkerboard();
    let store = ParamStore::new(4);
    let model = cfg.build(&store.var_builder(DType::F64, &dev)).unwrap();
    let loss_of = || {
        dsm(
            &model,
            &x0,
            &sigma,
            &z,
            &Cond::none(),
            DsmWeighting::Edm { sigma_data: 1.0 },
        )
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
    };
    let loss = dsm(
        &model,
        &x0,
        &sigma,
        &z,
        &Cond::none(),
        DsmWeighting::Edm { sigma_data: 1.0 },
    )
    .unwrap();
    let grads = loss.backward().unwrap();
    for (name, var) in store
        .vars()
        .into_iter()
        .filter(|(n, _)| n.ends_with("weight"))
    {
        let g = scoreguide_testing::flat_f64(grads.get(var.as_tensor()).unwrap());
        let orig = scoreguide_testing::flat_f64(var.as_tensor());
        let k = g
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
            .unwrap()
            .0;
        let h = 1e-6;
        let mut plus = orig.clone();
        plus[k] += h;
        var.set(&Tensor::from_vec(plus, var.shape(), &dev).unwrap())
            .unwrap();
        let lp = loss_of();
        let mut minus = orig.clone();
        minus[k] -= h;
        var.set(&Tensor::from_vec(minus, var.shape(), &dev).unwrap())
            .unwrap();
        let lm = loss_of();
        var.set(&Tensor::from_vec(orig, var.shape(), &dev).unwrap())
            .unwrap();
        let fd = (lp - lm) / (2.0 * h);
        assert!(
            (fd - g[k]).abs() <= 1e-5 * (1.0 + g[k].abs()),
            "`{name}`[{k}]: autograd {} vs finite difference {fd}",
            g[k]
        );
    }
    // ∇x of the score network's output (what guidance relies on).
    let xv = candle_core::Var::from_tensor(&x0).unwrap();
    let out = model
        .score(xv.as_tensor(), &sigma)
        .unwrap()
        .sum_all()
        .unwrap();
    let gx = out
        .backward()
        .unwrap()
        .get(xv.as_tensor())
        .unwrap()
        .to_vec2::<f64>()
        .unwrap();
    let f = |x: &Tensor| {
        model
            .score(x, &sigma)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let h = 1e-6;
    let mut xs = x0.to_vec2::<f64>().unwrap();
    for (i, j) in [(0, 0), (5, 1), (15, 0)] {
        xs[i][j] += h;
        let fp = f(&Tensor::new(xs.clone(), &dev).unwrap());
        xs[i][j] -= 2.0 * h;
        let fm = f(&Tensor::new(xs.clone(), &dev).unwrap());
        xs[i][j] += h;
        let fd = (fp - fm) / (2.0 * h);
        assert!(
            (fd - gx[i][j]).abs() <= 1e-4 * (1.0 + fd.abs()),
            "∇x[{i}][{j}]: {} vs {fd}",
            gx[i][j]
        );
    }
}

#[test]
fn hand_written_classifier_input_gradient_matches_autograd() {
    use scoreguide_guidance::LogProb;
    use scoreguide_nets::ClassifierConfig;
    let dev = Device::Cpu;
    let (x, _, sigma) = inputs(&dev);
    let store = ParamStore::new(7);
    // Create the parameters, then build the frozen classifier guidance uses.
    ClassifierConfig::checkerboard()
        .build(&store.var_builder(DType::F32, &dev))
        .unwrap();
    let clf = ClassifierConfig::checkerboard()
        .build(&store.frozen_var_builder(DType::F32, &dev).unwrap())
        .unwrap();
    let fast = clf
        .input_gradient(&x, &sigma, &Cond::none())
        .unwrap()
        .expect("the residual MLP has a hand-written gradient");
    let xv = candle_core::Var::from_tensor(&x).unwrap();
    let lp = clf
        .log_prob(xv.as_tensor(), &sigma)
        .unwrap()
        .sum_all()
        .unwrap();
    let slow = lp.backward().unwrap().get(xv.as_tensor()).unwrap().clone();
    let err = scoreguide_testing::max_abs_diff(&fast, &slow);
    let scale = scoreguide_testing::max_abs_diff(&slow, &slow.zeros_like().unwrap());
    assert!(
        scale > 0.0 && err <= 1e-5 * (1.0 + scale),
        "hand-written gradient differs from autograd by {err} (scale {scale})"
    );
}

/// The residual MLP runs as one fused op on the CPU in f32 and layer by layer in f64:
/// outputs and the gradients of every parameter and of the input agree, with a noise
/// level per row (training) and one shared by all rows (a sampler's step).
#[test]
fn fused_residual_mlp_matches_the_layered_network() {
    let dev = Device::Cpu;
    let (x0, _, sigma) = inputs(&dev);
    for shared in [false, true] {
        let sigma = if shared {
            Tensor::full(0.3f32, 16, &dev).unwrap()
        } else {
            sigma.clone()
        };
        let run = |dtype: DType| {
            let store = ParamStore::new(5);
            let net = ResMlp::new(ResMlpConfig::default(), store.var_builder(dtype, &dev)).unwrap();
            let xv = candle_core::Var::from_tensor(&x0.to_dtype(dtype).unwrap()).unwrap();
            let c = (sigma.to_dtype(dtype).unwrap().log().unwrap() * 0.25).unwrap();
            let out = net.forward(xv.as_tensor(), &c, &Cond::none()).unwrap();
            let loss = (out.sqr().unwrap().sum_all().unwrap() + out.sum_all().unwrap()).unwrap();
            let grads = loss.backward().unwrap();
            let mut g: Vec<(String, Tensor)> = store
                .vars()
                .into_iter()
                .map(|(name, v)| (name, grads.get(v.as_tensor()).unwrap().clone()))
                .collect();
            g.push(("x".into(), grads.get(xv.as_tensor()).unwrap().clone()));
            (out.to_dtype(DType::F64).unwrap(), g)
        };
        let ((fused, gf), (layered, gl)) = (run(DType::F32), run(DType::F64));
        let d = scoreguide_testing::max_abs_diff(&fused, &layered);
        assert!(d < 1e-4, "shared σ {shared}: outputs differ by {d}");
        for ((name, a), (_, e)) in gf.iter().zip(&gl) {
            let a = a.to_dtype(DType::F64).unwrap();
            let scale = 1.0 + scoreguide_testing::max_abs(e);
            let d = scoreguide_testing::max_abs_diff(&a, e);
            assert!(
                d < 2e-4 * scale,
                "shared σ {shared}: gradient of {name} differs by {d}"
            );
        }
    }
}
