//! DLSM's pieces: the classifier's input gradient, the DLSM loss's parameter gradient
//! (second order, through ∇x log p_φ) against finite differences, and Parzen scores
//! against a Gaussian mixture's closed form.

use candle_core::{DType, Device, Tensor, Var};
use scoreguide_data::{GaussianMixture, Parzen};
use scoreguide_guidance::Cond;
use scoreguide_guidance::{per_sample, LogProb, Score};
use scoreguide_losses::{cross_entropy, dlsm, DsmWeighting};
use scoreguide_nets::{ParamStore, ToyClassifier, ToyMlpConfig};
use scoreguide_testing::{flat_f64, max_abs_diff};

/// The exact score of N(0, I) data at noise σ.
struct StdNormal;
impl Score for StdNormal {
    fn score_with(&self, x: &Tensor, sigma: &Tensor, _cond: &Cond) -> candle_core::Result<Tensor> {
        x.neg()?
            .broadcast_div(&(per_sample(sigma, x)?.sqr()? + 1.0)?)
    }
}

fn inputs(dev: &Device) -> (Tensor, Tensor, Tensor, Tensor) {
    let x0 = Tensor::new(
        &[
            [1.5f64, -0.5],
            [-2.0, 0.3],
            [0.2, 0.9],
            [3.0, 1.0],
            [-0.7, -1.2],
            [0.0, 2.5],
        ],
        dev,
    )
    .unwrap();
    let z = Tensor::new(
        &[
            [0.3f64, -1.1],
            [0.8, 0.2],
            [-0.4, 0.5],
            [1.2, -0.3],
            [-0.9, 0.1],
            [0.05, 0.7],
        ],
        dev,
    )
    .unwrap();
    let sigma = Tensor::new(&[0.05f64, 0.3, 1.0, 2.0, 4.0, 8.0], dev).unwrap();
    let y = Tensor::new(&[0u32, 1, 0, 1, 1, 0], dev).unwrap();
    (x0, z, sigma, y)
}

#[test]
fn classifier_input_gradient_matches_autograd() {
    let dev = Device::Cpu;
    let store = ParamStore::new(3);
    let cfg = ToyMlpConfig {
        in_dim: 2,
        out_dim: 2,
    };
    cfg.build(&store.var_builder(DType::F64, &dev)).unwrap();
    let clf = ToyClassifier(
        cfg.build(&store.frozen_var_builder(DType::F64, &dev).unwrap())
            .unwrap(),
    );
    let (x0, _, sigma, _) = inputs(&dev);
    for class in [0u32, 1] {
        let term = clf.for_class(class).unwrap();
        let fast = term
            .input_gradient(&x0, &sigma, &Cond::none())
            .unwrap()
            .unwrap();
        let xv = Var::from_tensor(&x0).unwrap();
        let lp = term.log_prob(xv.as_tensor(), &sigma).unwrap();
        let grads = lp.sum_all().unwrap().backward().unwrap();
        let auto = grads.get(xv.as_tensor()).unwrap();
        let err = max_abs_diff(&fast, auto);
        assert!(err < 1e-12, "class {class}: {err}");
    }
    assert!(clf.for_class(2).is_err());
}

#[test]
fn dlsm_parameter_gradient_matches_finite_differences() {
    let dev = Device::Cpu;
    let store = ParamStore::new(11);
    let clf = ToyClassifier(
        ToyMlpConfig {
            in_dim: 2,
            out_dim: 2,
        }
        .build(&store.var_builder(DType::F64, &dev))
        .unwrap(),
    );
    let (x0, z, sigma, y) = inputs(&dev);
    let x = (&x0 + z.broadcast_mul(&sigma.unsqueeze(1).unwrap()).unwrap()).unwrap();
    let prior = StdNormal.score(&x, &sigma).unwrap();
    let loss = |ce_weight: f64| -> Tensor {
        let (_, g) = clf.log_prob_and_input_grad(&x, &sigma, &y).unwrap();
        let l = dlsm(&g, &prior, &x0, &sigma, &z, DsmWeighting::Unit).unwrap();
        if ce_weight > 0.0 {
            (l + (cross_entropy(&clf.0.forward(&x, &sigma).unwrap(), &y).unwrap() * ce_weight)
                .unwrap())
            .unwrap()
        } else {
            l
        }
    };
    let vars = store.vars();
    for ce_weight in [0.0, 0.125] {
        let grads = loss(ce_weight).backward().unwrap();
        let mut checked = 0;
        for (name, var) in &vars {
            // The σ-branch's first layer and every x-branch layer; the x-branch enters
            // the DLSM term only through ∇x log p, so these need the second-order path.
            if !(name.starts_with("x") || name.starts_with("head") || name.starts_with("s1")) {
                continue;
            }
            let g = flat_f64(grads.get(var.as_tensor()).unwrap());
            let base = flat_f64(var.as_tensor());
            for idx in [0, base.len() / 3, base.len() - 1] {
                let eps = 1e-5;
                let at = |delta: f64| -> f64 {
                    let mut v = base.clone();
                    v[idx] += delta;
                    var.set(&Tensor::from_vec(v, var.as_tensor().dims(), &dev).unwrap())
                        .unwrap();
                    loss(ce_weight).to_scalar::<f64>().unwrap()
                };
                let fd = (at(eps) - at(-eps)) / (2.0 * eps);
                var.set(&Tensor::from_vec(base.clone(), var.as_tensor().dims(), &dev).unwrap())
                    .unwrap();
                assert!(
                    // Finite differences carry ~|L|·1e-16/ε of rounding; a detached
                    // second-order path would be off by a factor, not by 1e-4.
                    (fd - g[idx]).abs() <= 1e-4 * fd.abs() + 1e-7,
                    "{name}[{idx}] (ce weight {ce_weight}): autograd {} vs finite difference {fd}",
                    g[idx]
                );
                checked += 1;
            }
        }
        assert!(checked >= 20, "{checked}");
        // The DLSM term alone reaches the first x layer only through ∇x log p.
        let w1 = vars.iter().find(|(n, _)| n == "x1.weight").unwrap();
        let g1 = grads
            .get(w1.1.as_tensor())
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(g1 > 0.0);
    }
}

#[test]
fn parzen_score_matches_a_gaussian_mixture_and_survives_small_sigma() {
    let dev = Device::Cpu;
    let pts = [
        [0.0f64, 0.0],
        [1.0, 2.0],
        [-3.0, 0.5],
        [2.0, -1.0],
        [0.5, 0.5],
    ];
    let parzen = Parzen::new(&Tensor::new(&pts, &dev).unwrap(), "test points").unwrap();
    // Parzen at σ = mixture of N(p_i, σ² I); the mixture with variance a evaluated at
    // σ' = sqrt(σ² − a) is the same density.
    let a: f64 = 0.5;
    let sigma: f64 = 1.2;
    let gm = GaussianMixture::new(
        vec![0.2; 5],
        pts.iter().map(|p| p.to_vec()).collect(),
        vec![vec![a.sqrt(), a.sqrt()]; 5], // stds
    )
    .unwrap();
    let x = Tensor::new(
        &[[0.3f64, -0.2], [4.0, 4.0], [-2.5, 1.0], [10.0, -7.0]],
        &dev,
    )
    .unwrap();
    let s_p = parzen
        .score(&x, &Tensor::full(sigma, 4, &dev).unwrap())
        .unwrap();
    let s_g = gm
        .score(
            &x,
            &Tensor::full((sigma * sigma - a).sqrt(), 4, &dev).unwrap(),
        )
        .unwrap();
    let err = max_abs_diff(&s_p, &s_g);
    assert!(err < 1e-10, "{err}");

    // Far from every point at tiny σ the weights underflow in a naive implementation;
    // the log-space one gives the nearest point's pull (p − x)/σ².
    let far = Tensor::new(&[[100.0f64, 0.0]], &dev).unwrap();
    let s = parzen
        .score(&far, &Tensor::new(&[1e-3f64], &dev).unwrap())
        .unwrap()
        .to_vec2::<f64>()
        .unwrap();
    let want = [(2.0 - 100.0) / 1e-6, (-1.0 - 0.0) / 1e-6];
    assert!((s[0][0] - want[0]).abs() < 1e-6 * want[0].abs(), "{s:?}");
    assert!((s[0][1] - want[1]).abs() < 1e-6 * want[1].abs(), "{s:?}");
    assert!(Parzen::new(&Tensor::zeros((0, 2), DType::F64, &dev).unwrap(), "empty").is_err());
}

/// log p(y | x; σ) of a two-component isotropic mixture (equal weights, std `s`),
/// from candle ops so that guidance differentiates it by autograd.
struct MixturePosterior {
    means: [[f64; 2]; 2],
    s: f64,
    class: usize,
}

impl LogProb for MixturePosterior {
    fn log_prob_with(
        &self,
        x: &Tensor,
        sigma: &Tensor,
        _cond: &Cond,
    ) -> candle_core::Result<Tensor> {
        let var = (sigma.sqr()? + self.s * self.s)?.unsqueeze(1)?;
        let logits = self
            .means
            .iter()
            .map(|m| {
                let mu = Tensor::new(&[m[0], m[1]], x.device())?.to_dtype(x.dtype())?;
                let d2 = x.broadcast_sub(&mu)?.sqr()?.sum_keepdim(1)?;
                (d2.neg()? / 2.0)?.broadcast_div(&var)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let logits = Tensor::cat(&logits, 1)?;
        scoreguide_guidance::log_softmax(&logits)?
            .narrow(1, self.class, 1)?
            .squeeze(1)
    }
}

#[test]
fn guided_pc_sampling_draws_the_requested_class() {
    // Prior: the mixture's exact score; guidance: its exact class posterior. Guided
    // samples must come from the requested component only.
    let dev = Device::Cpu;
    let means = [[-4.0, 0.0], [4.0, 1.0]];
    let s: f64 = 0.5;
    let gm = GaussianMixture::new(
        vec![0.5, 0.5],
        means.iter().map(|m| m.to_vec()).collect(),
        vec![vec![s, s]; 2],
    )
    .unwrap();
    let sigmas = scoreguide_sde::append_zero(scoreguide_sde::log_linear(300, 0.01, 20.0).unwrap());
    let sampler = scoreguide_samplers::Sampler::PredictorCorrector(Default::default());
    for class in 0..2 {
        let guided =
            scoreguide_guidance::Guided::new(&gm).with(1.0, MixturePosterior { means, s, class });
        let n = 400;
        let mut noise = scoreguide_sde::SampleNoise::new(5, 0, n);
        let x0 =
            scoreguide_samplers::initial_noise(&mut noise, &[n, 2], sigmas[0], DType::F64, &dev)
                .unwrap();
        let x = sampler
            .sample(&guided, x0, &sigmas, &mut noise, None)
            .unwrap();
        let rows = x.to_vec2::<f64>().unwrap();
        let in_class = rows
            .iter()
            .filter(|r| {
                let d = |m: &[f64; 2]| (r[0] - m[0]).powi(2) + (r[1] - m[1]).powi(2);
                d(&means[class]) < d(&means[1 - class])
            })
            .count();
        assert!(
            in_class >= n - 2,
            "class {class}: {in_class} of {n} samples in the class"
        );
        let mean_x = rows.iter().map(|r| r[0]).sum::<f64>() / n as f64;
        assert!(
            (mean_x - means[class][0]).abs() < 0.15,
            "class {class}: mean x {mean_x}"
        );
    }
}
